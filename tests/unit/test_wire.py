from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from polydistill.storage.schema import declared_fields, integers, text
from polydistill.storage.wire import (
    SCHEMA_VERSION,
    Knowledge,
    SoftLabels,
    StudentTokens,
    TeacherVote,
    WireCodec,
    WireError,
    WireVersionError,
    WorkBatch,
    decode,
    encode,
    knowledge_nbytes,
    topk_soft_labels,
)

N, L, C, H, HEADS = 3, 5, 11, 4, 2


def make_work(*, labels: bool = True) -> WorkBatch:
    rng = np.random.default_rng(0)
    mask = np.ones((N, L), dtype=bool)
    mask[1, 3:] = False
    return WorkBatch(
        job_id="job-1",
        epoch=2,
        batch_id=17,
        sample_ids=np.array([100, 101, 102], dtype=np.int32),
        languages=["en", "sw", "hi"],
        input_ids=rng.integers(0, 30_000, size=(N, L), dtype=np.int64),
        attention_mask=mask,
        labels=np.array([0, 2, 1]) if labels else None,
    )


def make_knowledge(soft: SoftLabels | None) -> Knowledge:
    rng = np.random.default_rng(1)
    return Knowledge(
        work=make_work(),
        teacher_id="teacher-0",
        soft=soft,
        hidden_states={
            6: rng.standard_normal((N, L, H)).astype(np.float32),
            0: rng.standard_normal((N, L, H)).astype(np.float16),
        },
        attentions={3: rng.random((N, HEADS, L, L)).astype(np.float16)},
        embeddings=rng.standard_normal((N, H)).astype(np.float32),
        teacher_seconds=0.25,
    )


def backing_bytes(array: np.ndarray) -> object:
    """The object at the root of an array's view chain."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


def assert_same_work(got: WorkBatch, want: WorkBatch) -> None:
    assert (got.job_id, got.epoch, got.batch_id) == (want.job_id, want.epoch, want.batch_id)
    assert got.languages == want.languages
    for name in ("sample_ids", "input_ids", "attention_mask", "labels"):
        got_array, want_array = getattr(got, name), getattr(want, name)
        if want_array is None:
            assert got_array is None
        else:
            assert got_array.dtype == want_array.dtype, name
            np.testing.assert_array_equal(got_array, want_array, err_msg=name)


# -- construction ------------------------------------------------------------- #


def test_work_batch_casts_to_canonical_dtypes():
    work = make_work()
    assert work.sample_ids.dtype == np.int64
    assert work.input_ids.dtype == np.int32
    assert work.attention_mask.dtype == np.uint8
    assert work.labels.dtype == np.int64
    assert work.languages == ("en", "sw", "hi")
    assert work.n_samples == 3
    assert work.attention_mask[1].tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input_ids": np.zeros((N + 1, L), dtype=np.int32)}, "input_ids"),
        ({"attention_mask": np.ones((N, L - 1), dtype=np.uint8)}, "attention_mask"),
        ({"attention_mask": np.full((N, L), 2, dtype=np.uint8)}, "attention_mask"),
        ({"languages": ("en", "sw")}, "languages"),
        ({"labels": np.zeros((N, 2), dtype=np.int64)}, "labels"),
        ({"input_ids": np.zeros((N, L), dtype=np.float32)}, "input_ids"),
        ({"input_ids": np.full((N, L), 2**40, dtype=np.int64)}, "input_ids"),
        ({"epoch": -1}, "epoch"),
        ({"job_id": ""}, "job_id"),
    ],
)
def test_work_batch_rejects_bad_fields_naming_them(change, field):
    base = make_work()
    kwargs = {name: getattr(base, name) for name in base.__dataclass_fields__}
    kwargs.update(change)
    with pytest.raises(WireError, match=f"WorkBatch.{field}"):
        WorkBatch(**kwargs)


def test_knowledge_rejects_features_that_do_not_match_the_batch():
    with pytest.raises(WireError, match=r"Knowledge.hidden_states\[2\]"):
        Knowledge(make_work(), "t", hidden_states={2: np.zeros((N, L + 1, H), np.float16)})
    with pytest.raises(WireError, match="Knowledge.soft"):
        Knowledge(make_work(), "t", soft=SoftLabels.full(np.zeros((N + 1, C), np.float32)))
    with pytest.raises(WireError, match="non-negative teacher layer"):
        Knowledge(make_work(), "t", hidden_states={-1: np.zeros((N, L, H), np.float16)})


def test_soft_labels_needs_exactly_one_form():
    with pytest.raises(WireError, match="either logits or topk"):
        SoftLabels()
    with pytest.raises(WireError, match="all three"):
        SoftLabels(topk_values=np.zeros((N, 2), np.float32))
    with pytest.raises(WireError, match="topk_logsumexp"):
        SoftLabels(
            topk_values=np.zeros((N, 2), np.float32),
            topk_indices=np.zeros((N, 2), np.int32),
            topk_logsumexp=np.zeros((N, 2), np.float32),
        )


# -- round trips -------------------------------------------------------------- #


def test_work_batch_round_trip():
    work = make_work()
    decoded = decode(encode(work))
    assert isinstance(decoded, WorkBatch)
    assert_same_work(decoded, work)


def test_work_batch_without_labels_round_trip():
    decoded = decode(encode(make_work(labels=False)))
    assert decoded.labels is None


def test_knowledge_round_trip_with_full_logits():
    logits = np.random.default_rng(2).standard_normal((N, L, C)).astype(np.float16)
    knowledge = make_knowledge(SoftLabels.full(logits))
    decoded = decode(encode(knowledge))

    assert isinstance(decoded, Knowledge)
    assert_same_work(decoded.work, knowledge.work)
    assert decoded.teacher_id == "teacher-0"
    assert decoded.teacher_seconds == 0.25
    assert decoded.soft.kind == "full"
    assert decoded.soft.logits.dtype == np.float16
    np.testing.assert_array_equal(decoded.soft.logits, logits)
    assert list(decoded.hidden_states) == [0, 6]
    for layer in (0, 6):
        assert decoded.hidden_states[layer].dtype == np.float16
        np.testing.assert_array_equal(decoded.hidden_states[layer], knowledge.hidden_states[layer])
    np.testing.assert_array_equal(decoded.attentions[3], knowledge.attentions[3])
    assert decoded.embeddings.dtype == np.float32
    np.testing.assert_array_equal(decoded.embeddings, knowledge.embeddings)


def test_knowledge_round_trip_with_topk():
    logits = np.random.default_rng(3).standard_normal((N, C)).astype(np.float32)
    soft = topk_soft_labels(logits, k=4)
    decoded = decode(encode(make_knowledge(soft)))

    assert decoded.soft.kind == "topk"
    assert decoded.soft.logits is None
    np.testing.assert_array_equal(decoded.soft.topk_values, soft.topk_values)
    np.testing.assert_array_equal(decoded.soft.topk_indices, soft.topk_indices)
    np.testing.assert_array_equal(decoded.soft.topk_logsumexp, soft.topk_logsumexp)
    assert decoded.soft.topk_indices.dtype == np.int32


def test_knowledge_without_soft_labels_or_features_round_trip():
    knowledge = Knowledge(work=make_work(), teacher_id="t")
    decoded = decode(encode(knowledge))
    assert decoded.soft is None
    assert decoded.hidden_states == {} and decoded.attentions == {}
    assert decoded.embeddings is None


def test_decoded_arrays_are_read_only_views_not_copies():
    knowledge = make_knowledge(SoftLabels.full(np.ones((N, C), np.float32)))
    decoded = decode(encode(knowledge))
    for array in (decoded.soft.logits, decoded.hidden_states[6], decoded.work.input_ids):
        assert not array.flags.owndata
        assert not array.flags.writeable
        # The array's memory is the bytes object msgpack unpacked, not a copy of it.
        root = backing_bytes(array)
        assert isinstance(root, bytes)
        assert np.shares_memory(array, np.frombuffer(root, dtype=np.uint8))


# -- what a reader rejects ---------------------------------------------------- #


def _raw(message) -> dict:
    return msgpack.unpackb(encode(message), raw=False)


def test_newer_schema_version_is_rejected_with_upgrade_hint():
    body = _raw(make_work())
    body["v"] = SCHEMA_VERSION + 1
    with pytest.raises(WireVersionError) as caught:
        decode(msgpack.packb(body, use_bin_type=True))
    text = str(caught.value)
    assert f"version {SCHEMA_VERSION + 1}" in text
    assert f"up to {SCHEMA_VERSION}" in text
    assert "upgrade polydistill on the reading side" in text
    assert isinstance(caught.value, WireError)  # still dead-lettered as garbage


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb({"kind": "work"})],
)
def test_garbage_is_rejected(data):
    with pytest.raises(WireError):
        decode(data)


def test_truncated_message_is_rejected():
    data = encode(make_knowledge(SoftLabels.full(np.ones((N, C), np.float32))))
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError):
            decode(data[:cut])


def test_extra_trailing_bytes_are_rejected():
    with pytest.raises(WireError):
        decode(encode(make_work()) + b"\x00")


def test_unknown_kind_is_rejected():
    body = _raw(make_work())
    body["kind"] = "gradient"
    with pytest.raises(WireError, match="unknown kind 'gradient'"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_missing_field_is_named():
    body = _raw(make_work())
    del body["input_ids"]
    with pytest.raises(WireError, match=r"work\.input_ids: missing"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_wrong_field_type_is_named():
    body = _raw(make_knowledge(None))
    body["teacher_id"] = 7
    with pytest.raises(WireError, match=r"knowledge\.teacher_id: expected str"):
        decode(msgpack.packb(body, use_bin_type=True))
    body = _raw(make_work())
    body["epoch"] = True
    with pytest.raises(WireError, match=r"work\.epoch"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_array_with_inconsistent_byte_count_is_rejected():
    body = _raw(make_work())
    body["sample_ids"]["raw"] = body["sample_ids"]["raw"][:-8]
    with pytest.raises(WireError, match=r"work\.sample_ids\.raw.*truncated"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_object_dtype_is_rejected():
    body = _raw(make_work())
    body["sample_ids"]["dtype"] = "object"
    with pytest.raises(WireError, match="not a wire dtype"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_a_shape_whose_product_overflows_int64_is_rejected():
    # [2**32, 2**32] multiplies to 0 in int64: with empty raw bytes it once decoded, then failed in reshape.
    body = _raw(make_work())
    body["input_ids"] = {"dtype": "int32", "shape": [2**32, 2**32], "raw": b""}
    data = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(WireError, match=r"work\.input_ids\.raw: 0 bytes, but shape \[4294967296, 4294967296\]"):
        decode(data)


def test_too_many_axes_are_rejected():
    body = _raw(make_work())
    body["sample_ids"] = {"dtype": "int64", "shape": [1] * 40, "raw": b"\x00" * 8}
    with pytest.raises(WireError, match="40 axes"):
        decode(msgpack.packb(body, use_bin_type=True))


ODD_ARRAYS = [
    {"dtype": "int32", "shape": [], "raw": b"\x00" * 4},
    {"dtype": "int32", "shape": [0], "raw": b""},
    {"dtype": "int32", "shape": [0, 2**63], "raw": b""},
    {"dtype": "float32", "shape": [N, 4], "raw": b"\x00" * (N * 16)},
    {"dtype": "bool", "shape": [N, 4], "raw": b"\x01" * (N * 4)},
    {"dtype": "uint64", "shape": [N, 4], "raw": b"\xff" * (N * 32)},
    {"dtype": "int64", "shape": [N], "raw": b"\xff" * (N * 8)},
    {"dtype": "float16", "shape": [N, 1, 1, 1], "raw": b"\x00" * (N * 2)},
    {"dtype": "int32", "shape": [-1], "raw": b""},
    {"dtype": "int32", "shape": [1.5], "raw": b""},
    {"dtype": 7, "shape": [1], "raw": b""},
    [1, 2, 3],
]


@pytest.mark.parametrize("packed", ODD_ARRAYS, ids=range(len(ODD_ARRAYS)))
def test_any_array_in_any_field_decodes_or_raises_a_wire_error(packed):
    """Whatever array a peer puts in whichever field, decoding raises WireError or returns a message:
    an error of any other kind would escape the dead-letter path and end the job."""
    for message in (make_work(), make_knowledge(SoftLabels.full(np.ones((N, C), np.float32)))):
        body = _raw(message)
        fields = [("", body), *(("work.", body["work"]) for _ in [0] if "work" in body)]
        for prefix, target in fields:
            for key, value in list(target.items()):
                if not (isinstance(value, dict) and "raw" in value):
                    continue
                changed = {**target, key: packed}
                whole = {**body, "work": changed} if prefix else changed
                try:
                    decode(msgpack.packb(whole, use_bin_type=True))
                except WireError:
                    pass


# -- top-k fidelity ----------------------------------------------------------- #


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("shape", [(N, C), (N, L, C)])
def test_topk_rebuilds_exact_teacher_log_probs(shape):
    logits = (np.random.default_rng(4).standard_normal(shape) * 5).astype(np.float32)
    soft = topk_soft_labels(logits, k=3)
    reference = log_softmax(logits)

    assert soft.topk_values.shape == shape[:-1] + (3,)
    assert soft.topk_logsumexp.shape == shape[:-1]
    # The kept classes are the three largest, in descending order.
    expected_indices = np.argsort(-logits, axis=-1)[..., :3]
    np.testing.assert_array_equal(soft.topk_indices, expected_indices)
    assert np.all(np.diff(soft.topk_values, axis=-1) <= 0)
    # values - logsumexp are the full-softmax log-probs of those classes.
    rebuilt = soft.topk_values - soft.topk_logsumexp[..., None]
    np.testing.assert_allclose(
        rebuilt, np.take_along_axis(reference, soft.topk_indices.astype(np.int64), -1), atol=1e-5
    )


def test_topk_with_k_equal_to_classes_keeps_all_probability_mass():
    logits = np.random.default_rng(5).standard_normal((N, C)).astype(np.float16)
    soft = topk_soft_labels(logits, k=C)
    assert soft.topk_values.dtype == np.float16
    mass = np.exp(soft.topk_values.astype(np.float64) - soft.topk_logsumexp[..., None]).sum(-1)
    np.testing.assert_allclose(mass, 1.0, atol=1e-3)


def test_topk_logsumexp_does_not_overflow_for_large_fp16_logits():
    logits = np.full((1, C), 60_000, dtype=np.float16)
    soft = topk_soft_labels(logits, k=2)
    assert np.isfinite(soft.topk_logsumexp).all()
    np.testing.assert_allclose(soft.topk_logsumexp, 60_000 + np.log(C), rtol=1e-6)


@pytest.mark.parametrize("k", [0, C + 1])
def test_topk_rejects_k_out_of_range(k):
    with pytest.raises(WireError, match="k must be between 1 and"):
        topk_soft_labels(np.zeros((N, C), np.float32), k=k)


def test_second_texts_and_the_students_own_ids_round_trip_and_are_checked():
    base = dict(job_id="j", epoch=0, batch_id=1, sample_ids=np.arange(2), languages=("fra", "swh"),
                input_ids=np.ones((2, 4), np.int32), attention_mask=np.ones((2, 4), np.uint8))
    work = WorkBatch(**base, pair_input_ids=np.full((2, 6), 7), pair_attention_mask=np.ones((2, 6), np.uint8),
                     student_input_ids=np.full((2, 3), 9), student_attention_mask=np.ones((2, 3), np.uint8))
    back = decode(encode(work))
    assert back.pair_input_ids.tolist() == [[7] * 6] * 2 and back.pair_input_ids.dtype == np.int32
    assert back.student_input_ids.shape == (2, 3) and back.student_attention_mask.dtype == np.uint8
    plain = decode(encode(WorkBatch(**base)))
    assert plain.pair_input_ids is None and plain.student_input_ids is None
    with pytest.raises(WireError, match="come together"):
        WorkBatch(**base, student_input_ids=np.ones((2, 3), np.int32))
    with pytest.raises(WireError, match="pair_input_ids"):
        WorkBatch(**base, pair_input_ids=np.ones((3, 3), np.int32), pair_attention_mask=np.ones((3, 3), np.uint8))


def test_each_students_tokenization_round_trips_under_its_name_and_is_checked():
    base = dict(job_id="j", epoch=0, batch_id=1, sample_ids=np.arange(2), languages=("fra", "swh"),
                input_ids=np.ones((2, 4), np.int32), attention_mask=np.ones((2, 4), np.uint8))
    small, large = (StudentTokens(name, np.full((2, width), width), np.ones((2, width), np.uint8))
                    for name, width in (("small vocabulary", 6), ("large vocabulary", 3)))
    back = decode(encode(WorkBatch(**base, student_tokens=(small, large)), WireCodec()))
    assert [tokens.source for tokens in back.student_tokens] == ["small vocabulary", "large vocabulary"]
    assert [tokens.input_ids.tolist() for tokens in back.student_tokens] == [[[6] * 6] * 2, [[3] * 3] * 2]
    assert back.student_tokens[0].input_ids.dtype == np.int32 and back.student_input_ids is None
    assert decode(encode(WorkBatch(**base))).student_tokens == ()
    with pytest.raises(WireError, match="each tokenizer once"):
        WorkBatch(**base, student_tokens=(small, small))
    with pytest.raises(WireError, match=r"student_tokens\['small vocabulary'\].input_ids"):
        WorkBatch(**base, student_tokens=(StudentTokens("small vocabulary", np.ones((3, 2), np.int32),
                                                        np.ones((3, 2), np.uint8)),))
    with pytest.raises(WireError, match="same as input_ids"):
        StudentTokens("small vocabulary", np.ones((2, 2), np.int32), np.ones((2, 3), np.uint8))


# -- the declaration ----------------------------------------------------------- #


def test_a_field_without_a_wire_declaration_is_refused():
    @dataclass(frozen=True)
    class Reading:
        sample_ids: np.ndarray = integers(np.int64)
        note: str = text()
        forgotten: int = 0

    with pytest.raises(TypeError, match="Reading.forgotten has no wire declaration"):
        declared_fields(Reading)


def test_knowledge_bytes_by_part_count_every_array():
    base = make_work()
    work = WorkBatch(**{**vars(base), "token_labels": np.zeros((N, L), np.int64),
                        "pair_input_ids": np.ones((N, 2), np.int32), "pair_attention_mask": np.ones((N, 2), np.uint8)})
    votes = (TeacherVote("teacher", np.zeros((N, C), np.float32), np.ones(N, np.uint8)),
             TeacherVote("africa", np.zeros((N, C), np.float32), np.ones(N, np.uint8)))
    soft = topk_soft_labels(np.zeros((N, 2, C), np.float32), k=4)
    knowledge = Knowledge(work=work, teacher_id="t", soft=soft, hidden_states={2: np.zeros((N, L, H), np.float16)},
                          attentions={1: np.zeros((N, HEADS, L, L), np.float16)}, ensemble=votes,
                          target_ids=np.zeros((N, 2), np.int32))
    work_bytes = N * 8 + N * L * 4 + N * L + N * 8 + N * L * 8 + N * 2 * 4 + N * 2
    topk_bytes = N * 2 * 4 * 4 + N * 2 * 4 * 4 + N * 2 * 4
    assert knowledge_nbytes(knowledge) == {
        "work": work_bytes, "soft": topk_bytes + 2 * (N * C * 4 + N), "hidden_states": N * L * H * 2,
        "attentions": N * HEADS * L * L * 2, "embeddings": 0, "target_ids": N * 2 * 4,
    }
    assert len(encode(knowledge)) > sum(knowledge_nbytes(knowledge).values())
    assert knowledge_nbytes(Knowledge(work=base, teacher_id="t"))["soft"] == 0
