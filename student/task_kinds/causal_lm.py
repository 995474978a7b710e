"""Causal language modelling (its spec: cluster/task_specs/causal_lm.py).

The teacher ships its top-k next-token distribution at every position of plain text; the student
learns it through the divergence distill.lm_loss names and the text's own next tokens, and is scored
by perplexity, next-token accuracy and agreement with the teacher per language (student/lm_eval.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from polydistill.cluster.task_specs.causal_lm import SPEC
from polydistill.storage import wire
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.lm_eval import lm_quality
from polydistill.student.lm_losses import lm_distillation_loss, next_token_ce
from polydistill.student.losses import combine_losses
from polydistill.student.objectives import (
    Objective,
    TaskHead,
    id_tensor,
    lm_forward,
    lm_loss_settings,
    no_labels,
    token_top_k,
)
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest, TaskKind, scored_on_rows


def causal_lm_loss(logits: Tensor, knowledge: wire.Knowledge, labels: None,
                   head: TaskHead) -> tuple[Tensor, dict[str, float]]:
    """The chosen divergence from the teacher's per-token top-k (distill.lm_loss, weighed by soft_weight) and
    cross-entropy on the text's next tokens (hard_weight)."""
    work, distill, device = knowledge.work, head.config.distill, logits.device
    mask = torch.from_numpy(work.attention_mask.astype(np.bool_)).to(device)
    terms: dict[str, Tensor] = {}
    if distill.soft_weight > 0:
        terms["soft"] = lm_distillation_loss(logits, *token_top_k(knowledge, device, head.config.task), mask,
                                             **lm_loss_settings(distill))
    if distill.hard_weight > 0:
        terms["hard"] = next_token_ce(logits, id_tensor(work.input_ids, device), mask)
    return combine_losses(terms, {"soft": distill.soft_weight, "hard": distill.hard_weight})


def score_next_tokens(held_out: HeldOut, tested: ModelUnderTest, rows: TokenizedSplit, pad_id: int,
                      reference: dict | None) -> dict:
    return lm_quality(tested.model, rows, pad_id, reference=reference)


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=no_labels, forward=lm_forward, loss=causal_lm_loss),
    evaluate=scored_on_rows(score_next_tokens),
    metric="next-token accuracy",  # per language beside perplexity and agreement (student/lm_eval.py)
)
