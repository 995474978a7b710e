"""Causal-LM losses against values worked out by hand on a 4-token vocabulary.

Reference distributions over the buckets (top-2 tokens of the teacher, then the rest):
  teacher p = [1/2, 1/4 | 1/4]: top-2 logits [ln 1/2, ln 1/4] with log-sum-exp 0
  student q = [1/8, 1/8 | 3/4]: logits ln [1/8, 1/8, 3/8, 3/8] (the rest bucket sums tokens 2 and 3)
  KL(p ‖ q) = 1/2 ln 4 + 1/4 ln 2 + 1/4 ln(1/3) = 5/4 ln 2 − 1/4 ln 3 = 0.591...
  KL(q ‖ p) = 1/8 ln(1/4) + 1/8 ln(1/2) + 3/4 ln 3 = −3/8 ln 2 + 3/4 ln 3 = 0.564...
"""

import math

import numpy as np
import pytest
import torch

from polydistill.student.lm_losses import (
    MIN_REST_LOG_PROB,
    divergence,
    generalized_jsd,
    kl_divergence,
    lm_distillation_loss,
    next_token_ce,
    next_token_mask,
    topk_buckets,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
P = [0.5, 0.25, 0.25]
Q = [0.125, 0.125, 0.75]
FORWARD = 1.25 * LN2 - 0.25 * LN3
REVERSE = -0.375 * LN2 + 0.75 * LN3


def kl(a, b) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def gjs(p, q, beta) -> float:
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference_message(dtype=torch.float32):
    """One position: the teacher's top-2 message and the student's logits, as above."""
    values = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=dtype)
    indices = torch.tensor([[0, 1]])
    logsumexp = torch.tensor([0.0], dtype=dtype)
    student = torch.log(torch.tensor([[0.125, 0.125, 0.375, 0.375]], dtype=dtype)).requires_grad_()
    return student, values, indices, logsumexp


def topk_message(teacher_logits: torch.Tensor, k: int):
    values, indices = teacher_logits.topk(k, dim=-1)
    return values, indices, torch.logsumexp(teacher_logits, dim=-1)


# --------------------------------------------------------------------------- buckets


def test_buckets_hold_the_true_teacher_probabilities_and_a_rest_bucket():
    student, values, indices, logsumexp = reference_message()
    teacher_log, student_log = topk_buckets(student, values, indices, logsumexp)
    assert teacher_log.exp().tolist()[0] == pytest.approx(P)
    assert student_log.exp().tolist()[0] == pytest.approx(Q)


def test_teacher_topk_is_renormalised_with_its_logsumexp_not_among_themselves():
    # Logits [2, 1, 0, -1]: the top-2 hold e²/S and e/S of S = e² + e + 1 + 1/e, the rest (1 + 1/e)/S.
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    total = math.e**2 + math.e + 1 + 1 / math.e
    teacher_log, _ = topk_buckets(torch.zeros(1, 4), *topk_message(teacher, 2))
    assert teacher_log.exp().tolist()[0] == pytest.approx([math.e**2 / total, math.e / total, (1 + 1 / math.e) / total])


def test_temperature_applies_to_the_student_only():
    student, values, indices, logsumexp = reference_message()
    teacher_log, student_log = topk_buckets(student, values, indices, logsumexp, temperature=2.0)
    assert teacher_log.exp().tolist()[0] == pytest.approx(P)
    soft = [math.sqrt(x) for x in (0.125, 0.125, 0.375, 0.375)]  # q^(1/2), renormalised
    total = sum(soft)
    assert student_log.exp().tolist()[0] == pytest.approx([soft[0] / total, soft[1] / total, (soft[2] + soft[3]) / total])


def test_a_teacher_whose_topk_hold_all_mass_gets_a_floored_rest():
    teacher = torch.tensor([[0.0, 0.0, -200.0, -200.0]])  # the tail is exp(-200): 0 in float32
    teacher_log, _ = topk_buckets(torch.zeros(1, 4), *topk_message(teacher, 2))
    assert teacher_log[0, 2].item() == pytest.approx(MIN_REST_LOG_PROB)
    loss = divergence(*topk_buckets(torch.zeros(1, 4), *topk_message(teacher, 2)), "reverse_kl")
    assert torch.isfinite(loss).all()


def test_with_k_equal_to_the_vocabulary_there_is_no_rest_bucket():
    teacher = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    teacher_log, student_log = topk_buckets(torch.zeros(1, 4), *topk_message(teacher, 4))
    assert teacher_log.shape == student_log.shape == (1, 4)
    assert teacher_log.exp().sum().item() == pytest.approx(1.0)


def test_buckets_reject_misaligned_shapes():
    with pytest.raises(ValueError, match="line up"):
        topk_buckets(torch.zeros(2, 4), *topk_message(torch.zeros(3, 4), 2))
    with pytest.raises(ValueError, match="top-k size"):
        topk_buckets(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))


# --------------------------------------------------------------------------- divergences


def test_forward_and_reverse_kl_match_the_hand_values_and_differ():
    student, values, indices, logsumexp = reference_message()
    buckets = topk_buckets(student, values, indices, logsumexp)
    forward = divergence(*buckets, "forward_kl").item()
    reverse = divergence(*buckets, "reverse_kl").item()
    assert forward == pytest.approx(FORWARD) and FORWARD == pytest.approx(0.59178, abs=1e-5)
    assert reverse == pytest.approx(REVERSE) and REVERSE == pytest.approx(0.56403, abs=1e-5)
    assert forward != pytest.approx(reverse, abs=1e-3)  # KL is not symmetric


def test_gjs_matches_the_mixture_formula():
    student, values, indices, logsumexp = reference_message()
    buckets = topk_buckets(student, values, indices, logsumexp)
    for beta in (0.1, 0.5, 0.9):
        assert divergence(*buckets, "gjs", beta=beta).item() == pytest.approx(gjs(P, Q, beta))
    # β = 1/2 by hand: m = [5/16, 3/16, 1/2].
    by_hand = 0.5 * (0.5 * math.log(8 / 5) + 0.25 * math.log(4 / 3) + 0.25 * math.log(0.5)) + 0.5 * (
        0.125 * math.log(2 / 5) + 0.125 * math.log(2 / 3) + 0.75 * math.log(1.5))
    assert divergence(*buckets, "gjs", beta=0.5).item() == pytest.approx(by_hand)


def test_gjs_lies_between_forward_and_reverse_kl():
    """TRL's convention: β = 0 is forward KL, β = 1 reverse KL; in between, normalised by β (or 1 − β), the
    divergence moves from one to the other, and it stays below the convex bound β(1 − β)(KL + KL')."""
    student, values, indices, logsumexp = reference_message(torch.float64)  # the limits need the precision
    teacher_log, student_log = topk_buckets(student, values, indices, logsumexp)
    assert generalized_jsd(teacher_log, student_log, 0.0).item() == pytest.approx(FORWARD)
    assert generalized_jsd(teacher_log, student_log, 1.0).item() == pytest.approx(REVERSE)
    assert generalized_jsd(teacher_log, student_log, 1e-4).item() / 1e-4 == pytest.approx(FORWARD, rel=1e-3)
    assert generalized_jsd(teacher_log, student_log, 1 - 1e-4).item() / 1e-4 == pytest.approx(REVERSE, rel=1e-3)
    for beta in (0.1, 0.3, 0.5, 0.7, 0.9):
        value = generalized_jsd(teacher_log, student_log, beta).item()
        assert 0 < value <= beta * (1 - beta) * (FORWARD + REVERSE)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(teacher_log, student_log, 1.5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "gjs"])
def test_zero_when_the_student_equals_the_teacher(kind):
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.ones(2, 5, dtype=torch.long)
    loss = lm_distillation_loss(logits, *topk_message(logits, 4), mask, kind=kind)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "gjs"])
def test_gradients_reach_the_student_logits(kind):
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 6, 13, generator=generator) * 2
    student = torch.randn(2, 6, 13, generator=generator).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    loss = lm_distillation_loss(student, *topk_message(teacher, 3), mask, kind=kind, temperature=1.5, beta=0.3)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(student.grad).all()
    assert student.grad[0, :5].abs().sum() > 0
    # Positions that predict nothing get no gradient: the last of each row, and every padded one.
    assert student.grad[0, 5].abs().sum() == 0 and student.grad[1, 2:].abs().sum() == 0
    # A few steps of gradient descent on the student's logits bring it closer to the teacher.
    optimiser = torch.optim.SGD([student], lr=2.0)
    for _ in range(20):
        optimiser.zero_grad()
        lm_distillation_loss(student, *topk_message(teacher, 3), mask, kind=kind, beta=0.3).backward()
        optimiser.step()
    assert lm_distillation_loss(student, *topk_message(teacher, 3), mask, kind=kind, beta=0.3).item() < loss.item()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown LM loss"):
        divergence(torch.zeros(1, 3), torch.zeros(1, 3), "js")


# --------------------------------------------------------------------------- shift and masking


def test_next_token_mask_counts_positions_whose_next_token_is_real():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert next_token_mask(mask).tolist() == [[True, True, True], [True, False, False], [False, False, False]]


def test_distillation_shifts_and_averages_over_real_next_tokens_only():
    """Row 0 has 3 tokens (positions 0 and 1 predict tokens 1 and 2), row 1 has 2 (position 0 predicts
    token 1). Position 0 of row 0 carries the reference pair, every other counted position a zero-loss pair;
    the last position and the padding carry a wildly different teacher that must not count."""
    vocab = 4
    student = torch.zeros(2, 3, vocab)
    values = torch.zeros(2, 3, 2)
    indices = torch.tensor([[0, 1]]).expand(2, 3, 2).clone()
    logsumexp = torch.full((2, 3), math.log(vocab))  # a uniform teacher matches the zero-logit student...
    values[:] = 0.0
    ref_student, ref_values, _, ref_lse = reference_message()
    student[0, 0] = ref_student.detach()[0]
    values[0, 0], logsumexp[0, 0] = ref_values[0], ref_lse[0]
    values[0, 2] = torch.tensor([50.0, -50.0])  # ...except at positions that predict nothing
    values[1, 1:] = torch.tensor([50.0, -50.0])
    logsumexp[0, 2] = logsumexp[1, 1] = logsumexp[1, 2] = 50.0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss = lm_distillation_loss(student, values, indices, logsumexp, mask, kind="forward_kl")
    assert loss.item() == pytest.approx(FORWARD / 3)  # three counted positions, one of them the reference


def test_next_token_ce_matches_hand_value_with_the_shift():
    # Vocabulary 2; position 0 predicts token 1 (id 1) with probs [3/4, 1/4]; position 1 predicts token 2
    # (id 0) with probs [1/2, 1/2]; position 2 is the last real token; row 1 is padding after position 0.
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [9.0, -9.0]], [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]]])
    input_ids = torch.tensor([[0, 1, 0], [1, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert next_token_ce(logits, input_ids, mask).item() == pytest.approx((-math.log(0.25) - math.log(0.5)) / 2)


def test_against_a_numpy_reference_on_random_inputs():
    """The whole loss, by a straightforward numpy implementation of the docstring's definition."""
    rng = np.random.default_rng(7)
    n, length, vocab, k, temperature, beta = 3, 5, 9, 3, 1.7, 0.4
    teacher = rng.normal(size=(n, length, vocab)) * 2
    student = rng.normal(size=(n, length, vocab))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    expected = {"forward_kl": [], "reverse_kl": [], "gjs": []}
    for i in range(n):
        for t in range(length - 1):
            if not (mask[i, t] and mask[i, t + 1]):
                continue
            top = np.argsort(-teacher[i, t])[:k]
            p_all = np.exp(log_softmax(teacher[i, t]))
            q_all = np.exp(log_softmax(student[i, t] / temperature))
            p = np.append(p_all[top], 1 - p_all[top].sum())
            q = np.append(q_all[top], 1 - q_all[top].sum())
            expected["forward_kl"].append(kl(p, q))
            expected["reverse_kl"].append(kl(q, p))
            expected["gjs"].append(gjs(p, q, beta))
    message = topk_message(torch.tensor(teacher), k)
    for kind, values in expected.items():
        loss = lm_distillation_loss(torch.tensor(student), *message, torch.tensor(mask), kind=kind,
                                    temperature=temperature, beta=beta)
        assert loss.item() == pytest.approx(np.mean(values), rel=1e-5), kind


def test_kl_divergence_ignores_buckets_the_first_distribution_lacks():
    log_p = torch.log(torch.tensor([1.0, 0.0]))
    log_q = torch.log(torch.tensor([0.5, 0.5]))
    assert kl_divergence(log_p, log_q).item() == pytest.approx(LN2)


def test_masked_lm_losses_count_the_masked_positions_only():
    from polydistill.student.lm_losses import masked_lm_ce, masked_lm_distillation_loss

    torch.manual_seed(0)
    vocab, k = 6, 2
    student = torch.randn(1, 3, vocab, requires_grad=True)
    teacher = torch.randn(1, 3, vocab)
    values, indices = teacher.topk(k, dim=-1)
    lse = teacher.logsumexp(-1)
    labels = torch.tensor([[-100, 4, -100]])
    loss = masked_lm_distillation_loss(student, values, indices, lse, labels)
    # By hand at position 1: the teacher's top-2 probabilities and the rest, against the student's.
    p = teacher[0, 1].softmax(-1)
    q = student[0, 1].detach().softmax(-1)
    top = indices[0, 1]
    p_b = torch.cat([p[top], (1 - p[top].sum()).reshape(1)])
    q_b = torch.cat([q[top], (1 - q[top].sum()).reshape(1)])
    assert loss.item() == pytest.approx(float((p_b * (p_b / q_b).log()).sum()), rel=1e-5)
    loss.backward()
    assert student.grad[0, 0].abs().sum() == 0 and student.grad[0, 2].abs().sum() == 0  # unmasked: no gradient
    assert student.grad[0, 1].abs().sum() > 0
    ce = masked_lm_ce(student, labels)
    assert ce.item() == pytest.approx(float(-student[0, 1].detach().log_softmax(-1)[4]), rel=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "gjs"])
def test_masked_lm_losses_of_a_batch_with_no_masked_position_are_zero_with_zero_gradient(kind):
    from polydistill.student.lm_losses import masked_lm_ce, masked_lm_distillation_loss

    student = torch.randn(2, 3, 6, requires_grad=True)
    values, indices, lse = topk_message(torch.randn(2, 3, 6), 2)
    labels = torch.full((2, 3), -100)
    distillation = masked_lm_distillation_loss(student, values, indices, lse, labels, kind=kind)
    ce = masked_lm_ce(student, labels)
    assert distillation.item() == 0.0 and ce.item() == 0.0
    (distillation + ce).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_causal_losses_of_a_batch_with_no_next_token_are_zero_with_zero_gradient():
    # One-token rows and an all-padding row: no position predicts a real token.
    student = torch.randn(2, 1, 6, requires_grad=True)
    mask = torch.tensor([[1], [0]])
    distillation = lm_distillation_loss(student, *topk_message(torch.randn(2, 1, 6), 2), mask)
    ce = next_token_ce(student, torch.zeros(2, 1, dtype=torch.long), mask)
    assert distillation.item() == 0.0 and ce.item() == 0.0
    (distillation + ce).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
