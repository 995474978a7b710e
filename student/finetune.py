"""Teacher fine-tuning: a classification head trained on top of a pretrained encoder.

A pretrained multilingual encoder (multilingual-e5, XLM-R) knows languages but not the task;
distillation needs a teacher that solves the task first. The result is an ordinary HF
checkpoint with the label names in its config, cached by recipe so that reruns skip it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import JobSplit, pad_token_id, tokenize_split
from polydistill.student.build import label_maps, model_class
from polydistill.student.precision import use_bf16
from polydistill.student.supervised import train_supervised

FINETUNED_MARKER = "polydistill_finetune.json"


def finetune_recipe(config: JobConfig, source: str) -> dict:
    """Everything that determines the fine-tuned weights; a cached teacher is reused only on an exact match."""
    data, training = config.data, config.training
    return {
        "source": source,
        "epochs": config.teacher.finetune_epochs,
        "lr": config.teacher.finetune_lr,
        "batch_size": training.batch_size,
        "weight_decay": training.weight_decay,
        "seed": training.seed,
        "data": data.model_dump(mode="json", exclude={"eval_split"}),
    }


def ensure_finetuned_teacher(config: JobConfig, source: str, train: JobSplit, cache_root: Path) -> Path:
    """The checkpoint the replicas load: ``source`` itself when no fine-tuning is asked for, else a
    fine-tuned copy under ``cache_root``, keyed by its recipe so that a second run reuses it."""
    if config.teacher.finetune_epochs == 0:
        return Path(source)
    recipe = finetune_recipe(config, source)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    teacher_dir = cache_root / f"teacher-{digest}"
    marker = teacher_dir / FINETUNED_MARKER
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return teacher_dir
    staging = cache_root / f".teacher-{digest}.{os.getpid()}"
    finetune_teacher(config, source, train, staging)
    (staging / FINETUNED_MARKER).write_text(json.dumps(recipe, sort_keys=True) + "\n")
    shutil.rmtree(teacher_dir, ignore_errors=True)
    staging.rename(teacher_dir)
    return teacher_dir


def finetune_teacher(config: JobConfig, source: str, train: JobSplit, out_dir: Path, show_progress: bool = True) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = model_class(config.task).from_pretrained(source, **label_maps(train.label_names))
    # Frozen input embeddings: for a 250k-piece vocabulary they are most of the parameters, and
    # a few thousand labelled sentences cannot improve them; it also shrinks the optimiser state.
    model.get_input_embeddings().weight.requires_grad_(False)
    rows = tokenize_split(train.dataset, tokenizer, config.data.max_length)
    train_supervised(
        model,
        rows,
        pad_token_id(tokenizer),
        epochs=config.teacher.finetune_epochs,
        batch_size=config.training.batch_size,
        lr=config.teacher.finetune_lr,
        weight_decay=config.training.weight_decay,
        seed=config.training.seed + 1,
        description="fine-tuning teacher",
        show_progress=show_progress,
        bf16=use_bf16(config.training.precision == "bfloat16", "cpu", "training.precision"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
