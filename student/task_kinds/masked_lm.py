"""Masked language modelling (its spec: cluster/task_specs/masked_lm.py).

Every work batch masks its texts (BERT's 80/10/10 recipe, storage/masking.py; a fresh draw per
sample and epoch, the same in any process); the teacher ships its top-k over the vocabulary at every
position and the student learns it, and the original tokens, at the masked positions. Scored by
masked-token accuracy and pseudo-perplexity on held-out text masked once, the same way for every model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from polydistill.cluster.config import JobConfig
from polydistill.cluster.task_specs.masked_lm import SPEC
from polydistill.storage import wire
from polydistill.storage.job_data import TokenizedSplit, pad_rows
from polydistill.storage.masking import IGNORE, mask_tokens
from polydistill.student.contract import ContractError
from polydistill.student.lm_eval import lm_quality
from polydistill.student.lm_losses import masked_lm_ce, masked_lm_distillation_loss
from polydistill.student.losses import combine_losses
from polydistill.student.objectives import (
    Counts,
    Objective,
    TaskHead,
    lm_forward,
    lm_loss_settings,
    missing_knowledge,
    token_top_k,
)
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest, TaskKind, WorkTokens, scored_on_rows

# Held-out text is masked with this epoch number: one fixed draw, never one of training's epochs.
EVAL_MASKING_EPOCH = 2**31 - 1


def masked_tokens(config: JobConfig, tokenizer, pad_id: int) -> WorkTokens:
    """The texts with their masked positions' tokens replaced, and the original tokens there as labels
    (-100 elsewhere)."""
    if tokenizer.mask_token_id is None:
        raise ValueError(f"task masked-lm: the teacher's tokenizer in {tokenizer.name_or_path} has no mask token")
    mask_id, vocab_size, special_ids = tokenizer.mask_token_id, len(tokenizer), frozenset(tokenizer.all_special_ids)

    def tokens(rows: TokenizedSplit, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        masked = [mask_tokens(rows.token_ids[i], seed=config.training.seed, epoch=epoch,
                              sample_id=int(rows.sample_ids[i]), mask_id=mask_id, vocab_size=vocab_size,
                              special_ids=special_ids, rate=config.distill.mask_rate) for i in indices]
        input_ids, attention_mask = pad_rows([ids for ids, _ in masked], pad_id)
        token_labels = np.full(input_ids.shape, IGNORE, dtype=np.int64)
        for row, (_, labels) in enumerate(masked):
            token_labels[row, : len(labels)] = labels
        return input_ids, attention_mask, token_labels

    return tokens


def masked_token_labels(knowledge: wire.Knowledge, config: JobConfig) -> tuple[np.ndarray, Counts]:
    """The original tokens of the masked positions (-100 elsewhere)."""
    if knowledge.work.token_labels is None:
        raise ContractError(missing_knowledge(knowledge, "the masked positions' labels", "task masked-lm"))
    return knowledge.work.token_labels, {}


def masked_lm_loss(logits: Tensor, knowledge: wire.Knowledge, labels: np.ndarray,
                   head: TaskHead) -> tuple[Tensor, dict[str, float]]:
    """As the causal LM's loss at the masked positions only (no shift): their original tokens are ``labels``."""
    distill, device = head.config.distill, logits.device
    masked = torch.from_numpy(labels).to(device)
    terms: dict[str, Tensor] = {}
    if distill.soft_weight > 0:
        terms["soft"] = masked_lm_distillation_loss(logits, *token_top_k(knowledge, device, head.config.task),
                                                    masked, **lm_loss_settings(distill))
    if distill.hard_weight > 0:
        terms["hard"] = masked_lm_ce(logits, masked)
    return combine_losses(terms, {"soft": distill.soft_weight, "hard": distill.hard_weight})


def eval_masking(config: JobConfig, tokenizer, rows: TokenizedSplit) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """Row i of the held-out split as every model sees it: masked the same way for all of them."""
    special = frozenset(tokenizer.all_special_ids)

    def masked(i: int):
        return mask_tokens(rows.token_ids[i], seed=config.training.seed, epoch=EVAL_MASKING_EPOCH,
                           sample_id=int(rows.sample_ids[i]), mask_id=tokenizer.mask_token_id,
                           vocab_size=len(tokenizer), special_ids=special, rate=config.distill.mask_rate)
    return masked


def score_masked_tokens(held_out: HeldOut, tested: ModelUnderTest, rows: TokenizedSplit, pad_id: int,
                        reference: dict | None) -> dict:
    return lm_quality(tested.model, rows, pad_id, reference=reference,
                      masking=eval_masking(held_out.config, tested.tokenizer, rows))


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=masked_token_labels, forward=lm_forward, loss=masked_lm_loss),
    evaluate=scored_on_rows(score_masked_tokens),
    metric="masked-token accuracy",
    work_tokens=masked_tokens,
)
