"""Teacher and student measured side by side on the same held-out data, per language.

Quality (as the job's task kind scores it: accuracy and macro precision/recall/F1, bitext retrieval,
perplexity, chrF) and efficiency (parameters, size on disk, latency on the device the evaluation
runs on) go into one report section each, with the student's retention of the teacher's score.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.balancing import balanced_epoch_draws
from polydistill.storage.job_data import JobSplit, load_job_split, pad_token_id, tokenize_split
from polydistill.student.build import model_class
from polydistill.student.devices import CPU
from polydistill.student.precision import use_bf16
from polydistill.student.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE_LEVEL,
    bootstrap_intervals,
    is_distilled_student,
    retention,
)
from polydistill.student.efficiency import interleaved_latency_ms
# The scorers live in student/scoring.py, below the task kinds that use them.
from polydistill.student.scoring import LATENCY_FIGURES, describe_latency_sample, latency_figures
from polydistill.student.supervised import DevStopping, train_supervised
from polydistill.student.task_kinds import task_kind
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest
from polydistill.student.validation import NEVER_STOP, DevValidation, label_names_of

__all__ = ["ablation_validation", "add_confidence_intervals", "evaluate_job", "side_by_side", "train_ablation"]

ABLATION_VALIDATION_FILE = "validation.json"  # beside an ablation's weights, when it scored dev


def side_by_side(results: dict[str, dict], primary: str = "accuracy") -> dict:
    """{name: quality} for teacher, student (and others) → the report's per_language / overall sections;
    retention is the student's ``primary`` score over the teacher's."""
    teacher = results["teacher"]
    languages = sorted(teacher["per_language"])
    per_language = {}
    for language in languages:
        row = {name: result["per_language"][language] for name, result in results.items()}
        row["retention"] = retention(row["student"][primary], row["teacher"][primary])
        per_language[language] = row
    overall = {name: result["overall"] for name, result in results.items()}
    overall["retention"] = retention(overall["student"][primary], overall["teacher"][primary])
    # The mean of per-language scores weighs every language equally, however many test rows it has.
    overall["language_average"] = {
        name: float(np.mean([per_language[lang][name][primary] for lang in languages])) for name in results
    }
    overall["retention_min_language"] = min(
        (row["retention"] for row in per_language.values() if row["retention"] is not None), default=None
    )
    return {"per_language": per_language, "overall": overall}


def add_confidence_intervals(report: dict, results: dict[str, dict], languages: list[str]) -> None:
    """Paired bootstrap intervals (student/metrics.py) of student - ablation and of retention, into each
    language's entry and, for the average over languages, into the overall section."""
    intervals = bootstrap_intervals({name: result["row_correct"] for name, result in results.items()}, languages,
                                    units=results["teacher"].get("row_units"))
    for language, entry in intervals["per_language"].items():
        report["per_language"][language]["intervals"] = entry
    report["overall"]["intervals"] = {
        "language_average": intervals["language_average"],
        "method": "paired bootstrap over each language's test rows (percentile intervals)",
        "level": CONFIDENCE_LEVEL, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
    }


def evaluate_job(config: JobConfig, teacher_dir: Path, student_dir: Path, label_names: list[str],
                 extra_models: dict[str, Path] | None = None, *, threads: int | None = None,
                 device: torch.device = CPU) -> dict:
    """Every model scored on the same held-out rows, each read through its own tokenizer
    (a student with a trimmed vocabulary has its own), on ``device``, where latency is measured too."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    kind = task_kind(config.task)
    split = load_job_split(config.data, config.data.eval_split, label_names=label_names)
    held_out = HeldOut(config, split, label_names)
    models = {"teacher": teacher_dir, "student": student_dir, **(extra_models or {})}
    results, costs, latency_work = {}, {}, {}
    for name, model_dir in models.items():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = model_class(config.task).from_pretrained(model_dir).to(device)
        tested = ModelUnderTest(model, tokenizer, Path(model_dir))
        with_costs = (name == "teacher" or is_distilled_student(name)) and config.evaluation.latency
        # The teacher comes first; the models after it are scored against it too where the kind compares them.
        results[name], costs_of = kind.evaluate(held_out, tested, results.get("teacher"), with_costs)
        if costs_of is not None:
            costs[name] = dict(costs_of.sizes)
            latency_work.update({(name, figure): work for figure, work in costs_of.latency_work.items()})
    # The teacher and the students are timed in the same rounds, so that each speed-up is a ratio of two
    # latencies taken under the same conditions.
    timed = interleaved_latency_ms(latency_work, rounds=config.evaluation.latency_rounds)
    for name in costs:
        costs[name].update(latency_figures({figure: timed[(name, figure)] for figure in LATENCY_FIGURES}))
    del latency_work, tested, model  # the timed models were held until now: free them before the bootstrap
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report = side_by_side(results, primary=kind.primary_score)
    if all("row_correct" in result for result in results.values()):  # classifiers and taggers
        add_confidence_intervals(report, results, split.dataset.with_format(None)["language"][:])
    if costs:
        costs["latency_sample"] = {**describe_latency_sample(split), "rounds": config.evaluation.latency_rounds}
        costs["device"] = device.type
        # The main student's ratios sit at the top of the section, each extra student's in its own entry.
        costs.update(_against_teacher(costs["teacher"], costs["student"]))
        costs["disk_ratio"] = round(costs["student"]["disk_bytes"] / costs["teacher"]["disk_bytes"], 4)
        for name in filter(is_distilled_student, models):
            if name != "student":
                costs[name].update(_against_teacher(costs["teacher"], costs[name]))
    report["efficiency"] = costs
    report["eval_samples"] = len(split.dataset)
    report["metric"] = kind.metric
    return report


def _against_teacher(teacher: dict, student: dict) -> dict:
    """A student's speed-ups and size as the teacher's multiple."""
    return {"speedup_batch1": round(teacher["latency_ms_batch1"] / student["latency_ms_batch1"], 3),
            "speedup_batch32": round(teacher["latency_ms_batch32"] / student["latency_ms_batch32"], 3),
            "param_ratio": round(student["params"] / teacher["params"], 4)}


def balanced_draws(config: JobConfig, languages: list[str]) -> Callable[[int], np.ndarray] | None:
    """The balanced epochs' draws (``data.balance``) as the feeder makes them, or None without balancing."""
    balance = config.data.balance
    if balance is None:
        return None
    total = balance.samples_per_epoch or len(languages)
    return lambda epoch: balanced_epoch_draws(languages, balance.alpha, total, seed=config.training.seed, epoch=epoch)


def train_ablation(config: JobConfig, student_init_dir: Path, out_dir: Path, train: JobSplit,
                   show_progress: bool = True, threads: int | None = None,
                   device: torch.device = CPU) -> Path:
    """The student's architecture and initialisation trained on hard labels alone, same data and
    schedule as the distilled student: the report's baseline for what the teacher added."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(student_init_dir)
    model = model_class(config.task).from_pretrained(student_init_dir).to(device)
    if config.student.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    rows = tokenize_split(train.dataset, tokenizer, config.data.max_length)
    training = config.training
    draws = balanced_draws(config, rows.languages)
    dev = None
    if training.keep_best:  # chosen (and stopped, with training.patience) as the distilled student is
        samples_per_epoch = len(rows) if draws is None else len(draws(0))
        dev = DevStopping(DevValidation(config, student_init_dir, label_names_of(model)),
                          every_steps=math.ceil(samples_per_epoch / training.batch_size),
                          patience=training.patience or NEVER_STOP)
    train_supervised(
        model, rows, pad_token_id(tokenizer),
        epochs=training.epochs, batch_size=training.batch_size, lr=training.lr,
        weight_decay=training.weight_decay, seed=training.seed, warmup_ratio=training.warmup_ratio,
        description="ablation: hard labels only", show_progress=show_progress,
        bf16=use_bf16(config.training.precision == "bfloat16", device.type, "training.precision"),
        epoch_draws=draws, dev=dev,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if dev is not None:  # what was chosen, beside the weights
        (out_dir / ABLATION_VALIDATION_FILE).write_text(json.dumps(
            {"curve": dev.curve, "kept_step": dev.state.best_step, "stopped_early": dev.stopped_early}, indent=2) + "\n", encoding="utf-8")
    return out_dir


def ablation_validation(ablation_dirs: dict[str, Path]) -> dict[str, dict]:
    """{ablation name: its dev curve, kept step and whether it stopped early} for the ablations that
    scored dev (training.keep_best): the report shows them beside their students' epochs."""
    found = {}
    for name, folder in ablation_dirs.items():
        path = Path(folder) / ABLATION_VALIDATION_FILE
        if path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found
