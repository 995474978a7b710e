"""The model card (README.md) each distilled student carries, so that it travels with what it is, how it
was made and how it scores: the hub's YAML header, the teacher, the data and its licence, the recipe,
the per-language table against the teacher and the student's own hard-label ablation, its size and speed,
and how to load it with stock libraries.

``render_model_card`` is pure (report.json's dict and the job's config in, Markdown out);
``write_model_cards`` puts one beside every student's weights (the driver saves the job's config, with no
secrets, beside it as ``job.yaml``, which the card's command names).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from polydistill.cluster.config import MAIN_STUDENT, JobConfig
from polydistill.student.report import format_language_table
from polydistill.student.report_students import distilled_students, student_summaries, student_view

CARD_FILE = "README.md"
# What the hub shows for each task kind, and the stock class that loads the student.
_PIPELINE = {
    "sequence-classification": ("text-classification", "AutoModelForSequenceClassification"),
    "token-classification": ("token-classification", "AutoModelForTokenClassification"),
    "sentence-embedding": ("sentence-similarity", "AutoModel"),
    "causal-lm": ("text-generation", "AutoModelForCausalLM"),
    "masked-lm": ("fill-mask", "AutoModelForMaskedLM"),
    "seq2seq": ("translation", "AutoModelForSeq2SeqLM"),
}


def card_languages(report: Mapping) -> list[str]:
    """The languages of the evaluation as the hub's card header takes them (ISO 639 codes: "amh_Ethi" → "amh")."""
    return sorted({language.split("_")[0].split("-")[0] for language in report.get("per_language") or {}})


def render_model_card(report: Mapping, config: JobConfig, name: str = MAIN_STUDENT) -> str:
    """The card of student ``name`` ("student" or an extra student's name) of the job in ``report``."""
    pipeline, auto_class = _PIPELINE[config.task]
    student_config = config.for_student(name).student
    header = {"library_name": "transformers", "pipeline_tag": pipeline,
              "tags": ["knowledge-distillation", "polydistill", "multilingual"],
              "language": card_languages(report) or None}
    if not Path(config.teacher.model).exists() and ":" not in config.teacher.model:
        header["base_model"] = config.teacher.model  # a hub name
    header = {key: value for key, value in header.items() if value}
    summary = next((entry for entry in student_summaries(report) if entry["model"] == name), None)
    distill = config.distill
    training = config.training
    layers = student_config.config.get("num_hidden_layers")
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# A distilled student of {config.teacher.model}", "",
        f"Distilled by polydistill from the teacher `{config.teacher.model}` on `{config.data.path}` "
        f"({config.task}, {len(report.get('per_language') or {})} languages).",
    ]
    if summary is not None:
        lines += ["", _headline(summary, report)]
    lines += [
        "", "## How it was made", "",
        f"- Student: {'the teacher architecture' if student_config.model is None else student_config.model}"
        + (f" with {layers} layers" if layers else "")
        + (f", initialised from teacher layers {student_config.init_from_teacher_layers}"
           if student_config.init_from_teacher_layers else "")
        + (", vocabulary trimmed to the pieces the training text uses" if student_config.trim_vocabulary else "")
        + (f", saved as an ALBERT model whose word embedding is factorised ({student_config.embedding_size} wide, "
           "then mapped to the hidden width)" if student_config.embedding_size else "")
        + ".",
        f"- Knowledge: soft labels at temperature {distill.temperature} (weight {distill.soft_weight}), "
        f"gold labels (weight {distill.hard_weight}); {training.epochs} epochs, batch {training.batch_size}, "
        f"learning rate {training.lr}, seed {training.seed}.",
        f"- Trained on {report.get('samples_distilled', 0):,} samples in {report.get('total_seconds') or report.get('wall_seconds', 0):.0f} s "
        "(the whole job: teacher, students, evaluation).",
        "- Made with `polydistill run job.yaml --output OUT` (`job.yaml`, beside this card, is the job's config).",
        "", "## Results on the held-out split", "",
        "Teacher, this student and the same student trained on the gold labels alone (hard-label ablation), "
        "with 95 % paired-bootstrap intervals over each language's rows.", "",
        format_language_table(student_view(report, name)) or "(no evaluation in this job)",
    ]
    if summary is not None and summary.get("params"):
        teacher = (report.get("efficiency") or {}).get("teacher") or {}
        lines += ["", "## Size and speed", "",
                  f"{summary['params']:,} parameters ({teacher.get('params', 0):,} in the teacher)"
                  + (f"; {summary['speedup_batch32']:.2f}× the teacher's speed at batch 32 on the machine that "
                     "made it." if summary.get("speedup_batch32") else ".")]
    lines += [
        "", "## Use", "", "```python",
        f"from transformers import AutoTokenizer, {auto_class}", "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        f'model = {auto_class}.from_pretrained("PATH")',
        "```", "", "## Data licence", "",
        config.data.licence or "Not stated: the data's own terms apply (set data.licence to name them here).",
    ]
    return "\n".join(lines) + "\n"


def _headline(summary: Mapping, report: Mapping) -> str:
    averages = (report.get("overall") or {}).get("language_average") or {}
    parts = [f"Mean over languages: {100 * summary['score']:.1f} %"]
    if "teacher" in averages:
        parts.append(f"teacher {100 * averages['teacher']:.1f} %")
    kept, lead = summary.get("retention"), summary.get("minus_ablation")
    if kept:
        parts.append(f"retention {100 * kept['estimate']:.1f} % [{100 * kept['low']:.1f}, {100 * kept['high']:.1f}]")
    if lead:
        parts.append(f"{100 * lead['estimate']:+.1f} points over its hard-label ablation "
                     f"[{100 * lead['low']:+.1f}, {100 * lead['high']:+.1f}]")
    return "; ".join(parts) + "."


def write_model_cards(report: Mapping, config: JobConfig) -> list[Path]:
    """A card beside the weights of every distilled student the report names; returns the cards written."""
    folders = {MAIN_STUDENT: report.get("student_path")}
    folders.update({name: section.get("student_path")
                    for name, section in (report.get("extra_students") or {}).items()})
    written = []
    for name in distilled_students(report) or [MAIN_STUDENT]:
        folder = folders.get(name)
        if not folder or not Path(folder).is_dir():
            continue
        card = Path(folder) / CARD_FILE
        card.write_text(render_model_card(report, config, name), encoding="utf-8")
        written.append(card)
    return written
