"""A batch's knowledge in chunks under a message limit: the plan, the split, the reassembly, the gathering."""

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.chunking import (
    ChunkError,
    ChunkGather,
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
    # With the student's own tokenization beside the teacher's (student.tokenizer): rows of their own length.
    work = wire.WorkBatch(job_id="job", epoch=0, batch_id=0, sample_ids=np.arange(n), languages=("fra",) * n,
                          input_ids=rng.integers(0, 30, size=(n, length)),
                          attention_mask=np.ones((n, length), np.uint8), labels=np.arange(n) % 3,
                          student_input_ids=rng.integers(0, 30, size=(n, length + 3)),
                          student_attention_mask=np.ones((n, length + 3), np.uint8))
    return wire.Knowledge(
        work=work, teacher_id="teacher-1", soft=wire.SoftLabels.full(rng.normal(size=(n, 3)).astype(np.float32)),
        hidden_states={2: rng.normal(size=(n, length, hidden)).astype(np.float16)},
        attentions={1: rng.random((n, 2, length, length)).astype(np.float16)} if attentions else {},
        embeddings=rng.normal(size=(n, hidden)).astype(np.float16),
    )


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
    assert all(chunk.work.student_input_ids.shape == (chunk.work.n_samples, 35) for chunk in chunks)
    assert_same(merge_chunks(chunks), knowledge)


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


# --------------------------------------------------------------------------- gathering (student side)


def test_gather_completes_a_batch_once_whatever_the_order_and_the_copies():
    knowledge = lm_knowledge(n=8)
    payloads = knowledge_messages(knowledge, len(wire.encode(knowledge)) // 3)
    chunks = decode_all(payloads)
    count = len(chunks)
    assert count >= 3
    gather = ChunkGather()
    order = list(range(count))[::-1]  # last chunk first
    results = []
    for position, i in enumerate(order):
        entry = f"1-{i}".encode()
        results.append(gather.add(entry, len(payloads[i]), chunks[i]))
        if position == 0:
            # The same entry read again (this consumer's pending list): ignored, nothing to acknowledge yet.
            again = gather.add(entry, len(payloads[i]), chunks[i])
            assert again.knowledge is None and again.entry_ids == [] and not again.duplicate
            # A second copy of that chunk under another entry: a duplicate, to acknowledge at once.
            copy = gather.add(b"9-9", len(payloads[i]), chunks[i])
            assert copy.knowledge is None and copy.duplicate and copy.entry_ids == [b"9-9"]
    assert all(result.knowledge is None and result.entry_ids == [] for result in results[:-1])
    done = results[-1]
    assert_same(done.knowledge, knowledge)
    assert sorted(done.entry_ids) == sorted(f"1-{i}".encode() for i in range(count))  # every chunk, acked together
    assert done.payload_bytes == sum(len(payload) for payload in payloads)
    assert gather.partial == {}


def test_gather_keeps_batches_apart_and_discards_a_batch_applied_meanwhile():
    first, second = lm_knowledge(seed=1), lm_knowledge(seed=2)
    second = wire.Knowledge(work=wire.WorkBatch(**{**vars(second.work), "batch_id": 4}), teacher_id="teacher-0",
                            soft=second.soft)
    limit = len(wire.encode(first)) // 2
    gather = ChunkGather()
    a, b = decode_all(knowledge_messages(first, limit)), decode_all(knowledge_messages(second, limit))
    gather.add(b"1-0", 1, a[0])
    gather.add(b"2-0", 1, b[0])
    assert set(gather.partial) == {(1, 3), (1, 4)}
    assert gather.discard(1, 3) == [b"1-0"] and gather.discard(1, 3) == []
    for i, chunk in enumerate(b[1:], start=1):
        result = gather.add(f"2-{i}".encode(), 1, chunk)
    assert_same(result.knowledge, second)


def test_gather_takes_chunks_only():
    with pytest.raises(ValueError, match="takes chunks"):
        ChunkGather().add(b"1-0", 1, lm_knowledge())
