from __future__ import annotations

import threading
import time

import pytest
import redis

from polydistill.storage.keys import TEACHER_GROUP, JobKeys, student_group
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import BackpressureTimeout, JobStreams, connect, redact_url

pytestmark = pytest.mark.integration

TEACHERS = TEACHER_GROUP


@pytest.fixture
def streams(redis_client: redis.Redis) -> JobStreams:
    job = JobStreams(redis_client, JobKeys("job-a"))
    job.ensure_group(job.keys.work_stream, TEACHERS)
    return job


def fill(streams: JobStreams, count: int) -> list[str]:
    return [streams.add(streams.keys.work_stream, b"work-%d" % i) for i in range(count)]


# -- groups, read, ack ------------------------------------------------------- #


def test_ensure_group_creates_stream_and_is_idempotent(streams: JobStreams):
    work = streams.keys.work_stream
    streams.ensure_group(work, TEACHERS)  # second call: BUSYGROUP is ignored
    groups = streams.client.xinfo_groups(work)
    assert [g["name"] for g in groups] == [TEACHERS.encode()]
    assert streams.backlog(work) == 0


def test_group_created_late_still_sees_earlier_entries(streams: JobStreams):
    knowledge = streams.keys.knowledge_stream
    streams.add(knowledge, b"early")
    streams.ensure_group(knowledge, student_group("late"))
    got = streams.read(knowledge, student_group("late"), "s0", count=10, block_ms=0)
    assert [payload for _, payload in got] == [b"early"]


def test_read_returns_payloads_in_order_and_delivers_each_once(streams: JobStreams):
    ids = fill(streams, 3)
    work = streams.keys.work_stream
    first = streams.read(work, TEACHERS, "t0", count=2, block_ms=0)
    second = streams.read(work, TEACHERS, "t1", count=10, block_ms=0)
    assert first == [(ids[0], b"work-0"), (ids[1], b"work-1")]
    assert second == [(ids[2], b"work-2")]
    assert streams.read(work, TEACHERS, "t0", count=10, block_ms=0) == []


def test_read_blocks_until_an_entry_arrives(streams: JobStreams):
    work = streams.keys.work_stream
    timer = threading.Timer(0.2, lambda: streams.add(work, b"late"))
    timer.start()
    started = time.monotonic()
    got = streams.read(work, TEACHERS, "t0", count=1, block_ms=3000)
    timer.join()
    assert [payload for _, payload in got] == [b"late"]
    assert 0.1 < time.monotonic() - started < 2.5


def test_read_rejects_block_longer_than_socket_timeout(redis_server: PrivateRedisServer):
    client = connect(redis_server.url, socket_timeout=1)
    job = JobStreams(client, JobKeys("job-a"))
    with pytest.raises(ValueError, match="shorter than the client's socket_timeout"):
        job.read(job.keys.work_stream, TEACHERS, "t0", count=1, block_ms=1000)
    client.close()


def test_ack_and_delete_shrinks_backlog_and_clears_pending(streams: JobStreams):
    work = streams.keys.work_stream
    fill(streams, 3)
    got = streams.read(work, TEACHERS, "t0", count=3, block_ms=0)
    assert streams.backlog(work) == 3  # delivered but unacknowledged still counts

    assert streams.ack_and_delete(work, TEACHERS, [got[0][0], got[1][0]]) == 2
    assert streams.backlog(work) == 1
    assert streams.client.xpending(work, TEACHERS)["pending"] == 1
    # Acknowledging again is harmless and reports that nothing was pending.
    assert streams.ack_and_delete(work, TEACHERS, [got[0][0]]) == 0
    assert streams.ack_and_delete(work, TEACHERS, []) == 0


def test_writes_can_share_a_callers_pipeline(streams: JobStreams):
    work = streams.keys.work_stream
    pipe = streams.client.pipeline(transaction=True)
    assert streams.add(work, b"a", pipeline=pipe) is None
    assert streams.add(work, b"b", pipeline=pipe) is None
    pipe.hincrby(streams.keys.metrics, "batches_fed", 2)
    assert streams.backlog(work) == 0  # nothing sent before execute()
    pipe.execute()
    assert streams.backlog(work) == 2
    assert streams.client.hget(streams.keys.metrics, "batches_fed") == b"2"


# -- backpressure ------------------------------------------------------------ #


def test_wait_for_room_returns_at_once_below_the_limit(streams: JobStreams):
    fill(streams, 2)
    assert streams.wait_for_room(streams.keys.work_stream, 3, timeout_s=0.01) is True


def test_wait_for_room_blocks_until_a_consumer_acks(redis_server, streams: JobStreams):
    work = streams.keys.work_stream
    fill(streams, 2)
    consumer_client = connect(redis_server.url)
    consumer = JobStreams(consumer_client, streams.keys)
    acked_at: list[float] = []

    def consume_after_delay() -> None:
        time.sleep(0.3)
        (entry_id, _), = consumer.read(work, TEACHERS, "t0", count=1, block_ms=0)
        acked_at.append(time.monotonic())
        consumer.ack_and_delete(work, TEACHERS, [entry_id])

    worker = threading.Thread(target=consume_after_delay)
    worker.start()
    assert streams.wait_for_room(work, 2, timeout_s=5, poll_s=0.01) is True
    returned_at = time.monotonic()
    worker.join()
    consumer_client.close()

    assert acked_at, "the consumer never ran"
    assert returned_at >= acked_at[0]  # it did wait for the ack
    assert streams.backlog(work) == 1


def test_wait_for_room_times_out_naming_stream_and_setting(streams: JobStreams):
    work = streams.keys.work_stream
    fill(streams, 2)
    started = time.monotonic()
    with pytest.raises(BackpressureTimeout) as caught:
        streams.wait_for_room(work, 2, timeout_s=0.2, poll_s=0.02)
    assert 0.2 <= time.monotonic() - started < 2
    assert work in str(caught.value)
    assert "2 entries, at or above transport.max_work_backlog=2" in str(caught.value)
    assert streams.backlog(work) == 2  # nothing was trimmed to make room


def test_wait_for_room_waits_on_bytes_below_the_entry_limit(redis_server, streams: JobStreams):
    work = streams.keys.work_stream
    streams.add(work, b"x" * 200_000)
    assert streams.backlog_bytes(work) >= 200_000
    with pytest.raises(BackpressureTimeout, match="bytes, at or above transport.max_work_backlog_bytes=100000"):
        streams.wait_for_room(work, 100, max_bytes=100_000, timeout_s=0.2, poll_s=0.02)
    consumer = JobStreams(connect(redis_server.url), streams.keys)
    (entry_id, _), = consumer.read(work, TEACHERS, "t0", count=1, block_ms=0)
    threading.Timer(0.2, lambda: consumer.ack_and_delete(work, TEACHERS, [entry_id])).start()
    assert streams.wait_for_room(work, 100, max_bytes=100_000, timeout_s=5, poll_s=0.01) is True
    assert streams.backlog_bytes(work) < 100_000  # the entry's bytes left the stream with it


def test_backlog_bytes_follow_a_trim_below_the_slowest_group(streams: JobStreams):
    knowledge = streams.keys.knowledge_stream
    for name in ("a", "b"):
        streams.ensure_group(knowledge, student_group(name))
    streams.add(knowledge, b"k" * 100_000)
    (entry_id, _), = streams.read(knowledge, student_group("a"), "a", count=1, block_ms=0)
    streams.read(knowledge, student_group("b"), "b", count=1, block_ms=0)
    streams.ack_and_trim(knowledge, student_group("a"), [entry_id])
    assert streams.backlog_bytes(knowledge) >= 100_000  # the slower student still holds it
    streams.ack_and_trim(knowledge, student_group("b"), [entry_id])
    assert streams.backlog_bytes(knowledge) < 100_000
    assert streams.backlog_bytes("polydistill:job-a:no-such-stream") == 0


def test_wait_for_room_gives_up_when_asked_to_stop(streams: JobStreams):
    fill(streams, 1)
    assert streams.wait_for_room(streams.keys.work_stream, 1, timeout_s=5, should_stop=lambda: True) is False


# -- publish_and_ack --------------------------------------------------------- #


def test_publish_and_ack_moves_a_batch_atomically(streams: JobStreams):
    work, knowledge = streams.keys.work_stream, streams.keys.knowledge_stream
    fill(streams, 1)
    ((entry_id, _),) = streams.read(work, TEACHERS, "t0", count=1, block_ms=0)

    result = streams.publish_and_ack(knowledge, b"soft-labels", work, TEACHERS, entry_id)

    assert result.input_was_pending is True
    assert streams.backlog(work) == 0
    assert streams.client.xpending(work, TEACHERS)["pending"] == 0
    assert streams.client.xrange(knowledge) == [(result.entry_id.encode(), {b"m": b"soft-labels"})]


def test_publish_and_ack_runs_as_one_multi_exec(redis_server, streams: JobStreams):
    work, knowledge = streams.keys.work_stream, streams.keys.knowledge_stream
    fill(streams, 1)
    ((entry_id, _),) = streams.read(work, TEACHERS, "t0", count=1, block_ms=0)

    # MONITOR shows every command the server runs, in order: the publish and the
    # ack must sit between one MULTI and its EXEC, so a teacher that dies midway
    # leaves neither applied.
    watcher = connect(redis_server.url, socket_timeout=5)  # fail, not hang, if EXEC never comes
    with watcher.monitor() as monitor:
        streams.publish_and_ack(knowledge, b"k", work, TEACHERS, entry_id)
        seen: list[str] = []
        while "EXEC" not in seen:
            name = monitor.next_command()["command"].split()[0].upper()
            if name in {"MULTI", "XADD", "XACK", "XDEL", "EXEC"}:
                seen.append(name)
    watcher.close()
    assert seen == ["MULTI", "XADD", "XACK", "XDEL", "EXEC"]


def test_publish_and_ack_on_a_callers_pipeline_applies_nothing_before_exec(streams: JobStreams):
    work, knowledge = streams.keys.work_stream, streams.keys.knowledge_stream
    fill(streams, 1)
    ((entry_id, _),) = streams.read(work, TEACHERS, "t0", count=1, block_ms=0)
    pipe = streams.client.pipeline(transaction=True)
    assert streams.publish_and_ack(knowledge, b"k", work, TEACHERS, entry_id, pipeline=pipe) is None
    pipe.hincrby(streams.keys.metrics, "batches_taught", 1)
    assert (streams.backlog(work), streams.backlog(knowledge)) == (1, 0)
    pipe.execute()
    assert (streams.backlog(work), streams.backlog(knowledge)) == (0, 1)
    assert streams.client.hget(streams.keys.metrics, "batches_taught") == b"1"


def test_publish_and_ack_reports_a_duplicate_when_input_was_already_acked(streams: JobStreams):
    work, knowledge = streams.keys.work_stream, streams.keys.knowledge_stream
    fill(streams, 1)
    ((entry_id, _),) = streams.read(work, TEACHERS, "t0", count=1, block_ms=0)
    first = streams.publish_and_ack(knowledge, b"k", work, TEACHERS, entry_id)
    second = streams.publish_and_ack(knowledge, b"k", work, TEACHERS, entry_id)
    assert (first.input_was_pending, second.input_was_pending) == (True, False)
    assert streams.backlog(knowledge) == 2


# -- recovery: pending and reclaim ------------------------------------------- #


def test_read_pending_returns_own_unacked_entries_after_restart(streams: JobStreams):
    work = streams.keys.work_stream
    ids = fill(streams, 3)
    streams.read(work, TEACHERS, "t0", count=2, block_ms=0)
    streams.read(work, TEACHERS, "t1", count=1, block_ms=0)
    streams.ack_and_delete(work, TEACHERS, [ids[0]])

    assert streams.read_pending(work, TEACHERS, "t0", count=10) == [(ids[1], b"work-1")]
    assert streams.read_pending(work, TEACHERS, "t1", count=10) == [(ids[2], b"work-2")]
    assert streams.read_pending(work, TEACHERS, "t2", count=10) == []


def test_read_pending_skips_and_clears_entries_deleted_while_pending(streams: JobStreams):
    work = streams.keys.work_stream
    ids = fill(streams, 2)
    streams.read(work, TEACHERS, "t0", count=2, block_ms=0)
    streams.client.xdel(work, ids[0])
    assert streams.read_pending(work, TEACHERS, "t0", count=10) == [(ids[1], b"work-1")]
    assert streams.client.xpending(work, TEACHERS)["pending"] == 1


def test_reclaim_takes_over_a_dead_consumers_entries(streams: JobStreams):
    work = streams.keys.work_stream
    ids = fill(streams, 4)
    streams.read(work, TEACHERS, "dead", count=3, block_ms=0)
    streams.read(work, TEACHERS, "alive", count=1, block_ms=0)

    assert streams.reclaim(work, TEACHERS, "rescuer", min_idle_ms=60_000, count=10) == []
    time.sleep(0.12)
    streams.client.xclaim(work, TEACHERS, "alive", 0, [ids[3]])  # "alive" just touched its entry
    reclaimed = streams.reclaim(work, TEACHERS, "rescuer", min_idle_ms=100, count=10)

    assert reclaimed == [(ids[0], b"work-0"), (ids[1], b"work-1"), (ids[2], b"work-2")]
    by_consumer = {c["name"]: c["pending"] for c in streams.client.xinfo_consumers(work, TEACHERS)}
    assert by_consumer[b"rescuer"] == 3 and by_consumer[b"dead"] == 0 and by_consumer[b"alive"] == 1


def test_reclaim_respects_count_and_skips_deleted_entries(streams: JobStreams):
    work = streams.keys.work_stream
    ids = fill(streams, 5)
    streams.read(work, TEACHERS, "dead", count=5, block_ms=0)
    streams.client.xdel(work, ids[0])

    first = streams.reclaim(work, TEACHERS, "rescuer", min_idle_ms=0, count=2)
    assert first == [(ids[1], b"work-1"), (ids[2], b"work-2")]
    rest = streams.reclaim(work, TEACHERS, "rescuer2", min_idle_ms=0, count=10)
    assert [entry_id for entry_id, _ in rest] == [ids[1], ids[2], ids[3], ids[4]]


# -- dead letters and cleanup ------------------------------------------------ #


def test_dead_letter_keeps_the_head_of_the_payload_its_size_reason_and_origin(streams: JobStreams):
    work = streams.keys.work_stream
    (entry_id,) = fill(streams, 1)
    dead_id = streams.dead_letter(entry_id, b"\xc1garbage", "WireError: not msgpack", work)

    ((stored_id, fields),) = streams.client.xrange(streams.keys.dead_letter_stream)
    assert stored_id.decode() == dead_id
    assert fields == {
        b"payload_head": b"\xc1garbage",
        b"payload_bytes": b"8",
        b"reason": b"WireError: not msgpack",
        b"source_stream": work.encode(),
        b"source_id": entry_id.encode(),
    }


def test_a_dead_letter_never_keeps_a_whole_large_payload(redis_client: redis.Redis):
    streams = JobStreams(redis_client, JobKeys("job-a"), dead_letter_payload_bytes=16)
    payload = bytes(range(256)) * 40_000  # 10 MB of garbage
    pipeline = redis_client.pipeline(transaction=True)
    streams.dead_letter("1-1", payload, "WireError: not msgpack", "s", pipeline=pipeline)
    streams.dead_letter("1-2", payload, "too big", "s")
    pipeline.execute()
    records = [fields for _, fields in redis_client.xrange(streams.keys.dead_letter_stream)]
    assert [fields[b"payload_head"] for fields in records] == [payload[:16]] * 2
    assert [fields[b"payload_bytes"] for fields in records] == [str(len(payload)).encode()] * 2
    assert streams.backlog_bytes(streams.keys.dead_letter_stream) < 16 * 1024  # not the 20 MB of two payloads


def test_dead_letter_stream_is_capped(redis_client: redis.Redis):
    streams = JobStreams(redis_client, JobKeys("job-a"), dead_letter_maxlen=10)
    for i in range(500):
        streams.dead_letter(f"1-{i}", b"x", "bad", "s")
    # Approximate trimming removes whole macro-nodes: bounded, not exact.
    assert streams.backlog(streams.keys.dead_letter_stream) < 250


def test_entry_without_payload_field_reads_as_empty_bytes(streams: JobStreams):
    work = streams.keys.work_stream
    streams.client.xadd(work, {b"foreign": b"1"})
    ((_, payload),) = streams.read(work, TEACHERS, "t0", count=1, block_ms=0)
    assert payload == b""


def test_delete_job_keys_removes_only_this_job(redis_client: redis.Redis):
    ours = JobStreams(redis_client, JobKeys("job"))
    theirs = JobStreams(redis_client, JobKeys("job-2"))
    for job in (ours, theirs):
        job.ensure_group(job.keys.work_stream, TEACHERS)
        job.add(job.keys.knowledge_stream, b"k")
        redis_client.hset(job.keys.control, "stop", 0)
    redis_client.set("polydistill:jobless", 1)

    assert ours.delete_job_keys() == 3
    remaining = sorted(key.decode() for key in redis_client.keys("*"))
    assert remaining == [
        "polydistill:job-2:control",
        "polydistill:job-2:knowledge",
        "polydistill:job-2:work",
        "polydistill:jobless",
    ]
    assert ours.delete_job_keys() == 0


# -- connecting ------------------------------------------------------------- #


def test_password_protected_server_requires_auth():
    with PrivateRedisServer(password="s3cret/with:odd@chars") as server:
        anonymous = connect(f"redis://127.0.0.1:{server.port}/0")
        wrong = connect(f"redis://127.0.0.1:{server.port}/0", password="nope")
        started = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        assert time.monotonic() - started < 2  # a bad password is not retried with backoff

        by_argument = connect(f"redis://127.0.0.1:{server.port}/0", password="s3cret/with:odd@chars")
        assert by_argument.ping() is True
        by_url = connect(server.url)
        by_url.set("k", b"v")
        assert by_url.get("k") == b"v"  # bytes: decode_responses is off
        for client in (anonymous, wrong, by_argument, by_url):
            client.close()


def test_connect_rejects_conflicting_or_unsupported_settings():
    with pytest.raises(ValueError, match="both in the URL and as an argument"):
        connect("redis://:a@localhost:1/0", password="b")
    with pytest.raises(ValueError, match="use rediss://"):
        connect("redis://localhost:1/0", tls_ca_file="/etc/ssl/ca.pem")
    with pytest.raises(ValueError, match=r"redis:// or rediss://") as caught:
        connect("http://:hunter2@localhost/0")
    assert "hunter2" not in str(caught.value)


def test_connect_uses_tls_for_rediss_urls():
    client = connect("rediss://localhost:1/0", tls_ca_file="/etc/ssl/ca.pem")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:hunter2@host:6380/1", "rediss://alice:***@host:6380/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?password=hunter2&db=1", "redis://host/0?password=***&db=1"),
    ],
)
def test_redact_url_hides_the_password(url, shown):
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


# -- several groups on one stream (fan-out) ------------------------------------ #


def test_fanout_keeps_an_entry_until_every_group_has_acknowledged_it(streams: JobStreams):
    knowledge = streams.keys.knowledge_stream
    fast, slow = student_group("fast"), student_group("slow")
    for group in (fast, slow):
        streams.ensure_group(knowledge, group)
    ids = [streams.add(knowledge, b"k-%d" % i) for i in range(4)]

    got_fast = streams.read(knowledge, fast, "f", count=10, block_ms=0)
    assert streams.ack_and_trim(knowledge, fast, [entry for entry, _ in got_fast]) == 4
    assert streams.backlog(knowledge) == 4  # the slow group has read nothing yet

    got_slow = streams.read(knowledge, slow, "s", count=3, block_ms=0)
    assert [payload for _, payload in got_slow] == [b"k-0", b"k-1", b"k-2"]
    streams.ack_and_trim(knowledge, slow, [ids[0], ids[2]])  # ids[1] still pending in the slow group
    assert [entry for entry, _ in streams.client.xrange(knowledge)] == [i.encode() for i in ids[1:]]

    streams.ack_and_trim(knowledge, slow, [ids[1]])
    assert streams.backlog(knowledge) == 1  # k-3: delivered to the fast group only
    assert streams.read(knowledge, slow, "s", count=10, block_ms=0) == [(ids[3], b"k-3")]
    streams.ack_and_trim(knowledge, slow, [ids[3]])
    assert streams.backlog(knowledge) == 0


def test_trim_consumed_never_drops_what_a_group_has_not_read(streams: JobStreams):
    knowledge = streams.keys.knowledge_stream
    streams.ensure_group(knowledge, student_group("a"))
    streams.ensure_group(knowledge, student_group("b"))
    for i in range(3):
        streams.add(knowledge, b"k-%d" % i)
    got = streams.read(knowledge, student_group("a"), "a", count=3, block_ms=0)
    streams.client.xack(knowledge, student_group("a"), *[entry for entry, _ in got])
    assert streams.trim_consumed(knowledge) == 0
    assert streams.trim_consumed(streams.keys.dead_letter_stream) == 0  # no such stream
