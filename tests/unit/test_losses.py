"""Distillation losses against values worked out by hand on tiny tensors.

Reference numbers used throughout:
  teacher logits [ln 3, 0] -> probs [3/4, 1/4]; student logits [0, 0] -> probs [1/2, 1/2]
  KL(teacher || student) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308121...
"""

import math

import pytest
import torch

from polydistill.student.losses import (
    HiddenProjection,
    attention_kl,
    combine_losses,
    embedding_loss,
    hard_label_ce,
    hidden_state_loss,
    masked_mean,
    mean_pool,
    minilm_relation_loss,
    soft_label_kl,
    soft_label_kl_topk,
    uniform_layer_map,
    validate_layer_map,
)

LN3 = math.log(3.0)
KL_34_VS_HALF = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def topk_message(teacher_logits: torch.Tensor, k: int):
    """What a teacher replica would send: top-k logits, their ids, full logsumexp at T=1."""
    values, indices = teacher_logits.topk(k, dim=-1)
    return values, indices, torch.logsumexp(teacher_logits, dim=-1)


# --------------------------------------------------------------------------- masked_mean


def test_masked_mean_ignores_masked_values_even_when_nan():
    values = torch.tensor([[1.0, 3.0, float("nan")]])
    assert masked_mean(values, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_masked_mean_of_nothing_is_zero_not_nan():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    result = masked_mean(values, torch.tensor([False, False]))
    assert result.item() == 0.0
    result.backward()
    assert torch.equal(values.grad, torch.zeros(2))


def test_masked_mean_rejects_mask_that_does_not_broadcast():
    with pytest.raises(ValueError, match=r"mask of shape \(3,\)"):
        masked_mean(torch.zeros(2, 2), torch.ones(3))


# --------------------------------------------------------------------------- soft_label_kl


def test_soft_label_kl_matches_hand_value_at_t1():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[LN3, 0.0]])
    assert soft_label_kl(student, teacher, temperature=1.0).item() == pytest.approx(KL_34_VS_HALF)


def test_soft_label_kl_scales_by_t_squared():
    # At T=2 the teacher logits [2 ln 3, 0] soften to [ln 3, 0]: same KL as above, times 4.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * LN3, 0.0]])
    loss = soft_label_kl(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(4 * KL_34_VS_HALF)


def test_soft_label_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(4, 7)
    loss = soft_label_kl(logits, logits.clone(), temperature=3.0)
    assert loss.item() == pytest.approx(0, abs=1e-6)


def test_soft_label_kl_token_mask_ignores_padding():
    # Token 0: KL_34_VS_HALF; token 1: 0; token 2 is padding with absurd logits.
    student = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [1e4, -1e4]]])
    teacher = torch.tensor([[[LN3, 0.0], [1.0, 2.0], [-1e4, 1e4]]])
    mask = torch.tensor([[1, 1, 0]])
    loss = soft_label_kl(student, teacher, temperature=1.0, mask=mask)
    assert loss.item() == pytest.approx(KL_34_VS_HALF / 2)


def test_soft_label_kl_computes_half_precision_inputs_in_float32():
    student = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16)
    teacher = torch.tensor([[LN3, 0.0]], dtype=torch.bfloat16)
    loss = soft_label_kl(student, teacher, temperature=1.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(KL_34_VS_HALF, rel=1e-2)


def test_soft_label_kl_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        soft_label_kl(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        soft_label_kl(torch.zeros(1, 2), torch.zeros(1, 3), temperature=1.0)


# --------------------------------------------------------------------------- top-k


def test_topk_with_k_equal_to_classes_equals_full_kl():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, dtype=torch.float64)
    teacher = torch.randn(3, 5, 11, dtype=torch.float64) * 3
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    for temperature in (1.0, 2.0, 4.0):
        full = soft_label_kl(student, teacher, temperature=temperature, mask=mask)
        topk = soft_label_kl_topk(
            student, *topk_message(teacher, 11), temperature=temperature, mask=mask
        )
        torch.testing.assert_close(topk, full, rtol=1e-12, atol=1e-12)


def test_topk_with_single_missing_class_is_exact_at_any_temperature():
    # With one class missing the "uniform tail" assumption is no assumption at all.
    torch.manual_seed(1)
    student = torch.randn(6, 9, dtype=torch.float64)
    teacher = torch.randn(6, 9, dtype=torch.float64) * 2
    full = soft_label_kl(student, teacher, temperature=3.0)
    topk = soft_label_kl_topk(student, *topk_message(teacher, 8), temperature=3.0)
    torch.testing.assert_close(topk, full, rtol=1e-10, atol=1e-12)


def test_topk_hand_value_with_three_classes_at_t1():
    # Teacher probs [0.6, 0.3, 0.1], k=2 (tail = class 2 with mass 0.1); student uniform.
    # KL = 0.6 ln(0.6/(1/3)) + 0.3 ln(0.3/(1/3)) + 0.1 ln(0.1/(1/3)) = 0.2006666...
    teacher = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])
    student = torch.zeros(1, 3)
    expected = 0.6 * math.log(1.8) + 0.3 * math.log(0.9) + 0.1 * math.log(0.3)
    loss = soft_label_kl_topk(student, *topk_message(teacher, 2), temperature=1.0)
    assert loss.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.2006666, abs=1e-6)


def test_topk_hand_value_with_uniform_tail_assumption_at_t2():
    # Teacher probs [0.6, 0.2, 0.15, 0.05], k=2, T=2. The tail mass 0.2 is assumed to be
    # 0.1 + 0.1, so at T=2 (p ∝ sqrt(p_T1)) the buckets are ∝ [√0.6, √0.2, 2·√0.1].
    # The student is uniform over 4 classes: buckets [1/4, 1/4, 1/2].
    teacher = torch.log(torch.tensor([[0.6, 0.2, 0.15, 0.05]], dtype=torch.float64))
    student = torch.zeros(1, 4, dtype=torch.float64)
    top1, top2, tail = math.sqrt(0.6), math.sqrt(0.2), 2 * math.sqrt(0.1)
    z = top1 + top2 + tail
    expected = 4 * (
        top1 / z * math.log(top1 / z / 0.25)
        + top2 / z * math.log(top2 / z / 0.25)
        + tail / z * math.log(tail / z / 0.5)
    )
    loss = soft_label_kl_topk(student, *topk_message(teacher, 2), temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.30145, abs=1e-4)


def test_topk_is_close_to_full_when_teacher_is_peaked():
    torch.manual_seed(2)
    student = torch.randn(8, 50)
    teacher = torch.randn(8, 50)
    teacher[torch.arange(8), torch.arange(8)] += 12.0  # one dominant class per sample
    for temperature in (1.0, 2.0):
        full = soft_label_kl(student, teacher, temperature=temperature)
        topk = soft_label_kl_topk(student, *topk_message(teacher, 5), temperature=temperature)
        assert topk.item() == pytest.approx(full.item(), rel=0.05)


def test_topk_gradients_reach_the_student_and_are_finite():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    loss = soft_label_kl_topk(student, *topk_message(teacher, 3), temperature=2.0)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_topk_tolerates_a_teacher_with_no_tail_mass():
    # Teacher tail underflows to exactly 0 probability: the tail bucket must add 0, not NaN.
    teacher = torch.tensor([[0.0, -1e4, -1e4]])
    student = torch.zeros(1, 3, requires_grad=True)
    loss = soft_label_kl_topk(student, *topk_message(teacher, 1), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(3.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_topk_is_zero_when_student_equals_teacher_with_full_support():
    logits = torch.randn(2, 6)
    loss = soft_label_kl_topk(logits, *topk_message(logits, 6), temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize(("k", "num_classes"), [(1, 10), (3, 10), (5, 50), (8, 9), (10, 10)])
def test_topk_is_zero_with_zero_gradient_when_student_equals_teacher(k, num_classes, temperature):
    generator = torch.Generator().manual_seed(k * 100 + num_classes)
    teacher = torch.randn(4, 3, num_classes, generator=generator, dtype=torch.float64) * 3
    student = teacher.clone().requires_grad_()
    loss = soft_label_kl_topk(student, *topk_message(teacher, k), temperature=temperature)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert student.grad.abs().max().item() < 1e-12


def flatten_tail(logits: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """`logits` with every class outside `topk_indices` set to the tail's log-mean-exp."""
    in_topk = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, topk_indices, True)
    tail = logits.masked_fill(in_topk, float("-inf"))
    tail_size = logits.shape[-1] - topk_indices.shape[-1]
    mean_logit = torch.logsumexp(tail, dim=-1, keepdim=True) - math.log(tail_size)
    return torch.where(in_topk, logits, mean_logit)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_topk_equals_full_kl_between_tail_flattened_logits(temperature):
    # At T != 1 both sides' tails are softened as C - k equal logits with the side's own T = 1
    # tail mass: the bucketed loss is the full soft-label KL after that flattening.
    torch.manual_seed(5)
    student = torch.randn(3, 5, 12, dtype=torch.float64)
    teacher = torch.randn(3, 5, 12, dtype=torch.float64) * 3
    mask = torch.ones(3, 5)
    mask[2, 1:] = 0
    values, indices, logsumexp = topk_message(teacher, 4)
    full = soft_label_kl(
        flatten_tail(student, indices), flatten_tail(teacher, indices), temperature=temperature, mask=mask
    )
    topk = soft_label_kl_topk(student, values, indices, logsumexp, temperature=temperature, mask=mask)
    torch.testing.assert_close(topk, full, rtol=1e-10, atol=1e-12)


def test_topk_trains_a_student_towards_the_teacher_at_t2():
    torch.manual_seed(6)
    teacher = torch.randn(8, 20) * 3
    student = torch.randn(8, 20).requires_grad_()
    message = topk_message(teacher, 4)
    optimiser = torch.optim.Adam([student], lr=0.1)
    start = soft_label_kl_topk(student, *message, temperature=2.0).item()
    for _ in range(300):
        optimiser.zero_grad()
        soft_label_kl_topk(student, *message, temperature=2.0).backward()
        optimiser.step()
    assert soft_label_kl_topk(student, *message, temperature=2.0).item() < 1e-5 * start
    # What the loss pins down: the student's T = 1 probabilities of the teacher's top-k classes.
    torch.testing.assert_close(
        student.detach().softmax(-1).gather(-1, message[1]),
        teacher.softmax(-1).gather(-1, message[1]),
        atol=1e-4,
        rtol=0,
    )


def test_topk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="leading shape"):
        soft_label_kl_topk(
            torch.zeros(2, 5), torch.zeros(3, 2), torch.zeros(3, 2).long(), torch.zeros(3),
            temperature=1.0,
        )
    with pytest.raises(ValueError, match="k=6"):
        soft_label_kl_topk(
            torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, 6).long(), torch.zeros(2),
            temperature=1.0,
        )


# --------------------------------------------------------------------------- hard labels


def test_hard_label_ce_matches_hand_value():
    # probs [3/4, 1/4]: -ln(3/4) = 0.28768, -ln(1/4) = 1.38629, mean 0.83699
    logits = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    loss = hard_label_ce(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)


def test_hard_label_ce_skips_ignored_positions():
    logits = torch.tensor([[[LN3, 0.0], [LN3, 0.0]]])
    loss = hard_label_ce(logits, torch.tensor([[0, -100]]))
    assert loss.item() == pytest.approx(-math.log(0.75))


def test_hard_label_ce_with_everything_ignored_is_zero():
    loss = hard_label_ce(torch.zeros(2, 3), torch.tensor([-100, -100]))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- hidden states


def test_hidden_state_mse_matches_hand_value_and_ignores_padding():
    # token 0: ((1-0)^2 + (2-0)^2)/2 = 2.5; token 1 is padding.
    student = torch.tensor([[[1.0, 2.0], [100.0, 100.0]]])
    teacher = torch.zeros(1, 2, 2)
    loss = hidden_state_loss(student, teacher, mask=torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(2.5)


def test_hidden_state_cosine_matches_hand_value():
    # 1 - cos: orthogonal -> 1; 45 degrees -> 1 - 1/sqrt(2); mean over the two tokens.
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    loss = hidden_state_loss(student, teacher, mask=None, kind="cosine")
    assert loss.item() == pytest.approx((1.0 + 1 - 1 / math.sqrt(2)) / 2)


def test_hidden_state_loss_is_zero_for_identical_states():
    h = torch.randn(2, 3, 4)
    assert hidden_state_loss(h, h.clone(), mask=None).item() == 0.0


def test_gradients_reach_hidden_projection_weights():
    torch.manual_seed(3)
    projection = HiddenProjection(4, 6)
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = hidden_state_loss(
        student, torch.randn(2, 3, 6), mask=torch.ones(2, 3), projection=projection
    )
    loss.backward()
    assert projection.linear.weight.grad is not None
    assert projection.linear.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0


def test_width_mismatch_without_projection_says_what_to_pass():
    with pytest.raises(ValueError, match=r"HiddenProjection\(4, 6\)"):
        hidden_state_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 6), mask=None)


def test_unknown_distance_kind_is_rejected():
    with pytest.raises(ValueError, match="'l1'"):
        hidden_state_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), mask=None, kind="l1")


def test_uniform_layer_map_follows_the_hidden_states_convention():
    assert uniform_layer_map(6, 12) == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    # Not divisible: floor(i * 10 / 4) = 2, 5, 7, 10 -- the last layer still maps to the last.
    assert uniform_layer_map(4, 10) == [(0, 0), (1, 2), (2, 5), (3, 7), (4, 10)]


def test_uniform_layer_map_rejects_a_deeper_student():
    with pytest.raises(ValueError, match="student has 8 layers but the teacher only 6"):
        uniform_layer_map(8, 6)


def test_validate_layer_map_names_the_bad_pair_and_setting():
    validate_layer_map(uniform_layer_map(6, 12), n_student=6, n_teacher=12)
    with pytest.raises(ValueError, match=r"student layer 6 maps to teacher layer 14, but the "
                       r"teacher has 12 layers .*\(distill.layer_map\)"):
        validate_layer_map([(6, 14)], n_student=6, n_teacher=12, setting="distill.layer_map")


# --------------------------------------------------------------------------- embeddings


def test_mean_pool_averages_unmasked_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


def test_embedding_loss_hand_values():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.zeros(2, 2)
    # per-sample MSE: 2.5 and 0 -> mean 1.25
    assert embedding_loss(student, teacher).item() == pytest.approx(1.25)
    cos = embedding_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), kind="cosine")
    assert cos.item() == pytest.approx(1.0)


def test_embedding_loss_with_projection_has_gradients():
    projection = HiddenProjection(3, 5)
    embedding_loss(torch.randn(4, 3), torch.randn(4, 5), projection=projection).backward()
    assert projection.linear.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- attention


def test_attention_kl_matches_hand_value_and_masks_queries():
    # One head, two queries; query 0 differs ([3/4, 1/4] vs [1/2, 1/2]); query 1 is padding.
    teacher = torch.tensor([[[[0.75, 0.25], [1.0, 0.0]]]])
    student = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    loss = attention_kl(student, teacher, mask=torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(KL_34_VS_HALF)


def test_attention_kl_is_zero_for_identical_maps():
    attn = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    assert attention_kl(attn, attn.clone(), mask=None).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_head_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="student has 4 heads and the teacher 12"):
        attention_kl(torch.zeros(1, 4, 3, 3), torch.zeros(1, 12, 3, 3), mask=None)


def test_minilm_relation_matches_hand_value():
    # Width 1, one relation head. Teacher x = [sqrt(ln 3), 0]: query 0 scores [ln 3, 0] ->
    # [3/4, 1/4]; query 1 scores [0, 0] -> uniform. Student x = 0: uniform everywhere.
    # Mean over the two queries: (KL_34_VS_HALF + 0) / 2.
    teacher = torch.tensor([[[math.sqrt(LN3)], [0.0]]])
    student = torch.zeros(1, 2, 1)
    loss = minilm_relation_loss(student, teacher, mask=None, num_relation_heads=1)
    assert loss.item() == pytest.approx(KL_34_VS_HALF / 2)


def test_minilm_relation_across_head_counts_and_widths_has_gradients():
    torch.manual_seed(4)
    student = torch.randn(2, 5, 8, requires_grad=True)  # e.g. 2 heads of width 4
    teacher = torch.randn(2, 5, 12)  # e.g. 3 heads of width 4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = minilm_relation_loss(student, teacher, mask=mask, num_relation_heads=4)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_minilm_relation_ignores_padded_keys_and_is_zero_for_equal_inputs():
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = minilm_relation_loss(x, x.clone(), mask=mask, num_relation_heads=3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    changed_padding = x.clone()
    changed_padding[1, 2:] = 50.0
    same = minilm_relation_loss(changed_padding, x, mask=mask, num_relation_heads=3)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_minilm_relation_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="teacher width 10 is not divisible by num_relation_he"):
        minilm_relation_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 10), mask=None,
                             num_relation_heads=4)


# --------------------------------------------------------------------------- combination


def test_combine_losses_weights_terms_and_skips_zero_weights():
    terms = {"kd": torch.tensor(2.0), "ce": torch.tensor(3.0), "hidden": torch.tensor(5.0)}
    total, logged = combine_losses(terms, {"kd": 0.5, "ce": 0.5, "hidden": 0.0, "attn": 1.0})
    assert total.item() == pytest.approx(2.5)
    assert logged == {"kd": 2.0, "ce": 3.0, "total": 2.5}


def test_combine_losses_keeps_the_graph():
    student = torch.tensor(1.0, requires_grad=True)
    total, _ = combine_losses({"kd": student * 3}, {"kd": 2.0})
    total.backward()
    assert student.grad.item() == 6.0


def test_combine_losses_rejects_a_term_without_weight():
    with pytest.raises(ValueError, match=r"\['hiden'\] have no weight"):
        combine_losses({"hiden": torch.tensor(1.0)}, {"hidden": 1.0})


def test_combine_losses_rejects_an_empty_batch_of_terms():
    with pytest.raises(ValueError, match="no loss terms"):
        combine_losses({}, {"kd": 1.0})


def test_combine_losses_rejects_all_zero_weights():
    with pytest.raises(ValueError, match="nothing to train"):
        combine_losses({"kd": torch.tensor(1.0)}, {"kd": 0.0})
