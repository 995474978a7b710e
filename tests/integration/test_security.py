"""Security and outages at the Redis layer, against real redis-servers (no Ray): TLS with a CA
file, ACL users confined to their job's key prefix, a bounded wait for an unreachable Redis,
and the dead-lettering of a message delivered too often."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from transformers import BertConfig, BertForSequenceClassification

from polydistill.actors.teacher import TeacherReplica
from polydistill.cluster.config import validate_config
from polydistill.storage import wire
from polydistill.storage.keys import TEACHER_GROUP, JobKeys
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import JobStreams, RedisUnavailable, connect

import numpy as np

pytestmark = pytest.mark.integration

SECRET = "s3cret-Pa55/with:odd@chars"


def round_trip(streams: JobStreams) -> None:
    stream = streams.keys.work_stream
    streams.ensure_group(stream, TEACHER_GROUP)
    streams.add(stream, b"payload")
    [(entry_id, payload)] = streams.read(stream, TEACHER_GROUP, "c", count=1, block_ms=100)
    assert payload == b"payload"
    assert streams.ack_and_delete(stream, TEACHER_GROUP, [entry_id]) == 1


def test_tls_with_a_ca_file_and_password(tls_files):
    with PrivateRedisServer(password=SECRET, tls_cert_file=tls_files.cert, tls_key_file=tls_files.key,
                            tls_ca_file=tls_files.ca) as server:
        assert server.url.startswith("rediss://")
        plain_url = f"redis://127.0.0.1:{server.port}/0"
        round_trip(JobStreams(connect(f"rediss://127.0.0.1:{server.port}/0", password=SECRET,
                                      tls_ca_file=tls_files.ca), JobKeys("job-tls")))
        # Plain text to the TLS port is refused; so is TLS against a CA that did not sign the server.
        with pytest.raises(RedisUnavailable):
            connect(plain_url, password=SECRET, reconnect_timeout_s=0.5, socket_timeout=1).ping()
        with pytest.raises(RedisUnavailable):
            connect(f"rediss://127.0.0.1:{server.port}/0", password=SECRET, reconnect_timeout_s=0.5,
                    socket_timeout=1).ping()  # the system CAs do not know our test CA


def test_acl_users_confine_each_job_to_its_own_key_prefix(redis_server, redis_client):
    for job in ("job-a", "job-b"):
        pattern = JobKeys(job).pattern
        redis_client.execute_command("ACL", "SETUSER", job, "reset", "on", f">{SECRET}-{job}", f"~{pattern}",
                                     "+@all", "-@dangerous")
    try:
        url = f"redis://127.0.0.1:{redis_server.port}/0"
        job_a = JobStreams(connect(url, username="job-a", password=f"{SECRET}-job-a"), JobKeys("job-a"))
        job_b = JobStreams(connect(url, username="job-b", password=f"{SECRET}-job-b"), JobKeys("job-b"))
        round_trip(job_a)
        round_trip(job_b)
        job_b.add(job_b.keys.knowledge_stream, b"b's knowledge")
        # Job A can neither read, write, nor clean up job B's keys.
        with pytest.raises(redis.exceptions.NoPermissionError):
            job_a.client.xrange(job_b.keys.knowledge_stream)
        with pytest.raises(redis.exceptions.NoPermissionError):
            job_a.add(job_b.keys.work_stream, b"forged")
        with pytest.raises(redis.exceptions.NoPermissionError):
            job_a.client.xreadgroup(TEACHER_GROUP, "spy", {job_b.keys.work_stream: ">"})
        job_a.delete_job_keys()
        assert redis_client.xlen(job_b.keys.knowledge_stream) == 1
        assert not list(redis_client.scan_iter(match=job_a.keys.pattern))
        # A wrong password fails at once, not after the reconnect budget.
        started = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            connect(url, username="job-a", password="wrong", reconnect_timeout_s=30).ping()
        assert time.monotonic() - started < 5
    finally:
        redis_client.execute_command("ACL", "DELUSER", "job-a", "job-b")


def test_an_unreachable_redis_fails_after_the_bounded_wait_naming_the_redacted_url():
    server = PrivateRedisServer(password=SECRET).start()
    url = server.url
    client = connect(url, reconnect_timeout_s=2.0, socket_timeout=2)
    streams = JobStreams(client, JobKeys("job-down"))
    streams.ensure_group(streams.keys.work_stream, TEACHER_GROUP)
    server.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as caught:
        streams.read(streams.keys.work_stream, TEACHER_GROUP, "c", count=1, block_ms=100)
    waited = time.monotonic() - started
    message = str(caught.value)
    assert 2.0 <= waited < 8.0, waited
    assert "redis://:***@127.0.0.1:" in message and "was unreachable for" in message
    assert "transport.reconnect_timeout_s=2" in message
    assert SECRET not in message and "s3cret" not in repr(caught.value)


def test_an_outage_shorter_than_the_budget_is_ridden_out():
    with PrivateRedisServer() as server:
        streams = JobStreams(connect(server.url, reconnect_timeout_s=20), JobKeys("job-blip"))
        streams.ensure_group(streams.keys.work_stream, TEACHER_GROUP)
        streams.add(streams.keys.work_stream, b"kept")
        server.restart(keep_data=True, down_s=1.5)
        [(_, payload)] = streams.read(streams.keys.work_stream, TEACHER_GROUP, "c", count=1, block_ms=100)
        assert payload == b"kept"


def tiny_teacher(path: Path) -> str:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def test_a_work_batch_delivered_too_often_is_dead_lettered_with_the_reason(redis_server, redis_client, tmp_path):
    config = validate_config({
        "job_id": "job-poison",
        "teacher": {"model": "random"},
        "data": {"path": str(tmp_path)},
        "transport": {"max_deliveries": 2, "reclaim_idle_ms": 100},
    })
    replica = TeacherReplica("teacher-0", config, tiny_teacher(tmp_path / "teacher"), redis_server.url)
    keys, streams = replica.keys, replica.streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    work = wire.WorkBatch(job_id="job-poison", epoch=0, batch_id=0, sample_ids=np.arange(2),
                          languages=("eng_Latn", "eng_Latn"), input_ids=np.ones((2, 4), dtype=np.int32),
                          attention_mask=np.ones((2, 4), dtype=np.int32), labels=None)
    streams.add(keys.work_stream, wire.encode(work))
    # Delivered to a replica that "dies" on it, then reclaimed by a second that dies too.
    assert streams.read(keys.work_stream, TEACHER_GROUP, "dead-1", count=1, block_ms=100)
    time.sleep(0.15)
    assert streams.reclaim(keys.work_stream, TEACHER_GROUP, "dead-2", min_idle_ms=100, count=4)
    time.sleep(0.15)
    # The third delivery exceeds transport.max_deliveries=2: dead-lettered, not computed.
    claimed = streams.reclaim(keys.work_stream, TEACHER_GROUP, "teacher-0", min_idle_ms=100, count=4)
    assert replica._screen(claimed) == []
    [(_, fields)] = redis_client.xrange(keys.dead_letter_stream)
    assert b"delivered 3 times" in fields[b"reason"] and b"transport.max_deliveries=2" in fields[b"reason"]
    assert wire.decode(fields[b"m"]).batch_id == 0  # the batch itself is kept for inspection
    assert redis_client.xlen(keys.work_stream) == 0 and redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 0
