"""The consumer's decision about each delivered knowledge message: one row per case, no Redis, no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.chunking import Piece, chunk_tag, chunk_teacher_id, slice_knowledge
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.message_checks import ModelLimits
from polydistill.student.consumer import (
    ChunkBuffer,
    ChunkBufferTooSmall,
    ChunkLimits,
    DeadLetter,
    Duplicate,
    GivenUp,
    HeldBatch,
    Hold,
    ImpossibleState,
    Learn,
    LearntBatch,
    PastEnd,
    Redelivered,
    Round,
    StudentInputs,
    decide,
    give_up_stale,
)

JOB = "unit"
EPOCH, BATCH = 0, 1
KEY = (EPOCH, BATCH)
OTHER = (EPOCH, 2)  # another batch
NOW = 100.0  # the clock at each decision; chunks held before it were held at 0
LIMITS = ChunkLimits(max_bytes=30, timeout_s=60.0)


def knowledge(job_id: str = JOB, batch_id: int = BATCH, input_ids: np.ndarray | None = None) -> wire.Knowledge:
    input_ids = np.arange(12, dtype=np.int32).reshape(4, 3) if input_ids is None else input_ids
    work = wire.WorkBatch(job_id=job_id, epoch=EPOCH, batch_id=batch_id, sample_ids=np.arange(4, dtype=np.int64),
                          languages=("eng",) * 4, input_ids=input_ids,
                          attention_mask=np.ones(input_ids.shape, dtype=np.int8))
    soft = wire.SoftLabels.full(np.arange(8, dtype=np.float32).reshape(4, 2))
    return wire.Knowledge(work=work, teacher_id="t0", soft=soft)


def chunk(index: int, count: int = 2) -> wire.Knowledge:
    """Chunk ``index`` (1-based) of ``count`` of the batch, split by rows as a teacher splits it."""
    rows = np.array_split(np.arange(4), count)[index - 1]
    piece = Piece(slice(int(rows[0]), int(rows[-1]) + 1), slice(0, 3))
    return slice_knowledge(knowledge(), piece, chunk_teacher_id("t0", index, count), 0.0)


def held_batch(chunks: dict[int, str], count: int = 2, entry_ids: tuple = (), since: float = 0.0) -> HeldBatch:
    """A batch's chunks held {index: the entry it came in}, 10 bytes each, the first held at ``since``."""
    batch = HeldBatch(count, entry_ids=entry_ids, since=since)
    for index, entry_id in chunks.items():
        batch = batch.with_chunk(index, chunk(index, count), entry_id, 10)
    return batch


def held(chunks: dict[int, str], count: int = 2, entry_ids: tuple = (), since: float = 0.0,
         given_up: dict | None = None, **others: HeldBatch) -> ChunkBuffer:
    """The buffer holding batch KEY's chunks (and ``OTHER=`` another batch's), and the entries given up."""
    batches = {KEY: held_batch(chunks, count, entry_ids, since)} if chunks or entry_ids else {}
    if "OTHER" in others:
        batches[OTHER] = others["OTHER"]
    return ChunkBuffer(batches, given_up or {})


EMPTY = ChunkBuffer()


NOT_OURS = "not a knowledge message of this job"
IMPOSSIBLE_CHUNK = dataclasses.replace(chunk(1), teacher_id=chunk_teacher_id("t0", 3, 2))


def tag_error(message: wire.Knowledge) -> str:
    with pytest.raises(wire.WireError) as raised:
        chunk_tag(message)
    return str(raised.value)


# A batch given up (its chunk c1 left unacknowledged) and another batch held longer than KEY's.
GAVE_UP_C1 = {KEY: ("c1",)}
OLDER = held_batch({}, count=2, since=-5.0).with_chunk(1, chunk(1), "o1", 25)


def other_given_up(payload_bytes: int = 25) -> GivenUp:
    return GivenUp(OTHER, 1, 2, NOW + 5.0, payload_bytes, timed_out=False)


# The student every row decides for: a vocabulary of 12 ids (knowledge() uses 0..11) and 3 positions.
INPUTS = StudentInputs(ModelLimits(vocab_size=12, max_positions=3))
PAST_THE_VOCABULARY = knowledge(input_ids=np.full((4, 3), 12, dtype=np.int32))
TOO_LONG = knowledge(input_ids=np.zeros((4, 4), dtype=np.int32))
OUTSIDE_THE_PLAN = knowledge(batch_id=9)  # the ledger's plan: 1 epoch of 4 batches


# (case, entry id, delivered message or decode error, batch learnt already, buffer before,
#  expected decision, expected buffer after); every payload is 10 bytes, the buffer holds at most 30.
ROWS = [
    ("not msgpack", "e", wire.WireError("not a msgpack message"), False, EMPTY,
     DeadLetter("not a msgpack message"), EMPTY),
    ("a work batch, not knowledge", "e", knowledge().work, False, EMPTY, DeadLetter(NOT_OURS), EMPTY),
    ("knowledge of another job", "e", knowledge(job_id="other"), False, EMPTY, DeadLetter(NOT_OURS), EMPTY),
    # A batch that asks what the student cannot give is the sender's fault: refused before training,
    # naming the batch so that the driver counts its samples as dead-lettered.
    ("a batch outside the plan", "e", OUTSIDE_THE_PLAN, False, EMPTY,
     DeadLetter("batch 9 of epoch 0 is outside the plan (1 epochs x 4 batches)", (0, 9, 4)), EMPTY),
    ("a chunk of a batch outside the plan", "e", slice_knowledge(OUTSIDE_THE_PLAN, Piece(slice(0, 2), slice(0, 3)),
                                                                chunk_teacher_id("t0", 1, 2), 0.0), False, EMPTY,
     DeadLetter("batch 9 of epoch 0 is outside the plan (1 epochs x 4 batches)", (0, 9, 2)), EMPTY),
    ("token ids past the student's vocabulary", "e", PAST_THE_VOCABULARY, False, EMPTY,
     DeadLetter("WorkBatch.input_ids: token ids span [12, 12], outside the student's vocabulary of 12 (was the "
                "batch tokenised with another tokenizer?)", (0, 1, 4)), EMPTY),
    ("rows longer than the student's positions", "e", TOO_LONG, False, EMPTY,
     DeadLetter("WorkBatch.input_ids: rows of 4 tokens, but the student has 3 positions (data.max_length must "
                "not exceed the model's max_position_embeddings)", (0, 1, 4)), EMPTY),
    ("a new whole batch", "e", knowledge(), False, EMPTY, Learn(knowledge(), ("e",), 10), EMPTY),
    ("a whole batch learnt already", "e", knowledge(), True, EMPTY, Duplicate(("e",)), EMPTY),
    ("the first chunk", "c1", chunk(1), False, EMPTY, Hold(), held({1: "c1"}, since=NOW)),
    ("the last chunk completes the batch", "c2", chunk(2), False, held({1: "c1"}),
     Learn(knowledge(), ("c1", "c2"), 20), EMPTY),
    ("a held chunk delivered again", "c1", chunk(1), False, held({1: "c1"}), Redelivered(), held({1: "c1"})),
    ("a second copy of a held chunk", "e", chunk(1), False, held({1: "c1"}), Duplicate(("e",)), held({1: "c1"})),
    ("a late chunk of a batch learnt", "c2", chunk(2), True, held({1: "c1"}), Duplicate(("c2", "c1")), EMPTY),
    ("a chunk of a batch learnt, none held", "c1", chunk(1), True, EMPTY, Duplicate(("c1",)), EMPTY),
    ("an impossible chunk tag", "e", IMPOSSIBLE_CHUNK, False, EMPTY, DeadLetter(tag_error(IMPOSSIBLE_CHUNK)), EMPTY),
    ("a batch split differently than before", "d1", chunk(1, count=3), False, held({1: "c1"}),
     Hold(), held({1: "d1"}, count=3, entry_ids=("c1",), since=NOW)),
    ("a whole batch after chunks of it were held", "e", knowledge(), False, held({1: "c1"}),
     Learn(knowledge(), ("e", "c1"), 10), EMPTY),
    # The buffer's bounds: a chunk given up is not held again, and is acknowledged with its batch.
    ("a chunk given up, delivered again", "c1", chunk(1), False, held({}, given_up=GAVE_UP_C1),
     Redelivered(), held({}, given_up=GAVE_UP_C1)),
    ("the batch of a chunk given up, whole", "e", knowledge(), False, held({}, given_up=GAVE_UP_C1),
     Learn(knowledge(), ("e", "c1"), 10), EMPTY),
    ("the batch of a chunk given up, in new chunks", "d2", chunk(2), False,
     held({1: "d1"}, given_up=GAVE_UP_C1), Learn(knowledge(), ("d1", "d2", "c1"), 20), EMPTY),
    ("a chunk of a batch learnt, another given up", "d1", chunk(1), True, held({}, given_up=GAVE_UP_C1),
     Duplicate(("d1", "c1")), EMPTY),
    ("a chunk beyond the bytes gives up the batch held longest", "c1", chunk(1), False, held({}, OTHER=OLDER),
     Hold((other_given_up(),)), held({1: "c1"}, since=NOW, given_up={OTHER: ("o1",)})),
    ("a chunk within the bytes gives up nothing", "c2", chunk(2), False,
     held({}, OTHER=held_batch({}, since=-5.0).with_chunk(1, chunk(1), "o1", 10)),
     Hold(), held({2: "c2"}, since=NOW, OTHER=held_batch({}, since=-5.0).with_chunk(1, chunk(1), "o1", 10))),
]


def comparable(value):
    """Decisions and held chunks with their knowledge as plain lists, which == can compare."""
    if isinstance(value, wire.Knowledge):
        return (value.teacher_id, value.work.sample_ids.tolist(), value.soft.logits.tolist())
    if isinstance(value, (Learn, HeldBatch, ChunkBuffer, Hold)):
        return type(value).__name__, {name: comparable(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(comparable(item) for item in value)
    return value


@pytest.mark.parametrize("entry_id, message, learnt, before, decision, after", [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_decide(entry_id, message, learnt, before, decision, after):
    ledger = EpochLedger(batches_per_epoch=4, epochs=1)
    if learnt:
        ledger.record(EPOCH, BATCH, 4)
    got, kept = decide(entry_id, message, 10, job_id=JOB, ledger=ledger, buffer=before, now=NOW, limits=LIMITS,
                       inputs=INPUTS)
    assert comparable(got) == comparable(decision)
    assert comparable(kept) == comparable(after)


def test_a_batch_past_the_end_of_a_shortened_plan_is_dropped_with_the_chunks_held_for_it():
    ledger = EpochLedger(batches_per_epoch=4, epochs=2)
    late = dataclasses.replace(knowledge(), work=dataclasses.replace(knowledge().work, epoch=1))
    assert comparable(decide("e", late, 10, job_id=JOB, ledger=ledger, buffer=EMPTY, now=NOW, limits=LIMITS,
                             inputs=INPUTS)[0]) == comparable(Learn(late, ("e",), 10))
    ledger.end_after(0)  # training stopped early after epoch 0
    got, kept = decide("e", late, 10, job_id=JOB, ledger=ledger, buffer=ChunkBuffer({(1, BATCH): held_batch({1: "c1"})}, {}),
                       now=NOW, limits=LIMITS, inputs=INPUTS)
    assert got == PastEnd(("e", "c1")) and kept == EMPTY


def test_chunks_held_of_epochs_past_a_shortened_plan_are_let_go_with_their_entries():
    buffer = ChunkBuffer({(0, 1): held_batch({1: "a1"}), (2, 1): held_batch({1: "c1"})}, {(3, 0): ("d1", "d2")})
    kept, entries = buffer.past_end(1)
    assert set(kept.held) == {(0, 1)} and kept.given_up == {} and sorted(entries) == ["c1", "d1", "d2"]
    assert buffer.past_end(3) == (buffer, ())


def test_decide_leaves_its_inputs_as_they_were():
    ledger, before = EpochLedger(batches_per_epoch=4, epochs=1), held({1: "c1"})
    decide("c2", chunk(2), 10, job_id=JOB, ledger=ledger, buffer=before, now=NOW, limits=LIMITS)
    assert list(before.held[KEY].chunks) == [1] and ledger.batches_applied == 0 and ledger.duplicates_dropped == 0


@pytest.mark.parametrize("impossible", [held({1: "c1", 2: "c2"}),
                                        ChunkBuffer({KEY: HeldBatch(2, {5: chunk(1)}, ("c5",), 10)})],
                         ids=["a complete batch still held", "a chunk index beyond the count"])
def test_an_impossible_held_state_is_a_bug_not_garbage(impossible):
    ledger = EpochLedger(batches_per_epoch=4, epochs=1)
    with pytest.raises(ImpossibleState, match="never held"):
        decide("e", chunk(1), 10, job_id=JOB, ledger=ledger, buffer=impossible, now=NOW, limits=LIMITS)


def test_a_batch_larger_than_the_buffer_names_the_setting_to_raise():
    ledger = EpochLedger(batches_per_epoch=4, epochs=1)
    small = ChunkLimits(max_bytes=15, timeout_s=60.0)
    with pytest.raises(ChunkBufferTooSmall, match=r"batch 1 of epoch 0 comes in 3 chunks.*"
                       r"transport.max_held_chunk_bytes=15.*about 30 bytes"):
        decide("c2", chunk(2, count=3), 10, job_id=JOB, ledger=ledger, buffer=held({1: "c1"}, count=3),
               now=NOW, limits=small)


# (case, buffer before, the clock, expected buffer after, expected batches given up); timeout 60 s.
STALE_ROWS = [
    ("nothing held", EMPTY, NOW, EMPTY, ()),
    ("held for less than the timeout", held({1: "c1"}, since=NOW - 59), NOW, held({1: "c1"}, since=NOW - 59), ()),
    ("held for the timeout", held({1: "c1"}, since=NOW - 60), NOW, held({}, given_up={KEY: ("c1",)}),
     (GivenUp(KEY, 1, 2, 60.0, 10, timed_out=True),)),
    ("only the batches held too long", held({1: "c1"}, since=NOW - 1, OTHER=OLDER), NOW,
     held({1: "c1"}, since=NOW - 1, given_up={OTHER: ("o1",)}), (GivenUp(OTHER, 1, 2, NOW + 5.0, 25, timed_out=True),)),
    ("given up again with earlier entries of its batch", held({1: "d1"}, given_up={KEY: ("c1",)}), NOW,
     held({}, given_up={KEY: ("c1", "d1")}), (GivenUp(KEY, 1, 2, NOW, 10, timed_out=True),)),
]


@pytest.mark.parametrize("before, now, after, given_up", [row[1:] for row in STALE_ROWS],
                         ids=[row[0] for row in STALE_ROWS])
def test_give_up_stale(before, now, after, given_up):
    kept, gone = give_up_stale(before, now, LIMITS)
    assert comparable(kept) == comparable(after)
    assert gone == given_up


def test_a_round_of_one_learnt_batch():
    learn = Learn(knowledge(), ("c1", "c2"), 20)
    assert Round.of(learn) == Round(learn.knowledge, (LearntBatch(EPOCH, BATCH, 4),), 0, ("c1", "c2"), 20,
                                    wire.knowledge_nbytes(learn.knowledge))
