"""Every loss that takes a mask must never read what lies outside it.

Padding on the wire may hold anything (fp16 overflow, uninitialised memory), and so may a
student's own outputs at positions that do not count. Each case below builds a small batch,
writes NaN or ±inf into the positions its mask excludes (on the teacher's side and, where the
student has such positions, on the student's), and checks that the loss and every gradient are
finite and equal to those of the clean batch. Integer inputs (top-k ids, token ids) get ids
outside the vocabulary instead, which an unguarded gather would trip over.

A second test gives each loss a batch in which nothing counts: the loss must be 0 and every
gradient 0, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from polydistill.student.lm_losses import (
    lm_distillation_loss,
    masked_lm_ce,
    masked_lm_distillation_loss,
    next_token_ce,
    next_token_mask,
)
from polydistill.student.losses import (
    HiddenProjection,
    attention_kl,
    embedding_loss,
    ensemble_log_probs,
    hard_label_ce,
    hidden_state_loss,
    mean_pool,
    minilm_relation_loss,
    soft_label_kl,
    soft_label_kl_topk,
)

SAMPLES, TOKENS, CLASSES, TOP_K, HEADS = 2, 4, 7, 3, 2
TEMPERATURE = 2.0
LM_KINDS = ("forward_kl", "reverse_kl", "gjs")

# A case builds its batch with `garbage` (None: a clean batch) written where its mask says
# "padding", and returns the loss and the tensors whose gradients must stay finite.
Case = Callable[[float | None, bool], tuple[Tensor, list[Tensor]]]


def token_mask(nothing_counts: bool) -> Tensor:
    """Row 0 has four real tokens, row 1 two and then padding."""
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return torch.zeros_like(mask) if nothing_counts else mask


def spoil(tensor: Tensor, padded: Tensor, garbage: float | None) -> Tensor:
    """A copy of `tensor` with `garbage` wherever `padded` (its leading shape) is True."""
    if garbage is None:
        return tensor.clone()
    padded = padded.reshape(padded.shape + (1,) * (tensor.dim() - padded.dim())).expand_as(tensor)
    if tensor.is_floating_point():
        return tensor.masked_fill(padded, garbage)
    limits = torch.iinfo(tensor.dtype)
    bad_id = -1 if math.isnan(garbage) else limits.max if garbage > 0 else limits.min
    return tensor.masked_fill(padded, bad_id)


def leaf(tensor: Tensor) -> Tensor:
    return tensor.detach().requires_grad_()


def seeded_projection(student_width: int, teacher_width: int, generator: torch.Generator) -> HiddenProjection:
    projection = HiddenProjection(student_width, teacher_width)
    with torch.no_grad():
        projection.linear.weight.copy_(torch.randn(teacher_width, student_width, generator=generator))
        projection.linear.bias.copy_(torch.randn(teacher_width, generator=generator))
    return projection


def topk_message(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    values, indices = teacher_logits.topk(k, dim=-1)
    return values, indices, torch.logsumexp(teacher_logits, dim=-1)


def spoiled_message(teacher_logits: Tensor, k: int, padded: Tensor, garbage: float | None):
    return tuple(spoil(part, padded, garbage) for part in topk_message(teacher_logits, k))


# --------------------------------------------------------------------------- classification-style losses


def soft_labels_per_token(garbage, nothing_counts):
    generator = torch.Generator().manual_seed(0)
    mask = token_mask(nothing_counts)
    student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), ~mask, garbage))
    teacher = spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator) * 3, ~mask, garbage)
    return soft_label_kl(student, teacher, temperature=TEMPERATURE, mask=mask), [student]


def soft_labels_per_sample(garbage, nothing_counts):
    generator = torch.Generator().manual_seed(1)
    counted = torch.tensor([False, False]) if nothing_counts else torch.tensor([True, False])
    student = leaf(spoil(torch.randn(SAMPLES, CLASSES, generator=generator), ~counted, garbage))
    teacher = spoil(torch.randn(SAMPLES, CLASSES, generator=generator) * 3, ~counted, garbage)
    return soft_label_kl(student, teacher, temperature=TEMPERATURE, mask=counted), [student]


def topk_soft_labels(k: int) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(2)
        mask = token_mask(nothing_counts)
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), ~mask, garbage))
        teacher = torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator) * 3
        message = spoiled_message(teacher, k, ~mask, garbage)
        return soft_label_kl_topk(student, *message, temperature=TEMPERATURE, mask=mask), [student]

    return case


def ensemble_of_two_teachers(garbage, nothing_counts):
    """Teacher b did not serve row 0: its logits there are padding."""
    generator = torch.Generator().manual_seed(3)
    served_a, served_b = torch.tensor([True, True]), torch.tensor([False, True])
    teacher_a = torch.randn(SAMPLES, CLASSES, generator=generator)
    teacher_b = spoil(torch.randn(SAMPLES, CLASSES, generator=generator), ~served_b, garbage)
    student = leaf(torch.randn(SAMPLES, CLASSES, generator=generator))
    mixture = ensemble_log_probs([teacher_a, teacher_b], [served_a, served_b], [1.0, 2.0], temperature=TEMPERATURE)
    return soft_label_kl(student, TEMPERATURE * mixture, temperature=TEMPERATURE), [student]


def hard_labels_per_token(garbage, nothing_counts):
    generator = torch.Generator().manual_seed(4)
    mask = token_mask(nothing_counts)
    student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), ~mask, garbage))
    labels = torch.randint(0, CLASSES, (SAMPLES, TOKENS), generator=generator).masked_fill(~mask, -100)
    return hard_label_ce(student, labels), [student]


# --------------------------------------------------------------------------- feature losses


def hidden_states(kind: str) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(5)
        mask = token_mask(nothing_counts)
        projection = seeded_projection(4, 6, generator)
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, 4, generator=generator), ~mask, garbage))
        teacher = spoil(torch.randn(SAMPLES, TOKENS, 6, generator=generator), ~mask, garbage)
        loss = hidden_state_loss(student, teacher, mask=mask, kind=kind, projection=projection)
        return loss, [student, *projection.parameters()]

    return case


def pooled_embeddings(kind: str) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(6)
        mask = token_mask(nothing_counts)
        projection = seeded_projection(4, 6, generator)
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, 4, generator=generator), ~mask, garbage))
        teacher_embeddings = torch.randn(SAMPLES, 6, generator=generator)
        loss = embedding_loss(mean_pool(student, mask), teacher_embeddings, kind=kind, projection=projection)
        return loss, [student, *projection.parameters()]

    return case


# --------------------------------------------------------------------------- attention losses


def attention_maps(garbage, nothing_counts):
    """The mask names queries: the rows of padded queries are padding. (A real query's weights on
    padded keys are the model's own zeros, and attention_kl reads them as given.)"""
    generator = torch.Generator().manual_seed(7)
    mask = token_mask(nothing_counts)
    padded_key = ~mask[:, None, None, :]
    padded = ~mask[:, None, :, None]

    def attention(scale: float) -> Tensor:
        scores = torch.randn(SAMPLES, HEADS, TOKENS, TOKENS, generator=generator) * scale
        return scores.masked_fill(padded_key, torch.finfo(scores.dtype).min).softmax(-1)

    student = leaf(spoil(attention(1.0), padded, garbage))
    teacher = spoil(attention(2.0), padded, garbage)
    return attention_kl(student, teacher, mask=mask), [student]


def minilm_relations(garbage, nothing_counts):
    generator = torch.Generator().manual_seed(8)
    mask = token_mask(nothing_counts)
    student = leaf(spoil(torch.randn(SAMPLES, TOKENS, 8, generator=generator), ~mask, garbage))
    teacher = spoil(torch.randn(SAMPLES, TOKENS, 12, generator=generator), ~mask, garbage)
    loss = minilm_relation_loss(student, teacher, mask=mask, num_relation_heads=4, temperature=TEMPERATURE)
    return loss, [student]


# --------------------------------------------------------------------------- language-model losses


def uncounted_predictions(mask: Tensor) -> Tensor:
    """``[n, L]``: positions whose prediction counts for nothing (the next token is padding, or there is none)."""
    counted = next_token_mask(mask)
    return ~torch.cat([counted, torch.zeros_like(counted[:, :1])], dim=1)


def causal_lm_distillation(kind: str) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(9)
        mask = token_mask(nothing_counts)
        uncounted = uncounted_predictions(mask)
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), uncounted, garbage))
        teacher = torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator) * 2
        message = spoiled_message(teacher, TOP_K, uncounted, garbage)
        loss = lm_distillation_loss(student, *message, mask.long(), kind=kind, temperature=TEMPERATURE, beta=0.3)
        return loss, [student]

    return case


def causal_lm_cross_entropy(garbage, nothing_counts):
    generator = torch.Generator().manual_seed(10)
    mask = token_mask(nothing_counts)
    logits = torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator)
    student = leaf(spoil(logits, uncounted_predictions(mask), garbage))
    input_ids = spoil(torch.randint(0, CLASSES, (SAMPLES, TOKENS), generator=generator), ~mask, garbage)
    return next_token_ce(student, input_ids, mask.long()), [student]


def hidden_token_labels(nothing_counts: bool, generator: torch.Generator) -> Tensor:
    """Masked LM: positions 1 of row 0 and 0 of row 1 were hidden; everything else is -100."""
    labels = torch.full((SAMPLES, TOKENS), -100)
    if not nothing_counts:
        labels[0, 1], labels[1, 0] = torch.randint(0, CLASSES, (2,), generator=generator).tolist()
    return labels


def decoder_target_labels(nothing_counts: bool, generator: torch.Generator) -> Tensor:
    """Seq2seq: every target token counts, the padding after a shorter target does not."""
    targets = torch.randint(0, CLASSES, (SAMPLES, TOKENS), generator=generator)
    return targets.masked_fill(~token_mask(nothing_counts), -100)


def labelled_positions_distillation(labels_for: Callable[[bool, torch.Generator], Tensor], kind: str) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(11)
        labels = labels_for(nothing_counts, generator)
        ignored = labels == -100
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), ignored, garbage))
        teacher = torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator) * 2
        message = spoiled_message(teacher, TOP_K, ignored, garbage)
        loss = masked_lm_distillation_loss(student, *message, labels, kind=kind, temperature=TEMPERATURE, beta=0.3)
        return loss, [student]

    return case


def labelled_positions_cross_entropy(labels_for: Callable[[bool, torch.Generator], Tensor]) -> Case:
    def case(garbage, nothing_counts):
        generator = torch.Generator().manual_seed(12)
        labels = labels_for(nothing_counts, generator)
        student = leaf(spoil(torch.randn(SAMPLES, TOKENS, CLASSES, generator=generator), labels == -100, garbage))
        return masked_lm_ce(student, labels), [student]

    return case


MASKED_CASES: dict[str, Case] = {
    "soft_label_kl per token": soft_labels_per_token,
    "soft_label_kl per sample": soft_labels_per_sample,
    "soft_label_kl_topk k<C": topk_soft_labels(TOP_K),
    "soft_label_kl_topk k=C": topk_soft_labels(CLASSES),
    "hard_label_ce per token": hard_labels_per_token,
    "hidden_state_loss mse": hidden_states("mse"),
    "hidden_state_loss cosine": hidden_states("cosine"),
    "attention_kl": attention_maps,
    "minilm_relation_loss": minilm_relations,
    **{f"lm_distillation_loss {kind}": causal_lm_distillation(kind) for kind in LM_KINDS},
    "next_token_ce": causal_lm_cross_entropy,
    **{f"masked_lm_distillation_loss {kind}": labelled_positions_distillation(hidden_token_labels, kind)
       for kind in LM_KINDS},
    "masked_lm_ce": labelled_positions_cross_entropy(hidden_token_labels),
    "seq2seq masked_lm_distillation_loss": labelled_positions_distillation(decoder_target_labels, "forward_kl"),
    "seq2seq masked_lm_ce": labelled_positions_cross_entropy(decoder_target_labels),
}
# Losses whose padding is masked upstream (mean_pool) or which have no "nothing counts" batch
# (every ensemble row is served by someone).
OTHER_CASES: dict[str, Case] = {
    "mean_pool + embedding_loss mse": pooled_embeddings("mse"),
    "mean_pool + embedding_loss cosine": pooled_embeddings("cosine"),
    "ensemble_log_probs + soft_label_kl": ensemble_of_two_teachers,
}
ALL_CASES = {**MASKED_CASES, **OTHER_CASES}


def loss_and_gradients(case: Case, garbage: float | None, nothing_counts: bool = False):
    loss, inputs = case(garbage, nothing_counts)
    return loss.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("case", list(ALL_CASES.values()), ids=list(ALL_CASES))
def test_garbage_in_padding_reaches_neither_the_loss_nor_any_gradient(case, garbage):
    clean_loss, clean_gradients = loss_and_gradients(case, None)
    loss, gradients = loss_and_gradients(case, garbage)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(gradient).all() for gradient in gradients)
    torch.testing.assert_close(loss, clean_loss)
    for gradient, clean_gradient in zip(gradients, clean_gradients):
        torch.testing.assert_close(gradient, clean_gradient)


@pytest.mark.parametrize("garbage", [None, math.nan], ids=["clean", "nan"])
@pytest.mark.parametrize("case", list(MASKED_CASES.values()), ids=list(MASKED_CASES))
def test_a_batch_where_nothing_counts_gives_zero_loss_and_zero_gradients(case, garbage):
    loss, gradients = loss_and_gradients(case, garbage, nothing_counts=True)
    assert loss.item() == 0.0
    for gradient in gradients:
        assert torch.equal(gradient, torch.zeros_like(gradient))


def test_sentence_embeddings_of_an_empty_batch_give_zero_loss():
    projection = HiddenProjection(4, 6)
    student = torch.zeros(0, 3, 4, requires_grad=True)
    pooled = mean_pool(student, torch.zeros(0, 3, dtype=torch.bool))
    loss = embedding_loss(pooled, torch.zeros(0, 6), kind="cosine", projection=projection)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(projection.linear.weight.grad, torch.zeros_like(projection.linear.weight))


def test_a_sentence_made_only_of_padding_pools_to_zero_not_nan():
    hidden = torch.full((1, 3, 4), math.nan, requires_grad=True)
    pooled = mean_pool(hidden, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(pooled, torch.zeros(1, 4))
    pooled.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("loss", ["soft_label_kl", "soft_label_kl_topk", "hard_label_ce"])
def test_an_empty_batch_gives_zero_loss(loss):
    student = torch.zeros(0, CLASSES, requires_grad=True)
    if loss == "soft_label_kl":
        value = soft_label_kl(student, torch.zeros(0, CLASSES), temperature=TEMPERATURE)
    elif loss == "soft_label_kl_topk":
        value = soft_label_kl_topk(student, *topk_message(torch.zeros(0, CLASSES), TOP_K), temperature=TEMPERATURE)
    else:
        value = hard_label_ce(student, torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and student.grad.shape == (0, CLASSES)
