"""Reading ahead against a real Redis: messages come decoded and in order, a message read ahead is never
handed to the loop twice (not even by the loop's look at its own pending entries), the time the loop
waits is counted, and what was read ahead but not handled stays pending when the student stops."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.keys import JobKeys
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import GroupMissing, JobStreams
from polydistill.student import consumer as consumer_module
from polydistill.student.consumer import KnowledgeConsumer, Round
from polydistill.student.strategy import SingleWorker

pytestmark = pytest.mark.integration

BATCHES = 6


def knowledge(job_id: str, batch_id: int) -> wire.Knowledge:
    work = wire.WorkBatch(job_id=job_id, epoch=0, batch_id=batch_id, sample_ids=np.arange(2) + 2 * batch_id,
                          languages=("eng",) * 2, input_ids=np.arange(6, dtype=np.int32).reshape(2, 3),
                          attention_mask=np.ones((2, 3), dtype=np.uint8))
    return wire.Knowledge(work=work, teacher_id="t0", soft=wire.SoftLabels.full(np.ones((2, 2), np.float32)))


@pytest.fixture
def consumer(redis_client, monkeypatch) -> KnowledgeConsumer:
    monkeypatch.setattr(consumer_module, "OWN_PENDING_EVERY_S", 0.0)  # the loop looks at its pending list every time
    keys = JobKeys("prefetch")
    streams = JobStreams(redis_client, keys)
    streams.ensure_group(keys.knowledge_stream, keys.student_group())
    return KnowledgeConsumer(streams, keys, keys.student_group(), "student", EpochLedger(BATCHES, 1),
                             shared_stream=False, block_ms=50, reconnect_timeout_s=5)


def pending(consumer: KnowledgeConsumer) -> int:
    return int(consumer.streams.client.xpending(consumer.stream, consumer.group)["pending"])


def learn_all(worker: SingleWorker, consumer: KnowledgeConsumer) -> list[int]:
    learnt, deadline = [], time.monotonic() + 20
    while not consumer.ledger.complete and time.monotonic() < deadline:
        for entry_id, payload in worker.fetch(lambda: False):
            round_ = worker.agree(entry_id, payload)
            consumer.done(round_)
            learnt += [batch.batch_id for batch in round_.learnt]
    return learnt


def test_every_batch_comes_once_in_order_decoded_ahead(consumer):
    for batch_id in range(BATCHES):
        consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, batch_id), wire.WireCodec()))
    worker = SingleWorker(consumer, stall_timeout_s=10, prefetch=2)
    decoded_ahead = []
    original = worker.prefetcher.take_decoded
    worker.prefetcher.take_decoded = lambda entry_id: decoded_ahead.append(original(entry_id)) or decoded_ahead[-1]
    try:
        assert learn_all(worker, consumer) == list(range(BATCHES))
    finally:
        worker.close()
    assert all(isinstance(message, wire.Knowledge) for message in decoded_ahead) and len(decoded_ahead) == BATCHES
    assert consumer.ledger.duplicates_dropped == 0 and pending(consumer) == 0
    assert not worker.prefetcher._read_before  # acknowledged entries are forgotten: the set does not grow


def test_the_reading_thread_stays_ahead_of_a_slow_step_and_the_wait_is_the_loops(consumer):
    worker = SingleWorker(consumer, stall_timeout_s=10, prefetch=3)
    try:
        assert worker.fetch(lambda: False) == []  # nothing yet: the loop waited block_ms for it
        assert consumer.take_waited_seconds() >= 0.04
        for batch_id in range(4):
            consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, batch_id)))
        (entry_id, payload), = worker.fetch(lambda: False)
        time.sleep(0.3)  # a step: meanwhile the thread reads the next three
        assert pending(consumer) == 4 and worker.prefetcher._ready.qsize() == 3
        consumer.done(worker.agree(entry_id, payload))
        started = time.perf_counter()
        (entry_id, payload), = worker.fetch(lambda: False)
        assert time.perf_counter() - started < 0.04 and consumer.take_waited_seconds() < 0.04
    finally:
        worker.close()
    # Read ahead, never handled: pending under this consumer, for a resumed run or the driver's re-feed.
    assert pending(consumer) == 3


def test_redis_losing_its_data_reaches_the_loop_and_reading_starts_again(consumer):
    worker = SingleWorker(consumer, stall_timeout_s=10, prefetch=2)
    try:
        consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, 0)))
        consumer.done(worker.agree(*worker.fetch(lambda: False)[0]))
        consumer.streams.client.delete(consumer.stream)
        with pytest.raises(GroupMissing):
            for _ in range(20):
                worker.prefetcher.next()
        consumer.streams.ensure_group(consumer.stream, consumer.group)
        consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, 1)))
        learnt, deadline = [], time.monotonic() + 10
        while not learnt and time.monotonic() < deadline:
            for entry_id, payload in worker.fetch(lambda: False):
                round_ = worker.agree(entry_id, payload)
                consumer.done(round_)
                learnt += [batch.batch_id for batch in round_.learnt]
        assert learnt == [1]
        readers = [thread for thread in threading.enumerate() if thread.name == "prefetch-student" and thread.is_alive()]
        assert len(readers) == 1  # the thread that ended with the error was not restarted twice
    finally:
        worker.close()


def test_what_an_earlier_run_left_pending_is_handed_on_once(consumer):
    entry = consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, 0)))
    assert [entry_id for entry_id, _ in consumer.read_new()] == [entry]  # read, then the run died
    consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, 1)))
    worker = SingleWorker(consumer, stall_timeout_s=10, prefetch=2)
    try:
        handed = []
        for _ in range(10):
            handed += [entry_id for entry_id, payload in worker.fetch(lambda: False)]
        assert handed.count(entry) == 1 and len(handed) == 2  # the pending one once, then the new one
    finally:
        worker.close()


def test_the_thread_sends_the_loops_acknowledgements_the_loop_never_waits_for_them(consumer):
    for batch_id in range(2):
        consumer.streams.add(consumer.stream, wire.encode(knowledge(consumer.keys.job_id, batch_id)))
    worker = SingleWorker(consumer, stall_timeout_s=10, prefetch=2)
    senders = []
    send = consumer.acknowledge_now
    consumer.acknowledge_now = lambda entry_ids: (senders.append(threading.get_ident()) if entry_ids else None,
                                                  send(entry_ids))
    try:
        (entry_id, payload), = worker.fetch(lambda: False)
        consumer.done(worker.agree(entry_id, payload))
        deadline = time.monotonic() + 5
        # Until the acknowledgement was sent and the second message is read ahead, not finished (pending 1 also
        # holds, for a moment, before the thread has read the second one).
        while not (senders and pending(consumer) == 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pending(consumer) == 1 and senders and threading.get_ident() not in senders
    finally:
        worker.close()
