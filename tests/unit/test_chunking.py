"""A batch's knowledge in chunks under a message limit: the plan, the split, the reassembly, the gathering."""

import dataclasses

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.schema import declared_fields
from polydistill.storage.chunking import (
    ChunkError,
    Piece,
    bytes_per_sample,
    chunk_tag,
    chunk_teacher_id,
    is_chunk,
    knowledge_messages,
    merge_chunks,
    plan_chunks,
    plan_pieces,
    windowable,
)

# --------------------------------------------------------------------------- planning (pure)


@pytest.mark.parametrize("n, size, limit", [(32, 100, 1000), (7, 10, 25), (5, 3, 1000), (10, 100, 99), (1, 5, 5)])
def test_plan_chunks_covers_every_row_once_within_the_limit(n, size, limit):
    slices = plan_chunks(n, size, limit)
    rows = [row for part in slices for row in range(n)[part]]
    assert rows == list(range(n))  # consecutive, in order, each row once
    per_chunk = max(1, limit // size)
    assert all(1 <= part.stop - part.start <= per_chunk for part in slices)
    assert len(slices) == -(-n // per_chunk)  # as few as the limit allows
    sizes = [part.stop - part.start for part in slices]
    assert max(sizes) - min(sizes) <= 1  # and evenly sized


def test_plan_chunks_rejects_non_positive_sizes():
    with pytest.raises(ValueError):
        plan_chunks(0, 10, 100)


def test_plan_pieces_whole_batch_rows_or_token_windows():
    assert plan_pieces(4, 10, 25, 100) == [Piece(slice(0, 4), slice(0, 10))]
    assert plan_pieces(4, 10, 25, 60) == [Piece(slice(0, 2), slice(0, 10)), Piece(slice(2, 4), slice(0, 10))]
    # A row of 250 bytes (25 a token) under a limit of 100: windows of 3, 4 and 3 tokens for each of 2 rows.
    pieces = plan_pieces(2, 10, 250, 100)
    assert pieces == [Piece(slice(row, row + 1), window) for row in (0, 1)
                      for window in (slice(0, 3), slice(3, 7), slice(7, 10))]
    with pytest.raises(ChunkError, match="cannot be split along the sequence"):
        plan_pieces(2, 10, 250, 100, windowable=False)
    with pytest.raises(ChunkError, match="single token"):
        plan_pieces(1, 2, 300, 100)


# --------------------------------------------------------------------------- split and merge


def lm_knowledge(n=6, length=32, k=16, vocab=100, seed=0) -> wire.Knowledge:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, size=n)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.uint8)
    work = wire.WorkBatch(job_id="job", epoch=1, batch_id=3, sample_ids=np.arange(100, 100 + n),
                          languages=tuple("eng_Latn" if i % 2 else "swh_Latn" for i in range(n)),
                          input_ids=rng.integers(0, vocab, size=(n, length)) * mask, attention_mask=mask)
    logits = rng.normal(size=(n, length, vocab)).astype(np.float32)
    return wire.Knowledge(work=work, teacher_id="teacher-0", soft=wire.topk_soft_labels(logits, k),
                          teacher_seconds=0.6)


def classifier_knowledge(n=5, length=32, hidden=64, attentions=False) -> wire.Knowledge:
    rng = np.random.default_rng(1)
    # With two students' own tokenizations beside the teacher's (trimmed vocabularies): rows of their own length.
    student_tokens = tuple(wire.StudentTokens(source, rng.integers(0, 30, size=(n, length + extra)),
                                              np.ones((n, length + extra), np.uint8))
                           for source, extra in (("teacher trimmed to pieces used 2+ times", 3),
                                                 ("teacher trimmed to pieces used 16+ times", 7)))
    work = wire.WorkBatch(job_id="job", epoch=0, batch_id=0, sample_ids=np.arange(n), languages=("fra",) * n,
                          input_ids=rng.integers(0, 30, size=(n, length)),
                          attention_mask=np.ones((n, length), np.uint8), labels=np.arange(n) % 3,
                          student_tokens=student_tokens)
    return wire.Knowledge(
        work=work, teacher_id="teacher-1", soft=wire.SoftLabels.full(rng.normal(size=(n, 3)).astype(np.float32)),
        hidden_states={2: rng.normal(size=(n, length, hidden)).astype(np.float16)},
        attentions={1: rng.random((n, 2, length, length)).astype(np.float16)} if attentions else {},
        embeddings=rng.normal(size=(n, hidden)).astype(np.float16),
    )


def several_teacher_knowledge(n=6, length=16, hidden=32) -> wire.Knowledge:
    """As the last teacher of a several-teacher job publishes it: the votes instead of soft labels, and
    hidden states from the first teacher; "africa" served only some rows."""
    rng = np.random.default_rng(2)
    work = wire.WorkBatch(job_id="job", epoch=0, batch_id=5, sample_ids=np.arange(n),
                          languages=tuple("swh_Latn" if i % 3 else "eng_Latn" for i in range(n)),
                          input_ids=rng.integers(0, 30, size=(n, length)),
                          attention_mask=np.ones((n, length), np.uint8), labels=np.arange(n) % 4)
    served = np.array([i % 3 != 0 for i in range(n)], np.uint8)
    votes = (wire.TeacherVote("teacher", rng.normal(size=(n, 4)).astype(np.float32), np.ones(n, np.uint8)),
             wire.TeacherVote("africa", rng.normal(size=(n, 4)).astype(np.float32) * served[:, None], served))
    return wire.Knowledge(work=work, teacher_id="teacher-0", ensemble=votes,
                          hidden_states={1: rng.normal(size=(n, length, hidden)).astype(np.float16)},
                          teacher_seconds=0.9)


def every_field_knowledge(n=24, length=8, target_length=12) -> wire.Knowledge:
    """Knowledge with every wire field filled in, per-token top-k soft labels along a decoder target
    longer than the input among them."""
    rng = np.random.default_rng(3)
    ones = np.ones((n, length), np.uint8)
    work = wire.WorkBatch(job_id="job", epoch=2, batch_id=7, sample_ids=np.arange(n), languages=("fra_Latn",) * n,
                          input_ids=rng.integers(0, 30, size=(n, length)), attention_mask=ones,
                          labels=np.arange(n) % 3, pair_input_ids=rng.integers(0, 30, size=(n, length + 1)),
                          pair_attention_mask=np.ones((n, length + 1), np.uint8),
                          token_labels=rng.integers(-1, 30, size=(n, length)),
                          student_input_ids=rng.integers(0, 30, size=(n, length + 2)),
                          student_attention_mask=np.ones((n, length + 2), np.uint8),
                          student_tokens=(wire.StudentTokens("own", rng.integers(0, 30, size=(n, length + 4)),
                                                             np.ones((n, length + 4), np.uint8)),),
                          task="translation",
                          align_targets=rng.normal(size=(n, 5)).astype(np.float16),
                          align_found=(np.arange(n) % 2).astype(np.uint8))
    votes = (wire.TeacherVote("teacher", rng.normal(size=(n, 3)).astype(np.float32), np.ones(n, np.uint8)),)
    return wire.Knowledge(
        work=work, teacher_id="teacher-3",
        soft=wire.topk_soft_labels(rng.normal(size=(n, target_length, 20)).astype(np.float32), 4),
        hidden_states={0: rng.normal(size=(n, length, 16)).astype(np.float16)},
        attentions={1: rng.random((n, 2, length, length)).astype(np.float16)},
        embeddings=rng.normal(size=(n, 16)).astype(np.float32), teacher_seconds=1.5, ensemble=votes,
        target_ids=rng.integers(0, 20, size=(n, target_length)).astype(np.int32),
    )


def assert_fields_equal(got, want, where: str = "knowledge") -> None:
    """Every field of two messages equal, nested messages and arrays (with their dtypes) included."""
    assert type(got) is type(want), where
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        np.testing.assert_array_equal(got, want, err_msg=where)
    elif dataclasses.is_dataclass(want):
        for field in dataclasses.fields(want):
            assert_fields_equal(getattr(got, field.name), getattr(want, field.name), f"{where}.{field.name}")
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_fields_equal(got[key], want[key], f"{where}[{key}]")
    elif isinstance(want, tuple) and want and dataclasses.is_dataclass(want[0]):
        assert len(got) == len(want), where
        for position, (got_item, want_item) in enumerate(zip(got, want)):
            assert_fields_equal(got_item, want_item, f"{where}[{position}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want), where  # teacher seconds: the chunks' shares summed
    else:
        assert got == want, where


def assert_same(a: wire.Knowledge, b: wire.Knowledge) -> None:
    assert wire.encode(wire.Knowledge(**{**vars(a), "teacher_seconds": 0.0})) == wire.encode(
        wire.Knowledge(**{**vars(b), "teacher_seconds": 0.0}))


def decode_all(payloads: list[bytes]) -> list[wire.Knowledge]:
    return [wire.decode(payload) for payload in payloads]


def test_knowledge_that_fits_travels_as_one_unchanged_message():
    knowledge = lm_knowledge()
    assert knowledge_messages(knowledge) == [wire.encode(knowledge)]
    assert not is_chunk(knowledge) and chunk_tag(knowledge) is None


def test_rows_split_under_the_limit_and_merge_back_bit_for_bit():
    knowledge = lm_knowledge()
    whole = len(wire.encode(knowledge))
    limit = whole // 2
    payloads = knowledge_messages(knowledge, limit)
    assert len(payloads) > 1 and all(len(payload) <= limit for payload in payloads)
    chunks = decode_all(payloads)
    assert [chunk_tag(chunk).index for chunk in chunks] == list(range(1, len(chunks) + 1))
    assert all(chunk_tag(chunk).count == len(chunks) and chunk_tag(chunk).teacher_id == "teacher-0" for chunk in chunks)
    assert sum(chunk.work.n_samples for chunk in chunks) == knowledge.work.n_samples
    merged = merge_chunks(chunks)
    assert_same(merged, knowledge)
    assert merged.teacher_seconds == pytest.approx(0.6)


def test_a_sample_too_large_alone_travels_in_token_windows():
    knowledge = lm_knowledge(n=3, length=64, k=32)
    limit = 1500 + bytes_per_sample(knowledge) // 3  # about a third of a sample fits beside the framing
    payloads = knowledge_messages(knowledge, limit)
    chunks = decode_all(payloads)
    assert all(len(payload) <= limit for payload in payloads)
    assert all(chunk.work.n_samples == 1 for chunk in chunks)
    assert len(chunks) >= 3 * 3 and all(chunk.work.seq_len < 64 for chunk in chunks)
    assert_same(merge_chunks(chunks), knowledge)


def test_classifier_knowledge_with_features_splits_by_rows():
    knowledge = classifier_knowledge()
    chunks = decode_all(knowledge_messages(knowledge, len(wire.encode(knowledge)) // 2))
    assert len(chunks) >= 2
    assert all([tokens.input_ids.shape for tokens in chunk.work.student_tokens]
               == [(chunk.work.n_samples, 35), (chunk.work.n_samples, 39)] for chunk in chunks)
    assert_same(merge_chunks(chunks), knowledge)


def test_several_teachers_votes_survive_chunking_and_mix_to_the_same_soft_labels():
    from polydistill.student.objectives import ensemble_soft_labels

    knowledge = several_teacher_knowledge()
    chunks = decode_all(knowledge_messages(knowledge, len(wire.encode(knowledge)) // 2))
    assert len(chunks) >= 2
    for chunk in chunks:  # each chunk carries its own rows' votes
        assert [vote.teacher for vote in chunk.ensemble] == ["teacher", "africa"]
        assert all(vote.logits.shape[0] == chunk.work.n_samples for vote in chunk.ensemble)
    merged = merge_chunks(chunks)
    assert_fields_equal(merged, knowledge)
    weights = {"teacher": 1.0, "africa": 3.0}
    whole = ensemble_soft_labels(knowledge, weights, temperature=2.0)
    assert_fields_equal(ensemble_soft_labels(merged, weights, temperature=2.0), whole)


def test_the_every_field_knowledge_leaves_no_field_empty():
    knowledge = every_field_knowledge()  # (soft labels: one of their two forms; the tests above cover both)
    for message in (knowledge, knowledge.work, knowledge.ensemble[0]):
        values = {name: getattr(message, name) for name, _ in declared_fields(type(message))}
        empty = [name for name, value in values.items()
                 if value is None or (isinstance(value, (tuple, dict)) and not value)]
        assert empty == [], f"fill in {type(message).__name__}.{empty} so that the chunking tests cover it"


def test_every_field_survives_chunking_by_rows():
    knowledge = every_field_knowledge()
    assert not windowable(knowledge)
    chunks = decode_all(knowledge_messages(knowledge, len(wire.encode(knowledge)) // 2))
    assert len(chunks) >= 2
    assert all(chunk.soft.topk_values.shape[1] == 12 for chunk in chunks)  # along the target, not the input
    assert_fields_equal(merge_chunks(chunks), knowledge)


def test_per_token_labels_travel_in_token_windows():
    lm = lm_knowledge(n=2, length=64, k=32)
    masked = np.where(np.arange(64) % 5 == 0, lm.work.input_ids, -100)  # masked LM: labels at masked positions
    knowledge = wire.Knowledge(work=wire.WorkBatch(**{**vars(lm.work), "token_labels": masked}),
                               teacher_id="teacher-0", soft=lm.soft, teacher_seconds=0.5)
    assert windowable(knowledge)
    chunks = decode_all(knowledge_messages(knowledge, 1500 + bytes_per_sample(knowledge) // 3))
    assert all(chunk.work.n_samples == 1 for chunk in chunks) and len(chunks) >= 2 * 3
    assert_fields_equal(merge_chunks(chunks), knowledge)


def test_a_chunk_is_not_split_again():
    knowledge = several_teacher_knowledge(n=16)
    limit = len(wire.encode(knowledge)) // 2
    chunk = decode_all(knowledge_messages(knowledge, limit))[0]
    assert knowledge_messages(chunk, limit) == [wire.encode(chunk)]  # a chunk that fits travels as it is
    with pytest.raises(ChunkError, match="one chunk of a batch already"):
        knowledge_messages(chunk, len(wire.encode(chunk)) - 1)


def test_chunks_that_disagree_are_refused():
    knowledge = several_teacher_knowledge()
    *chunks, last = decode_all(knowledge_messages(knowledge, len(wire.encode(knowledge)) // 2))
    swapped = wire.Knowledge(**{**vars(last), "ensemble": last.ensemble[::-1]})  # the votes in another order
    with pytest.raises(wire.WireError, match=r"disagree on knowledge\.ensemble\[0\]\.teacher"):
        merge_chunks([*chunks, swapped])


def test_rows_of_their_own_length_cannot_travel_in_token_windows():
    knowledge = classifier_knowledge(n=2, length=64)
    knowledge = wire.Knowledge(work=knowledge.work, teacher_id="t", hidden_states=knowledge.hidden_states)
    assert not windowable(knowledge)  # the student's own ids: a row of another length
    with pytest.raises(ChunkError, match="cannot be split along the sequence"):
        knowledge_messages(knowledge, 1500 + bytes_per_sample(knowledge) // 2)


def test_attention_maps_cannot_travel_in_token_windows():
    knowledge = classifier_knowledge(n=2, length=64, attentions=True)
    with pytest.raises(ChunkError, match="cannot be split along the sequence"):
        knowledge_messages(knowledge, 1500 + bytes_per_sample(knowledge) // 2)


def test_a_limit_above_the_wire_or_below_the_framing_is_refused():
    with pytest.raises(ValueError, match="exceeds the wire"):
        knowledge_messages(lm_knowledge(), wire.MAX_MESSAGE_BYTES + 1)
    with pytest.raises(ChunkError, match="no room"):
        knowledge_messages(lm_knowledge(), 1000)


def test_merge_needs_every_chunk_in_order():
    chunks = decode_all(knowledge_messages(lm_knowledge(), len(wire.encode(lm_knowledge())) // 3))
    with pytest.raises(wire.WireError, match="chunks 1..K"):
        merge_chunks(chunks[::-1])
    with pytest.raises(wire.WireError, match="chunks 1..K"):
        merge_chunks(chunks[:-1])


def test_chunk_tags():
    knowledge = lm_knowledge()
    tagged = wire.Knowledge(work=knowledge.work, teacher_id=chunk_teacher_id("teacher-2", 2, 5), soft=knowledge.soft)
    assert is_chunk(tagged) and (chunk_tag(tagged).teacher_id, chunk_tag(tagged).index, chunk_tag(tagged).count) == (
        "teacher-2", 2, 5)
    impossible = wire.Knowledge(work=knowledge.work, teacher_id="teacher-2 chunk 6/5", soft=knowledge.soft)
    with pytest.raises(wire.WireError, match="impossible"):
        chunk_tag(impossible)
