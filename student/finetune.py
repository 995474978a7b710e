"""Teacher fine-tuning: a classification head trained on top of a pretrained encoder, stopped on dev.

A pretrained multilingual encoder (multilingual-e5, XLM-R) knows languages but not the task;
distillation needs a teacher that solves the task first. Fine-tuning runs for at most
``teacher.finetune_epochs``, scores the dev split (never the test split) per language every
``teacher.finetune_eval_every`` epochs, stops once ``teacher.finetune_patience`` scores bring no new
best, and keeps the best checkpoint: a fixed budget is too short on one dataset and too long on
another. The result is an ordinary HF checkpoint with the label names in its config, cached by
recipe (settings and the content of the rows, not their path) so that reruns skip it; the dev
curve travels with it for the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import JobSplit, pad_token_id, tokenize_split
from polydistill.storage.teacher_splits import TeacherSplits
from polydistill.student.build import label_maps, model_class
from polydistill.student.dev_scores import dev_scorer
from polydistill.student.devices import CPU
from polydistill.student.precision import use_bf16
from polydistill.student.supervised import DevStopping, train_supervised

FINETUNED_MARKER = "polydistill_finetune.json"


def content_hash(split: JobSplit) -> str:
    """A hash of what the rows hold (every column, in order, and the label names), whatever folder or
    file they were read from: the same data at two paths is the same data."""
    digest = hashlib.sha256(json.dumps(split.label_names, ensure_ascii=False).encode())
    columns = split.dataset.with_format(None)
    for name in sorted(columns.column_names):
        digest.update(json.dumps([name, columns[name][:]], ensure_ascii=False).encode())
    return digest.hexdigest()


def finetune_recipe(config: JobConfig, source: str, splits: TeacherSplits) -> dict:
    """Everything that determines the fine-tuned weights; a cached teacher is reused only on an exact match.
    The data enter by content, so settings that leave the rows as they are (another path to the same
    files; ``data.dev_seed`` while the data's own dev split is used) share a teacher."""
    teacher, training = config.teacher, config.training
    return {
        "source": source,
        "task": config.task,
        "max_epochs": teacher.finetune_epochs,
        "lr": teacher.finetune_lr,
        "schedule": teacher.finetune_schedule,
        "eval_every": teacher.finetune_eval_every,
        "patience": teacher.finetune_patience,
        "batch_size": training.batch_size,
        "weight_decay": training.weight_decay,
        "seed": training.seed,
        "head_seed": head_seed(training.seed),  # absent from the key of teachers whose head was drawn unseeded
        "precision": training.precision,
        "max_length": config.data.max_length,
        "train_rows": content_hash(splits.train),
        "dev_rows": content_hash(splits.dev),
    }


def head_seed(seed: int) -> int:
    """The seed of a fine-tuned teacher's new classification head."""
    return seed + 1


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_finetuned_teacher(config: JobConfig, source: str, splits: TeacherSplits, cache_root: Path,
                             show_progress: bool = True, device: torch.device = CPU) -> tuple[Path, dict]:
    """The fine-tuned copy of ``source`` under ``cache_root``, keyed by its recipe so that a second run
    reuses it, and what its fine-tuning recorded (dev curve, chosen step, seconds)."""
    recipe = finetune_recipe(config, source, splits)
    digest = recipe_digest(recipe)
    teacher_dir = cache_root / f"teacher-{digest}"
    marker = teacher_dir / FINETUNED_MARKER
    if marker.exists():
        cached = json.loads(marker.read_text(encoding="utf-8"))
        if cached.get("recipe") == recipe:
            return teacher_dir, {**cached["fine_tuning"], "reused": True}
    staging = cache_root / f".teacher-{digest}.{os.getpid()}"
    fine_tuning = finetune_teacher(config, source, splits, staging, show_progress, device)
    (staging / FINETUNED_MARKER).write_text(json.dumps({"recipe": recipe, "fine_tuning": fine_tuning},
                                                       sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(teacher_dir, ignore_errors=True)
    staging.rename(teacher_dir)
    return teacher_dir, {**fine_tuning, "reused": False}


def finetune_teacher(config: JobConfig, source: str, splits: TeacherSplits, out_dir: Path,
                     show_progress: bool = True, device: torch.device = CPU) -> dict:
    """Fine-tunes ``source`` on ``splits.train`` on ``device``, choosing the checkpoint on ``splits.dev``, and
    saves it to ``out_dir``; returns the dev curve, the chosen step and the stage's wall time."""
    started = time.perf_counter()  # on the caller's torch threads (a stage sets them: cluster/stages.py)
    teacher, training = config.teacher, config.training
    label_names = splits.train.label_names
    tokenizer = AutoTokenizer.from_pretrained(source)
    # The new classification head is drawn from torch's global generator: seeded here, the fine-tuned weights are
    # the recipe's alone, not those of whatever ran before in this process (a stage's worker or the driver).
    torch.manual_seed(head_seed(training.seed))
    model = model_class(config.task).from_pretrained(source, **label_maps(label_names)).to(device)
    # Frozen input embeddings: for a 250k-piece vocabulary they are most of the parameters, and
    # a few thousand labelled sentences cannot improve them; it also shrinks the optimiser state.
    model.get_input_embeddings().weight.requires_grad_(False)
    pad_id = pad_token_id(tokenizer)
    rows = tokenize_split(splits.train.dataset, tokenizer, config.data.max_length)
    dev_rows = tokenize_split(splits.dev.dataset, tokenizer, config.data.max_length)
    steps_per_epoch = math.ceil(len(rows) / training.batch_size)
    max_steps = max(1, round(teacher.finetune_epochs * steps_per_epoch))
    dev = DevStopping(dev_scorer(config.task, dev_rows, pad_id, label_names),
                      every_steps=max(1, round(teacher.finetune_eval_every * steps_per_epoch)),
                      patience=teacher.finetune_patience)
    train_supervised(
        model,
        rows,
        pad_id,
        epochs=teacher.finetune_epochs,
        batch_size=training.batch_size,
        lr=teacher.finetune_lr,
        weight_decay=training.weight_decay,
        seed=training.seed + 1,
        schedule=teacher.finetune_schedule,
        dev=dev,
        description="fine-tuning teacher",
        show_progress=show_progress,
        bf16=use_bf16(training.precision == "bfloat16", device.type, "training.precision"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    chosen = next(point for point in dev.curve if point["step"] == dev.state.best_step)
    return {
        "max_epochs": teacher.finetune_epochs,
        "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch,
        "eval_every_steps": dev.every_steps,
        "patience": teacher.finetune_patience,
        "schedule": teacher.finetune_schedule,
        "lr": teacher.finetune_lr,
        "steps_trained": dev.curve[-1]["step"],
        "stopped_early": dev.stopped_early,
        "chosen_step": chosen["step"],
        "chosen_epoch": chosen["epoch"],
        "dev_accuracy": chosen["accuracy"],
        "curve": dev.curve,
        "seconds": round(time.perf_counter() - started, 2),
        "device": device.type,
    }
