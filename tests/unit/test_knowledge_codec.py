"""Wire schema version 2's packed knowledge: bit packing, the levels of -log p, top-k soft labels and
int8 features, each against what version 1 carries exactly."""

import math

import numpy as np
import pytest
import torch

from polydistill.storage import knowledge_codec as codec
from polydistill.storage import wire
from polydistill.storage.knowledge_codec import WireCodec, bucket_kl
from polydistill.student.losses import soft_label_kl_topk

VOCAB = 250_002


def zipf_logits(rows: int, exponent: float, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    """Peaked logits like a trained LM's (p ∝ rank**-exponent, with noise), classes in random order."""
    rng = np.random.default_rng(seed)
    base = -exponent * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    return np.stack([rng.permutation(base + 0.3 * rng.standard_normal(vocab).astype(np.float32))
                     for _ in range(rows)])


def kl_rebuilt(exact: wire.SoftLabels, rebuilt: wire.SoftLabels) -> np.ndarray:
    """KL(k + 1 buckets of the exact top-k ‖ those of the rebuilt one), per row."""
    return bucket_kl(exact.topk_values, exact.topk_logsumexp, rebuilt.topk_values, rebuilt.topk_logsumexp)


def round_trip(soft: wire.SoftLabels, value_bits: int) -> tuple[wire.SoftLabels, int]:
    work = wire.WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(soft.n_samples),
                          languages=("eng",) * soft.n_samples,
                          input_ids=np.zeros((soft.n_samples, soft.topk_values.shape[1]), np.int32),
                          attention_mask=np.ones((soft.n_samples, soft.topk_values.shape[1]), np.uint8))
    bare = len(wire.encode(wire.Knowledge(work=work, teacher_id="t"), WireCodec(value_bits)))
    data = wire.encode(wire.Knowledge(work=work, teacher_id="t", soft=soft), WireCodec(value_bits))
    return wire.decode(bytes(data)).soft, len(data) - bare


@pytest.mark.parametrize("width", [1, 3, 8, 13, 18, 31])
def test_fixed_width_packing_round_trips(width):
    values = np.random.default_rng(width).integers(0, 2**width, size=1001, dtype=np.uint64).astype(np.uint32)
    packed = codec.pack_fixed_width(values, width)
    assert packed.size == math.ceil(1001 * width / 8)
    np.testing.assert_array_equal(codec.unpack_fixed_width(packed, width, 1001, "x"), values)


def test_unary_rows_round_trip_and_cost_levels_plus_k_bits():
    levels = np.sort(np.random.default_rng(1).integers(0, 256, size=(50, 128)), axis=-1)
    packed = codec.pack_unary_rows(levels)
    # Row by row the bits are k ones and as many zeros as the row's last level.
    assert packed.size == math.ceil(sum(128 + int(row[-1]) for row in levels) / 8)
    np.testing.assert_array_equal(codec.unpack_unary_rows(packed, 50, 128, "x"), levels)
    with pytest.raises(ValueError, match="must not decrease"):
        codec.pack_unary_rows(np.array([[3, 2]]))


def test_a_unary_stream_with_too_few_or_too_many_codes_is_refused():
    packed = codec.pack_unary_rows(np.array([[0, 1, 5], [2, 2, 9]]))
    with pytest.raises(wire.WireError, match="expected 6 unary codes"):
        codec.unpack_unary_rows(packed[:-1], 2, 3, "levels")
    with pytest.raises(wire.WireError, match="expected 3 unary codes"):
        codec.unpack_unary_rows(packed, 1, 3, "levels")


@pytest.mark.parametrize("value_bits, worst", [(8, 0.05), (16, 48 / 65535 / 2)])
def test_a_level_is_within_half_a_step_of_its_nats_near_the_top(value_bits, worst):
    nats = np.linspace(0, 8, 10_001)
    rebuilt = codec.from_levels(codec.to_levels(nats, value_bits), value_bits)
    assert np.abs(rebuilt - nats).max() <= worst + 1e-12


def test_the_8_bit_scale_is_monotone_and_saturates():
    nats = np.array([0, 0.04, 7.99, 8, 15.9, 16, 100, 174, 1e6, np.inf, np.nan])
    levels = codec.to_levels(nats, 8)
    assert (np.diff(levels[:-1].astype(int)) >= 0).all() and levels[-3:].tolist() == [255, 255, 255]


@pytest.mark.parametrize("exponent", [1.1, 1.5])
def test_top128_of_a_250k_vocabulary_in_8_bits_keeps_the_teacher_within_1e_3_nats(exponent):
    exact = wire.topk_soft_labels(zipf_logits(64, exponent)[None], 128)  # [1, 64 tokens, 128]
    rebuilt, payload = round_trip(exact, 8)
    np.testing.assert_array_equal(rebuilt.topk_indices, exact.topk_indices)
    kl = kl_rebuilt(exact, rebuilt)
    assert kl.mean() <= 1e-3 and kl.max() <= 2e-3
    assert payload / 64 <= 320  # bytes per token, the frame's share included


def test_16_bits_are_as_good_as_float32_for_a_student():
    exact = wire.topk_soft_labels(zipf_logits(6, 1.2, vocab=5000)[None], 32)
    rebuilt, _ = round_trip(exact, 16)
    assert kl_rebuilt(exact, rebuilt).max() < 1e-6
    student = torch.randn(1, 6, 5000)
    losses = [soft_label_kl_topk(student, torch.from_numpy(soft.topk_values.astype(np.float32)),
                                 torch.from_numpy(soft.topk_indices), torch.from_numpy(soft.topk_logsumexp),
                                 temperature=2.0).item() for soft in (exact, rebuilt)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_rebuilt_buckets_are_a_distribution_even_when_the_rest_is_empty():
    logits = np.array([[4.0, 3.0, -50.0]], np.float32)
    exact = wire.topk_soft_labels(logits, 3)  # k == C: no rest at all
    rebuilt, _ = round_trip(wire.SoftLabels(topk_values=exact.topk_values[:, None], topk_indices=exact.topk_indices[:, None],
                                            topk_logsumexp=exact.topk_logsumexp[:, None]), 8)
    kept = np.exp(rebuilt.topk_values.astype(np.float64)).sum(-1)
    assert (kept <= 1 + 1e-6).all() and kept.min() > 0.999


def test_classification_top_k_packs_the_per_sample_form():
    exact = wire.topk_soft_labels(np.random.default_rng(3).normal(size=(5, 7)).astype(np.float32), 3)
    work = wire.WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(5), languages=("eng",) * 5,
                          input_ids=np.zeros((5, 4), np.int32), attention_mask=np.ones((5, 4), np.uint8))
    for bits in (8, 16):
        back = wire.decode(bytes(wire.encode(wire.Knowledge(work=work, teacher_id="t", soft=exact), WireCodec(bits))))
        assert back.soft.topk_values.shape == (5, 3) and kl_rebuilt(exact, back.soft).max() < 1e-3
        np.testing.assert_array_equal(back.soft.topk_indices, exact.topk_indices)


def test_int8_rows_keep_each_value_within_half_a_step_of_its_row():
    array = np.random.default_rng(4).normal(size=(3, 5, 64)).astype(np.float16)
    values, scale = codec.quantise_rows(array)
    rebuilt = codec.dequantise_rows(values, scale, np.float32)
    assert values.dtype == np.int8 and scale.shape == (3, 5)
    assert (np.abs(rebuilt - array.astype(np.float32)) <= scale[..., None] / 2 + 1e-3).all()
    zeros = codec.dequantise_rows(*codec.quantise_rows(np.zeros((2, 4), np.float16)))
    assert not zeros.any()


def test_an_unknown_codec_setting_is_refused():
    with pytest.raises(ValueError, match="value_bits must be one of"):
        WireCodec(value_bits=4)
    with pytest.raises(ValueError, match="feature_bits must be one of"):
        WireCodec(feature_bits=32)


def test_a_top_k_of_nothing_is_refused_when_packed():
    with pytest.raises(wire.WireError, match="k = 0"):
        codec.pack_topk(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.int32), np.zeros(2, np.float32), 8)
