"""Teacher fine-tuning: a classification head trained on top of a pretrained encoder.

A pretrained multilingual encoder (multilingual-e5, XLM-R) knows languages but not the task;
distillation needs a teacher that solves the task first. The result is an ordinary HF
checkpoint with the label names in its config, cached in the job's output directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from actors.feeder import plan_epoch_batches
from cluster.config import JobConfig
from storage.job_data import JobSplit, pad_rows, tokenize_split
from student.build import label_maps

FINETUNED_MARKER = "polydistill_finetune.json"


def _is_matching_classifier(source: str, label_names: list[str]) -> bool:
    config = AutoConfig.from_pretrained(source)
    names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    return names == list(label_names) and bool(getattr(config, "architectures", None)) and any(
        arch.endswith("ForSequenceClassification") for arch in config.architectures
    )


def ensure_finetuned_teacher(config: JobConfig, source: str, train: JobSplit, teacher_dir: Path) -> Path:
    """The checkpoint the replicas load: ``source`` itself when it already classifies these labels,
    else a fine-tuned copy in ``teacher_dir`` (reused when a previous run already made it)."""
    epochs = config.teacher.finetune_epochs
    marker = teacher_dir / FINETUNED_MARKER
    if marker.exists() and json.loads(marker.read_text())["source"] == source:
        return teacher_dir
    if epochs == 0:
        return Path(source)
    finetune_teacher(config, source, train, teacher_dir)
    marker.write_text(json.dumps({"source": source, "epochs": epochs}) + "\n")
    return teacher_dir


def finetune_teacher(config: JobConfig, source: str, train: JobSplit, out_dir: Path, show_progress: bool = True) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, **label_maps(train.label_names))
    # Frozen input embeddings: for a 250k-piece vocabulary they are most of the parameters, and
    # a few thousand labelled sentences cannot improve them; it also halves the optimiser state.
    model.get_input_embeddings().weight.requires_grad_(False)
    rows = tokenize_split(train.dataset, tokenizer, config.data.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    epochs = config.teacher.finetune_epochs
    batch_size = config.training.batch_size
    batches_per_epoch = math.ceil(len(rows) / batch_size)
    total_steps = max(1, round(epochs * batches_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.teacher.finetune_lr,
                                  weight_decay=config.training.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total_steps), total_steps)
    model.train()
    step = 0
    with tqdm(total=total_steps, desc="fine-tuning teacher", unit="step", disable=not show_progress,
              mininterval=0.5 if os.isatty(2) else 10.0) as bar:
        for epoch in range(math.ceil(epochs)):
            for index in plan_epoch_batches(rows.lengths, batch_size, config.training.seed + 1, epoch, True):
                if step >= total_steps:
                    break
                input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
                loss = model(
                    input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
                    labels=torch.from_numpy(rows.labels[index]),
                ).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
