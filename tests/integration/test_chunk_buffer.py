"""The student's buffer of chunks against a real Redis: a chunk whose siblings never come is given up
after held_chunk_timeout_s (left pending, not held again), reading it again from the pending list is
not progress (the stall check fires), and when its batch comes again its entry is acknowledged with it."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.chunking import Piece, chunk_teacher_id, slice_knowledge
from polydistill.storage.keys import JobKeys
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import JobStreams
from polydistill.student import consumer as consumer_module
from polydistill.student.consumer import ChunkLimits, KnowledgeConsumer, Round, StallError
from polydistill.student.strategy import SingleWorker

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.3


def knowledge(job_id: str) -> wire.Knowledge:
    work = wire.WorkBatch(job_id=job_id, epoch=0, batch_id=1, sample_ids=np.arange(4, dtype=np.int64),
                          languages=("eng",) * 4, input_ids=np.arange(12, dtype=np.int32).reshape(4, 3),
                          attention_mask=np.ones((4, 3), dtype=np.int8))
    return wire.Knowledge(work=work, teacher_id="t0", soft=wire.SoftLabels.full(np.ones((4, 2), np.float32)))


def first_of_two_chunks(job_id: str) -> bytes:
    return wire.encode(slice_knowledge(knowledge(job_id), Piece(slice(0, 2), slice(0, 3)),
                                       chunk_teacher_id("t0", 1, 2), 0.0))


@pytest.fixture
def student(redis_client, monkeypatch) -> KnowledgeConsumer:
    monkeypatch.setattr(consumer_module, "OWN_PENDING_EVERY_S", 0.0)  # look at the pending list every read
    keys = JobKeys("chunks")
    streams = JobStreams(redis_client, keys)
    streams.ensure_group(keys.knowledge_stream, keys.student_group())
    return KnowledgeConsumer(streams, keys, keys.student_group(), "student", EpochLedger(4, 1), shared_stream=False,
                             block_ms=20, reconnect_timeout_s=5,
                             chunk_limits=ChunkLimits(max_bytes=1024**2, timeout_s=TIMEOUT_S))


def pending(student: KnowledgeConsumer) -> int:
    return int(student.streams.client.xpending(student.stream, student.group)["pending"])


def test_an_orphan_chunk_is_given_up_left_pending_and_acknowledged_with_its_batch(student, caplog):
    streams, stream = student.streams, student.stream
    orphan = streams.add(stream, first_of_two_chunks(student.keys.job_id))
    (entry_id, payload), = student.read()
    assert entry_id == orphan and student.receive(entry_id, payload) is None  # held
    assert student.read() == []  # read again from the pending list: nothing new to hand on
    time.sleep(TIMEOUT_S)
    assert student.read() == []
    assert student.batches_given_up == 1 and not student.buffer.held and student.buffer.has_entry(orphan)
    assert "gave up batch 1 of epoch 0, 1 of its 2 chunks" in caplog.text and "held_chunk_timeout_s=0.3" in caplog.text
    assert pending(student) == 1  # left for the batch to come again
    assert student.read() == []  # and not held again

    whole = streams.add(stream, wire.encode(knowledge(student.keys.job_id)))
    (entry_id, payload), = student.read()
    learn = student.receive(entry_id, payload)
    assert learn is not None and learn.entry_ids == (whole, orphan)
    student.done(Round.of(learn))
    assert pending(student) == 0 and streams.backlog(stream) == 0


def test_an_orphan_chunk_read_again_does_not_hold_off_the_stall_check(student):
    worker = SingleWorker(student, stall_timeout_s=1.0)
    student.streams.add(student.stream, first_of_two_chunks(student.keys.job_id))
    fetched = worker.fetch(lambda: False)
    assert len(fetched) == 1 and worker.agree(*fetched[0]).learnt == ()
    started = time.monotonic()
    with pytest.raises(StallError, match="no knowledge for 1 s"):
        while time.monotonic() - started < 10:
            worker.fetch(lambda: False)
    assert time.monotonic() - started < 3
