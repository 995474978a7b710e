"""A job's compression chain (config ``compress``): the distilled student pruned, recovered and
quantised by ``student.compress.run_stages``, measured on the same held-out rows as the teacher.

The driver calls ``compress_job`` after evaluation; it returns ``{"stages": [...], "compression":
{...}}`` for report.json. Every model reads the text through its own tokenizer (a student with a
trimmed vocabulary has its own). Recovery distils from the teacher's logits, computed once on the
calibration rows (the student's training rows, or ``compress.calibration_rows`` of them), or
trains on hard labels (``compress.recover_loss: hard``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import TokenizedSplit, load_job_split, pad_rows, pad_token_id, tokenize_split
from polydistill.student.compress import distillation_loss, finetune_with_loss, run_stages
from polydistill.student.scoring import EVAL_BATCH, quality
from polydistill.student.prune import cross_entropy_loss
from polydistill.student.supervised import train_supervised


@torch.inference_mode()
def teacher_logits(model, rows: TokenizedSplit, pad_id: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """float32 [rows, labels]: row i's logits at index i (batched by length)."""
    model.eval()
    order = np.argsort(rows.lengths, kind="stable")
    logits = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        out = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(attention_mask.astype(np.int64))).logits.float().numpy()
        if logits is None:
            logits = np.empty((len(rows), out.shape[-1]), dtype=np.float32)
        logits[index] = out
    return logits


def compress_job(config: JobConfig, teacher_dir: Path, student_dir: Path, label_names: list[str],
                 out_dir: Path, threads: int | None = None) -> dict:
    """On CPU, where int8 dynamic quantisation and the ONNX runtime the stages ship for run."""
    settings = config.compress
    started = time.perf_counter()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    train = load_job_split(config.data, config.data.train_split, label_names=label_names)
    held_out = load_job_split(config.data, config.data.eval_split, label_names=label_names)
    calibration = train.dataset
    if settings.calibration_rows is not None and settings.calibration_rows < len(calibration):
        chosen = np.random.default_rng(config.training.seed).choice(len(calibration), settings.calibration_rows,
                                                                    replace=False)
        calibration = calibration.select(np.sort(chosen))
    max_length = config.data.max_length

    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    teacher_pad = pad_token_id(teacher_tokenizer)
    teacher_quality = quality(teacher, tokenize_split(held_out.dataset, teacher_tokenizer, max_length), teacher_pad,
                              len(label_names))
    distilling = settings.recover_loss == "distill"
    cached = (teacher_logits(teacher, tokenize_split(calibration, teacher_tokenizer, max_length), teacher_pad)
              if distilling else None)
    del teacher

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = pad_token_id(tokenizer)
    rows = tokenize_split(calibration, tokenizer, max_length)
    eval_rows = tokenize_split(held_out.dataset, tokenizer, max_length)
    labelled = not config.data.withhold_labels
    if not labelled:  # the student never sees labels, here as in distillation
        rows.labels[:] = -1
    loss = distillation_loss(cached, config.distill, labelled=labelled) if distilling else None

    def recover(model) -> None:
        if config.student.freeze_embeddings:  # as in distillation: the teacher's word vectors stay fixed
            model.get_input_embeddings().weight.requires_grad_(False)
        if distilling:
            finetune_with_loss(model, rows, pad_id, loss, epochs=settings.recover_epochs,
                               batch_size=settings.recover_batch_size, lr=settings.recover_lr,
                               seed=config.training.seed, weight_decay=config.training.weight_decay)
        else:
            train_supervised(model, rows, pad_id, epochs=settings.recover_epochs,
                             batch_size=settings.recover_batch_size, lr=settings.recover_lr,
                             weight_decay=config.training.weight_decay, seed=config.training.seed,
                             description="compress: recover", show_progress=False)
            model.eval()

    result = run_stages(
        student_dir, settings.stages, out_dir=out_dir, calibration=rows, eval_rows=eval_rows, pad_id=pad_id,
        num_labels=len(label_names), teacher_quality=teacher_quality, recover=recover,
        importance_loss=loss if distilling else cross_entropy_loss,
    )
    return {
        "stages": [row.to_dict() for row in result],
        "compression": {
            "output_dir": str(out_dir),
            "calibration_rows": len(rows),
            "recover_loss": settings.recover_loss,
            "teacher_accuracy": teacher_quality["overall"]["accuracy"],
            "seconds": round(time.perf_counter() - started, 2),
        },
    }
