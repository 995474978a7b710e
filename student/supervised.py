"""Plain supervised training on labelled batches, in this process.

Two stages need it: fine-tuning a pretrained teacher on the task, and the ablation that trains
the student's architecture on hard labels alone, so the report shows what distillation gained.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from polydistill.storage.batch_plan import plan_epoch_batches
from polydistill.storage.job_data import TokenizedSplit, pad_labels, pad_rows


def train_supervised(
    model: PreTrainedModel,
    rows: TokenizedSplit,
    pad_id: int,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    warmup_ratio: float = 0.1,
    description: str = "training",
    show_progress: bool = True,
    bf16: bool = False,
) -> list[dict]:
    """Cross-entropy training over length-grouped batches; returns the loss history.

    ``epochs`` may be fractional: 0.5 trains on half an epoch's batches.
    """
    torch.manual_seed(seed)
    batches_per_epoch = math.ceil(len(rows) / batch_size)
    total_steps = max(1, round(epochs * batches_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    model.train()
    history: list[dict] = []
    step = 0
    with tqdm(total=total_steps, desc=description, unit="step", disable=not show_progress,
              mininterval=0.5 if os.isatty(2) else 10.0) as bar:
        for epoch in range(math.ceil(epochs)):
            for index in plan_epoch_batches(rows.lengths, batch_size, seed, epoch, True):
                if step >= total_steps:
                    break
                input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
                # A tagger learns each word's tag on its first sub-token (-100 elsewhere: ignored by the loss).
                labels = (rows.labels[index] if rows.token_labels is None
                          else pad_labels([rows.token_labels[i] for i in index], input_ids.shape[1]))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(
                        input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                        attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
                        labels=torch.from_numpy(labels),
                    ).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step % 10 == 0 or step == total_steps:
                    history.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 5)})
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return history
