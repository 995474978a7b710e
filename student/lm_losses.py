"""Causal-LM distillation losses as pure tensor functions (task: causal-lm).

The teacher ships, per token, its top-k logits, their vocabulary ids and the log-sum-exp of its
full logits (``wire.SoftLabels`` per token). The losses compare teacher and student over k + 1
buckets per position: the teacher's k most likely tokens plus one "rest" bucket for everything
else. On the teacher side ``topk_values - topk_logsumexp`` are its true log-probabilities of those
tokens (at temperature 1: the log-sum-exp makes them exact) and the rest bucket holds the missing
mass ``1 - Σ p``. On the student side the same k tokens are read from its own log-softmax and the
rest bucket is its exact mass outside them. Both are then distributions that sum to 1, and any
divergence between them is a lower bound of the divergence over the full vocabulary (the data-
processing inequality): the student is held to exactly what the teacher sent, no more.

Temperature is applied on the student's side only (``log_softmax(z_S / T)``): the teacher's bucket
distribution is exact only at T = 1 (the wire does not carry its tail at another T, see
``student.losses.soft_label_kl_topk``). With the default T = 1 this is plain matching; with T > 1
the student is trained so that its *softened* distribution matches the teacher's, i.e. its own
logits end up sharper than the teacher's. Like TRL's GKD losses, no T² factor is applied.

Divergences (p: teacher, q: student, per position over the k + 1 buckets):

- ``forward_kl``: KL(p ‖ q), mean-seeking, the classic distillation loss;
- ``reverse_kl``: KL(q ‖ p), mode-seeking (MiniLLM);
- ``gjs``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024) in TRL's
  convention: with the mixture m = β·p + (1 − β)·q, JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m).
  TRL's ``generalized_jsd_loss`` special-cases β = 0 as forward KL and β = 1 as reverse KL, and so
  does ``generalized_jsd`` here. The divergence itself tends to 0 at both ends; normalised, it
  interpolates between the two: JSD(β)/β → KL(p ‖ q) as β → 0 and JSD(β)/(1 − β) → KL(q ‖ p) as
  β → 1.

Next-token shift: the logits at position t predict token t + 1, for the teacher as for the
student. Every loss here therefore uses positions 0..L−2 of both the student's logits and the
teacher's top-k (``[:, :-1]``), and counts position t only when token t + 1 is a real token
(``next_token_mask``): the last real token predicts nothing in the text and padding predicts
nothing at all. The divergence is averaged over those counted positions of the whole batch
(token-weighted, as TRL's GKD does), and so is the hard next-token cross-entropy. Positions that
do not count are never read (``student.losses.select_valid``), and a batch in which none counts
gives 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from polydistill.student.losses import (
    _log1mexp,
    _select_valid_topk,
    _wide_float,
    hard_label_ce,
    masked_mean,
    select_valid,
)

LMLossKind = Literal["forward_kl", "reverse_kl", "gjs"]
LM_LOSS_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "gjs")

# The teacher's rest bucket is 1 − Σ top-k probabilities, computed from float32 numbers: when the
# top-k hold (nearly) all the mass it can round to 0 or below. It is floored here so that log p
# stays finite (reverse KL and the mixture would otherwise give inf); 1e-12 is far below any mass
# that matters and adds at most that much to the bucket sum.
MIN_REST_LOG_PROB = math.log(1e-12)


def next_token_mask(attention_mask: Tensor) -> Tensor:
    """``[n, L-1]`` bool: position t counts when tokens t and t + 1 are both real."""
    keep = attention_mask.to(torch.bool)
    return keep[:, :-1] & keep[:, 1:]


def topk_buckets(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    topk_logsumexp: Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities over the k + 1 buckets, each ``[..., k + 1]``
    (or ``[..., k]`` when k is the whole vocabulary and there is no rest).

    ``student_logits`` ``[..., V]``; ``topk_values`` / ``topk_indices`` ``[..., k]`` the teacher's
    raw logits (T = 1) and their ids; ``topk_logsumexp`` ``[...]`` its full log-sum-exp.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab, k = student_logits.shape[-1], topk_values.shape[-1]
    if topk_values.shape != topk_indices.shape:
        raise ValueError(f"topk_values {tuple(topk_values.shape)} and topk_indices {tuple(topk_indices.shape)} differ")
    if topk_values.shape[:-1] != student_logits.shape[:-1] or topk_logsumexp.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(topk_values.shape)} / logsumexp {tuple(topk_logsumexp.shape)} do not line up with "
            f"the student's logits {tuple(student_logits.shape)}"
        )
    if not 0 < k <= vocab:
        raise ValueError(f"top-k size {k} must be in 1..{vocab} (the student's vocabulary)")
    teacher_topk = _wide_float(topk_values) - _wide_float(topk_logsumexp).unsqueeze(-1)
    student_scaled = _wide_float(student_logits) / temperature
    student_all = F.log_softmax(student_scaled, dim=-1)
    indices = topk_indices.long()
    student_topk = student_all.gather(-1, indices)
    if k == vocab:
        return teacher_topk, student_topk
    teacher_rest = _log1mexp(torch.logsumexp(teacher_topk, dim=-1)).clamp_min(MIN_REST_LOG_PROB)
    # The student's rest mass, from its logits with the top-k masked out: exact, never 1 − Σ.
    outside = student_scaled.scatter(-1, indices, float("-inf"))
    student_rest = torch.logsumexp(outside, dim=-1) - torch.logsumexp(student_scaled, dim=-1)
    return (torch.cat([teacher_topk, teacher_rest.unsqueeze(-1)], dim=-1),
            torch.cat([student_topk, student_rest.unsqueeze(-1)], dim=-1))


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities; buckets with p = 0 add 0."""
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def generalized_jsd(teacher_log_probs: Tensor, student_log_probs: Tensor, beta: float) -> Tensor:
    """β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with m = β·p + (1 − β)·q (TRL's convention, p the teacher);
    β = 0 is forward KL(p ‖ q) and β = 1 reverse KL(q ‖ p), as in TRL."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return kl_divergence(teacher_log_probs, student_log_probs)
    if beta == 1:
        return kl_divergence(student_log_probs, teacher_log_probs)
    mixture = torch.logsumexp(torch.stack([teacher_log_probs + math.log(beta),
                                           student_log_probs + math.log1p(-beta)]), dim=0)
    return (beta * kl_divergence(teacher_log_probs, mixture)
            + (1 - beta) * kl_divergence(student_log_probs, mixture))


def divergence(teacher_log_probs: Tensor, student_log_probs: Tensor, kind: LMLossKind, beta: float = 0.5) -> Tensor:
    """The chosen divergence per position (reduces the last dimension)."""
    if kind == "forward_kl":
        return kl_divergence(teacher_log_probs, student_log_probs)
    if kind == "reverse_kl":
        return kl_divergence(student_log_probs, teacher_log_probs)
    if kind == "gjs":
        return generalized_jsd(teacher_log_probs, student_log_probs, beta)
    raise ValueError(f"unknown LM loss {kind!r}; expected one of {LM_LOSS_KINDS}")


def lm_distillation_loss(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    topk_logsumexp: Tensor,
    attention_mask: Tensor,
    *,
    kind: LMLossKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """The chosen divergence between teacher and student next-token distributions, averaged over
    the positions that predict a real token. Shapes: logits ``[n, L, V]``, top-k ``[n, L, k]``,
    logsumexp and mask ``[n, L]``."""
    if student_logits.ndim != 3:
        raise ValueError(f"expected student logits [n, L, V], got {tuple(student_logits.shape)}")
    counted = next_token_mask(attention_mask)
    student = select_valid(student_logits[:, :-1], counted)
    message = _select_valid_topk(topk_values[:, :-1], topk_indices[:, :-1], topk_logsumexp[:, :-1], counted,
                                 num_classes=student_logits.shape[-1])
    teacher_log_probs, student_log_probs = topk_buckets(student, *message, temperature=temperature)
    return masked_mean(divergence(teacher_log_probs, student_log_probs, kind, beta), counted)


def next_token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(−log q(token t+1 | ≤ t) ``[n, L-1]``, the mask of positions that count ``[n, L-1]``).

    Neither the logits nor the ids of a position that does not count are read: its nll is that of
    a uniform prediction of token 0, finite and meaningless, for the caller to mask out."""
    counted = next_token_mask(attention_mask)
    log_probs = F.log_softmax(_wide_float(select_valid(logits[:, :-1], counted)), dim=-1)
    next_ids = select_valid(input_ids[:, 1:], counted, fill=0).long()
    nll = -log_probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    return nll, counted


def next_token_ce(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The hard-label term of a causal LM: cross-entropy on the text itself, mean over real tokens."""
    nll, mask = next_token_nll(logits, input_ids, attention_mask)
    return masked_mean(nll, mask)


# -- masked LM (task: masked-lm) -----------------------------------------------------------------
# No shift: the logits at a masked position predict the token that was there. Only masked
# positions count (``token_labels`` != -100); the teacher saw the same corrupted input.
# These losses select the counted positions by boolean indexing rather than `select_valid`: a
# masked-LM batch hides about one position in seven, and computing over the vocabulary at the
# others only to discard them would cost several times the memory. Indexing is a selection all
# the same: nothing outside it is read, and its gradient there is exactly 0.

def masked_positions(token_labels: Tensor) -> Tensor:
    """``[n, L]`` bool: the positions a masked-LM batch hid (labels other than -100)."""
    return token_labels != -100


def masked_lm_distillation_loss(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    topk_logsumexp: Tensor,
    token_labels: Tensor,
    *,
    kind: LMLossKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """The chosen divergence at the masked positions, averaged over them (shapes as
    ``lm_distillation_loss``, ``token_labels`` ``[n, L]``); 0 when no position is masked."""
    counted = masked_positions(token_labels)
    teacher_log_probs, student_log_probs = topk_buckets(
        student_logits[counted], topk_values[counted], topk_indices[counted], topk_logsumexp[counted],
        temperature=temperature)
    return masked_mean(divergence(teacher_log_probs, student_log_probs, kind, beta))


def masked_lm_ce(student_logits: Tensor, token_labels: Tensor) -> Tensor:
    """The hard term: cross-entropy on the original tokens of the masked positions; 0 when none is masked."""
    counted = masked_positions(token_labels)
    return hard_label_ce(student_logits[counted], token_labels[counted])
