"""The consumer's decision about each delivered knowledge message: one row per case, no Redis, no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.chunking import Piece, chunk_tag, chunk_teacher_id, slice_knowledge
from polydistill.storage.ledger import EpochLedger
from polydistill.student.consumer import (
    DeadLetter,
    Duplicate,
    HeldBatch,
    Hold,
    ImpossibleState,
    Learn,
    LearntBatch,
    Redelivered,
    Round,
    decide,
)

JOB = "unit"
EPOCH, BATCH = 0, 1
KEY = (EPOCH, BATCH)


def knowledge(job_id: str = JOB, batch_id: int = BATCH) -> wire.Knowledge:
    work = wire.WorkBatch(job_id=job_id, epoch=EPOCH, batch_id=batch_id, sample_ids=np.arange(4, dtype=np.int64),
                          languages=("eng",) * 4, input_ids=np.arange(12, dtype=np.int32).reshape(4, 3),
                          attention_mask=np.ones((4, 3), dtype=np.int8))
    soft = wire.SoftLabels.full(np.arange(8, dtype=np.float32).reshape(4, 2))
    return wire.Knowledge(work=work, teacher_id="t0", soft=soft)


def chunk(index: int, count: int = 2) -> wire.Knowledge:
    """Chunk ``index`` (1-based) of ``count`` of the batch, split by rows as a teacher splits it."""
    rows = np.array_split(np.arange(4), count)[index - 1]
    piece = Piece(slice(int(rows[0]), int(rows[-1]) + 1), slice(0, 3))
    return slice_knowledge(knowledge(), piece, chunk_teacher_id("t0", index, count), 0.0)


def held(chunks: dict[int, str], count: int = 2, entry_ids: tuple = ()) -> dict:
    """The buffer holding the batch's chunks {index: the entry it came in}, 10 bytes each."""
    batch = HeldBatch(count, entry_ids=entry_ids)
    for index, entry_id in chunks.items():
        batch = batch.with_chunk(index, chunk(index, count), entry_id, 10)
    return {KEY: batch}


NOT_OURS = "not a knowledge message of this job"
IMPOSSIBLE_CHUNK = dataclasses.replace(chunk(1), teacher_id=chunk_teacher_id("t0", 3, 2))


def tag_error(message: wire.Knowledge) -> str:
    with pytest.raises(wire.WireError) as raised:
        chunk_tag(message)
    return str(raised.value)


# (case, entry id, delivered message or decode error, batch learnt already, chunks held before,
#  expected decision, expected chunks held after); every payload is 10 bytes.
ROWS = [
    ("not msgpack", "e", wire.WireError("not a msgpack message"), False, {},
     DeadLetter("not a msgpack message"), {}),
    ("a work batch, not knowledge", "e", knowledge().work, False, {}, DeadLetter(NOT_OURS), {}),
    ("knowledge of another job", "e", knowledge(job_id="other"), False, {}, DeadLetter(NOT_OURS), {}),
    ("a new whole batch", "e", knowledge(), False, {}, Learn(knowledge(), ("e",), 10), {}),
    ("a whole batch learnt already", "e", knowledge(), True, {}, Duplicate(("e",)), {}),
    ("the first chunk", "c1", chunk(1), False, {}, Hold(), held({1: "c1"})),
    ("the last chunk completes the batch", "c2", chunk(2), False, held({1: "c1"}),
     Learn(knowledge(), ("c1", "c2"), 20), {}),
    ("a held chunk delivered again", "c1", chunk(1), False, held({1: "c1"}), Redelivered(), held({1: "c1"})),
    ("a second copy of a held chunk", "e", chunk(1), False, held({1: "c1"}), Duplicate(("e",)), held({1: "c1"})),
    ("a late chunk of a batch learnt", "c2", chunk(2), True, held({1: "c1"}), Duplicate(("c2", "c1")), {}),
    ("a chunk of a batch learnt, none held", "c1", chunk(1), True, {}, Duplicate(("c1",)), {}),
    ("an impossible chunk tag", "e", IMPOSSIBLE_CHUNK, False, {}, DeadLetter(tag_error(IMPOSSIBLE_CHUNK)), {}),
    ("a batch split differently than before", "d1", chunk(1, count=3), False, held({1: "c1"}),
     Hold(), held({1: "d1"}, count=3, entry_ids=("c1",))),
]


def comparable(value):
    """Decisions and held chunks with their knowledge as plain lists, which == can compare."""
    if isinstance(value, wire.Knowledge):
        return (value.teacher_id, value.work.sample_ids.tolist(), value.soft.logits.tolist())
    if isinstance(value, (Learn, HeldBatch)):
        return type(value).__name__, {name: comparable(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    return value


@pytest.mark.parametrize("entry_id, message, learnt, before, decision, after", [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_decide(entry_id, message, learnt, before, decision, after):
    ledger = EpochLedger(batches_per_epoch=4, epochs=1)
    if learnt:
        ledger.record(EPOCH, BATCH, 4)
    got, kept = decide(entry_id, message, 10, job_id=JOB, ledger=ledger, held=before)
    assert comparable(got) == comparable(decision)
    assert comparable(kept) == comparable(after)


def test_decide_leaves_its_inputs_as_they_were():
    ledger, before = EpochLedger(batches_per_epoch=4, epochs=1), held({1: "c1"})
    decide("c2", chunk(2), 10, job_id=JOB, ledger=ledger, held=before)
    assert list(before[KEY].chunks) == [1] and ledger.batches_applied == 0 and ledger.duplicates_dropped == 0


@pytest.mark.parametrize("impossible", [held({1: "c1", 2: "c2"}), {KEY: HeldBatch(2, {5: chunk(1)}, ("c5",), 10)}],
                         ids=["a complete batch still held", "a chunk index beyond the count"])
def test_an_impossible_held_state_is_a_bug_not_garbage(impossible):
    ledger = EpochLedger(batches_per_epoch=4, epochs=1)
    with pytest.raises(ImpossibleState, match="never held"):
        decide("e", chunk(1), 10, job_id=JOB, ledger=ledger, held=impossible)


def test_a_round_of_one_learnt_batch():
    learn = Learn(knowledge(), ("c1", "c2"), 20)
    assert Round.of(learn) == Round(learn.knowledge, (LearntBatch(EPOCH, BATCH, 4),), 0, ("c1", "c2"), 20,
                                    wire.knowledge_nbytes(learn.knowledge))
