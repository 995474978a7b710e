"""A Redis at its memory limit (maxmemory, noeviction) refuses writes instead of evicting streams: a
producer waits and its write goes through once a consumer has freed memory, exactly once, and a
consumer is never held up by it. A private server with a tiny maxmemory plays the full Redis."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from polydistill.storage.keys import TEACHER_GROUP, JobKeys
from polydistill.storage.redis_server import PrivateRedisServer, default_maxmemory
from polydistill.storage.streams import JobStreams, RedisFull, connect

pytestmark = pytest.mark.integration

ENTRY = b"x" * 100_000  # each in a stream node of its own, freed whole when deleted
FREE_AFTER_S = 0.5


@pytest.fixture
def full_redis() -> Iterator[tuple[PrivateRedisServer, JobStreams]]:
    """A private server of 3 MB whose work stream holds entries until a write is refused for memory."""
    with PrivateRedisServer(maxmemory="3mb") as server:
        streams = JobStreams(connect(server.url, memory_wait_s=10), JobKeys("full"))
        work = streams.keys.work_stream
        streams.ensure_group(work, TEACHER_GROUP)
        plain = redis.Redis.from_url(server.url)  # refuses at once: to tell when Redis is full
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for _ in range(100):
                plain.xadd(work, {b"m": ENTRY})
        # Full whatever the clients' own buffers take, until a consumer frees a few entries.
        plain.config_set("maxmemory", int(plain.info("memory")["used_memory"]) - 2 * len(ENTRY))
        plain.close()
        yield server, streams


def free_memory_later(server: PrivateRedisServer, streams: JobStreams, entries: int = 5) -> threading.Thread:
    """A teacher that, after a while, takes some work and acknowledges (and deletes) it."""
    def consume() -> None:
        time.sleep(FREE_AFTER_S)
        consumer = JobStreams(connect(server.url), streams.keys)
        work = streams.keys.work_stream
        taken = consumer.read(work, TEACHER_GROUP, "t0", count=entries, block_ms=0)
        consumer.ack_and_delete(work, TEACHER_GROUP, [entry_id for entry_id, _ in taken])

    worker = threading.Thread(target=consume)
    worker.start()
    return worker


def test_a_producer_waits_for_memory_and_its_write_then_goes_through(full_redis, caplog):
    server, streams = full_redis
    work = streams.keys.work_stream
    before = streams.backlog(work)
    consumer = free_memory_later(server, streams)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="polydistill.storage.streams"):
        entry_id = streams.add(work, ENTRY)
    waited = time.monotonic() - started
    consumer.join()
    assert entry_id is not None and waited >= FREE_AFTER_S
    assert streams.backlog(work) == before - 5 + 1  # nothing lost, nothing twice
    assert "is at its memory limit (maxmemory, noeviction) and refused a write (XADD)" in caplog.text
    assert "accepted the write (XADD) after" in caplog.text


def test_a_refused_transaction_is_sent_again_whole_and_applied_once(full_redis):
    server, streams = full_redis
    keys = streams.keys
    # A teacher's publish: knowledge out, work acknowledged, a counter, in one MULTI/EXEC.
    (work_id, _), = streams.read(keys.work_stream, TEACHER_GROUP, "t1", count=1, block_ms=0)
    transaction = streams.client.pipeline(transaction=True)
    streams.publish_and_ack(keys.knowledge_stream, ENTRY, keys.work_stream, TEACHER_GROUP, work_id,
                            pipeline=transaction)
    transaction.hincrby(keys.metrics, "batches", 1)
    consumer = free_memory_later(server, streams)
    transaction.execute()
    consumer.join()
    assert streams.backlog(keys.knowledge_stream) == 1
    assert streams.client.hget(keys.metrics, "batches") == b"1"
    assert streams.delivery_counts(keys.work_stream, TEACHER_GROUP, [work_id]) == {}  # acknowledged


def test_a_plain_pipeline_sends_again_only_what_was_refused(full_redis):
    server, streams = full_redis
    work = streams.keys.work_stream
    before = streams.backlog(work)
    pipeline = streams.client.pipeline(transaction=False)
    pipeline.xlen(work)  # a read goes through at once
    pipeline.xadd(work, {b"m": ENTRY})
    consumer = free_memory_later(server, streams)
    length, entry_id = pipeline.execute()
    consumer.join()
    assert length == before and entry_id is not None
    assert streams.backlog(work) == before - 5 + 1


def test_a_producer_that_waits_too_long_is_told_what_to_change(full_redis):
    server, _ = full_redis
    impatient = JobStreams(connect(server.url, memory_wait_s=0.3), JobKeys("full"))
    started = time.monotonic()
    with pytest.raises(RedisFull, match=r"refused writes \(XADD\) for memory.*transport.private_redis_maxmemory"):
        impatient.add(impatient.keys.work_stream, ENTRY)
    assert 0.3 <= time.monotonic() - started < 3


def test_a_dead_letter_does_not_hold_a_consumer_up(full_redis, caplog):
    _, streams = full_redis
    started = time.monotonic()
    assert streams.dead_letter("1-1", ENTRY, "WireError: not msgpack", streams.keys.knowledge_stream) is None
    assert time.monotonic() - started < 1
    assert "the dead letter of entry 1-1" in caplog.text and "is not kept" in caplog.text
