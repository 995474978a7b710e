"""Plain supervised training on labelled batches, in this process (a Ray task of its stage: cluster/stages.py).

Three stages need it: fine-tuning a pretrained teacher on the task (stopped on a dev split), the
short hard-label run of the student that the teacher gate compares with, and the ablation that
trains the student's architecture on hard labels alone, so the report shows what distillation gained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, get_constant_schedule, get_linear_schedule_with_warmup

from polydistill.cluster.progress import progress_bar
from polydistill.storage.batch_plan import plan_epoch_batches
from polydistill.storage.job_data import TokenizedSplit, pad_labels, pad_rows
from polydistill.student.devices import model_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoppingState:
    """Where early stopping stands after some dev scores: the best so far, and how many came since."""

    best_score: float | None = None
    best_step: int | None = None
    scores_since_best: int = 0


def after_dev_score(state: StoppingState, step: int, score: float, patience: int) -> tuple[StoppingState, bool]:
    """The state after a dev score at ``step``, and whether training should stop there.

    Only a strictly higher score is a new best: on a tie the earlier, shorter-trained checkpoint
    stays. Training stops once ``patience`` scores in a row brought no new best."""
    if state.best_score is None or score > state.best_score:
        return StoppingState(best_score=score, best_step=step), False
    waited = state.scores_since_best + 1
    return replace(state, scores_since_best=waited), waited >= patience


# Scores a model on the dev split: (overall accuracy, {language: accuracy}).
DevScorer = Callable[[PreTrainedModel], tuple[float, Mapping[str, float]]]


class DevStopping:
    """Early stopping for ``train_supervised``: the model is scored on a dev split every ``every_steps``
    steps and after the last one; the weights of the best score are kept (in memory, only those that
    train) and put back when training ends, which happens after ``patience`` scores without a new best.
    ``curve``, ``state`` and ``stopped_early`` tell the caller what happened."""

    def __init__(self, score: DevScorer, every_steps: int, patience: int):
        if every_steps < 1 or patience < 1:
            raise ValueError(f"every_steps ({every_steps}) and patience ({patience}) must be at least 1")
        self.score = score
        self.every_steps = every_steps
        self.patience = patience
        self.state = StoppingState()
        self.curve: list[dict] = []
        self.stopped_early = False
        self._best_weights: dict[str, torch.Tensor] | None = None

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every_steps == 0 or step == last_step

    def evaluate(self, model: PreTrainedModel, step: int, epoch: float) -> bool:
        """Scores the model at ``step``; returns whether training should stop."""
        overall, per_language = self.score(model)
        by_language = {language: float(value) for language, value in sorted(per_language.items())}
        self.curve.append({"step": step, "epoch": round(epoch, 4), "accuracy": float(overall),
                           "per_language": by_language})
        self.state, stop = after_dev_score(self.state, step, float(overall), self.patience)
        if self.state.best_step == step:
            self._best_weights = {name: parameter.detach().clone()
                                  for name, parameter in model.named_parameters() if parameter.requires_grad}
        self.stopped_early = stop
        return stop

    def restore_best(self, model: PreTrainedModel) -> None:
        if self._best_weights is None:
            return
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, weights in self._best_weights.items():
                parameters[name].copy_(weights)

    def describe_last(self, total_steps: int) -> str:
        last, state = self.curve[-1], self.state
        return (f"step {last['step']}/{total_steps}: dev accuracy {last['accuracy']:.1%} "
                f"(best {state.best_score:.1%} at step {state.best_step})")


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
    schedule: Literal["linear", "constant"] = "linear",
    dev: DevStopping | None = None,
    description: str = "training",
    show_progress: bool = True,
    bf16: bool = False,
    epoch_draws: Callable[[int], np.ndarray] | None = None,
) -> list[dict]:
    """Cross-entropy training over length-grouped batches, on the device the model is on; returns the
    loss history.

    ``epoch_draws(epoch)``: the rows a balanced epoch draws (``data.balance``), the same draws the
    feeder sends the teachers, so a hard-label baseline sees the distilled student's data.

    ``epochs`` may be fractional: 0.5 trains on half an epoch's batches. With ``dev``, it is the most
    training there will be: the run stops early when the dev score stops improving, and the model
    ends with the weights of its best dev score. The linear schedule warms up over ``warmup_ratio``
    of the whole budget and decays to 0 at its end, so an early stop leaves the rate where it was.
    """
    torch.manual_seed(seed)
    device = model_device(model)  # the caller puts the model where it trains
    samples_per_epoch = len(rows) if epoch_draws is None else len(epoch_draws(0))
    batches_per_epoch = math.ceil(samples_per_epoch / batch_size)
    total_steps = max(1, round(epochs * batches_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    if schedule == "constant":
        scheduler = get_constant_schedule(optimizer)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    model.train()
    history: list[dict] = []
    postfix: dict[str, str] = {}  # what the bar shows after the counts: the last loss and dev score
    step = 0
    stop = False
    with progress_bar(total_steps, description, "step", show_progress) as bar:
        for epoch in range(math.ceil(epochs)):
            if stop:
                break
            draws = None if epoch_draws is None else epoch_draws(epoch)
            for index in plan_epoch_batches(rows.lengths, batch_size, seed, epoch, True, draws):
                if step >= total_steps or stop:
                    break
                input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
                # A tagger learns each word's tag on its first sub-token (-100 elsewhere: ignored by the loss).
                labels = (rows.labels[index] if rows.token_labels is None
                          else pad_labels([rows.token_labels[i] for i in index], input_ids.shape[1]))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(
                        input_ids=torch.from_numpy(input_ids.astype(np.int64)).to(device),
                        attention_mask=torch.from_numpy(attention_mask.astype(np.int64)).to(device),
                        labels=torch.from_numpy(labels).to(device),
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
                    postfix["loss"] = f"{loss.item():.4f}"
                    bar.set_postfix(postfix, refresh=False)
                if dev is not None and dev.due(step, total_steps):
                    stop = dev.evaluate(model, step, step / batches_per_epoch)
                    model.train()
                    postfix["dev"] = f"{dev.curve[-1]['accuracy']:.1%}"
                    bar.set_postfix(postfix, refresh=False)
                    _report_dev_score(bar, dev, description, total_steps, show_progress)
    if dev is not None:
        dev.restore_best(model)
    return history


def _report_dev_score(bar, dev: DevStopping, description: str, total_steps: int, show_progress: bool) -> None:
    """Each dev score on a line of its own (the bar's time left is for the whole budget: an upper bound)."""
    line = f"{description}: {dev.describe_last(total_steps)}"
    if dev.stopped_early:
        line += f"; no new best in {dev.patience} scores, stopping"
    if show_progress:
        bar.write(line, file=bar.fp)
    else:
        log.info(line)
