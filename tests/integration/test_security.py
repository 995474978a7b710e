"""Security and outages at the Redis layer, against real redis-servers: TLS with a CA file, ACL
users confined to their job's key prefix, a bounded wait for an unreachable Redis, the
dead-lettering of a message delivered too often, a job's Redis password kept out of everything a
user or operator can see, and a run that fails in seconds, with one line naming the setting, on a
Redis it cannot use."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
import redis
from transformers import BertConfig, BertForSequenceClassification

from polydistill.actors.teacher import TeacherReplica
from polydistill.cluster.cli import main
from polydistill.cluster.config import ConfigError, validate_config
from polydistill.cluster.jobs import submission_request
from polydistill.storage import wire
from polydistill.storage.keys import TEACHER_GROUP, JobKeys
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import (
    DEAD_LETTER_HEAD_FIELD,
    DEAD_LETTER_SIZE_FIELD,
    JobStreams,
    RedisUnavailable,
    connect,
)

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
    payload = wire.encode(work)
    streams.add(keys.work_stream, payload)
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
    # Its size and first bytes are kept for inspection, never the whole payload.
    assert int(fields[DEAD_LETTER_SIZE_FIELD]) == len(payload)
    assert fields[DEAD_LETTER_HEAD_FIELD] == payload[:config.transport.dead_letter_payload_bytes]
    assert redis_client.xlen(keys.work_stream) == 0 and redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
JOB_PASSWORD = "job-Pa55/word:9f3c"  # with characters a URL must escape


def small_job(url: str) -> list[str]:
    return [f"transport.redis_url={url}", "data.languages=[eng_Latn, swh_Latn]", "data.limit_per_language=40",
            "data.eval_split=null", "training.epochs=1", "training.batch_size=8", "teacher.replicas=1",
            "evaluation.latency=false"]


def as_sets(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


@pytest.mark.slow
def test_a_jobs_redis_password_shows_nowhere(tmp_path, local_ray, capfd, caplog, monkeypatch):
    """The password of a job's Redis (requirepass), given inside the URL of a local run: not in the
    validate output, the submission, the job's output, report.json, report.md, job.yaml, Ray's logs, or
    the arguments of any actor or task the driver starts."""
    from urllib.parse import quote

    created: list[bytes] = []  # every actor's and task's arguments, as Ray ships them
    for kind in (ray.actor.ActorClass, ray.remote_function.RemoteFunction):
        real = kind._remote

        def record(self, args=None, kwargs=None, _real=real, **options):
            created.append(ray.cloudpickle.dumps((args, kwargs)))
            return _real(self, args=args, kwargs=kwargs, **options)

        monkeypatch.setattr(kind, "_remote", record)
    with PrivateRedisServer(password=JOB_PASSWORD) as server:
        url = f"redis://:{quote(JOB_PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
        overrides = small_job(url)
        assert main(["validate", str(EXAMPLES / "tiny.yaml"), *as_sets(overrides)]) == 0
        assert main(["validate", str(EXAMPLES / "tiny.yaml"), "--set", f"transport.password={JOB_PASSWORD}"]) == 0
        out = tmp_path / "out"
        assert main(["run", str(EXAMPLES / "tiny.yaml"), "--output", str(out), "--no-progress",
                     *as_sets(overrides)]) == 0
        assert [key for key in redis.Redis.from_url(url).scan_iter()] == []  # the job removed its keys
    captured = capfd.readouterr()
    assert "redis://:***@127.0.0.1" in captured.out and "password: '***'" in captured.out  # validate redacts
    for name in ("report.json", "report.md", "job.yaml"):
        assert JOB_PASSWORD not in (out / name).read_text(), name
    assert json.loads((out / "report.json").read_text())["samples_distilled"] == 80
    assert JOB_PASSWORD not in captured.out + captured.err + caplog.text
    assert len(created) >= 3  # the feeder, the teacher pool and the student at least
    leaked = [JOB_PASSWORD.encode(), quote(JOB_PASSWORD, safe="").encode()]
    assert not [args for args in created if any(secret in args for secret in leaked)]
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert [p.name for p in session_logs.rglob("*") if p.is_file() and JOB_PASSWORD.encode() in p.read_bytes()] == []
    # What `polydistill submit` would show of the same job: refused, with the way to give the password.
    with pytest.raises(ConfigError, match="transport.password_env") as refused:
        submission_request(EXAMPLES / "tiny.yaml", overrides)
    assert JOB_PASSWORD not in str(refused.value)


def run_fails_fast(tmp_path, capsys, *overrides: str) -> tuple[str, float]:
    """``polydistill run``: exit status 2 and a one-line error, before anything is built or written."""
    out = tmp_path / "out"
    started = time.monotonic()
    status = main(["run", str(EXAMPLES / "tiny.yaml"), "--output", str(out), "--no-progress",
                   *as_sets(list(overrides))])
    took = time.monotonic() - started
    [line] = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and not out.exists(), line
    return line, took


def test_an_unreachable_redis_fails_in_seconds_naming_the_url_setting(tmp_path, capsys):
    line, took = run_fails_fast(tmp_path, capsys, "transport.redis_url=redis://127.0.0.1:1/0")
    assert line.startswith("error: Redis at redis://127.0.0.1:1/0 did not answer within 5 s")
    assert "check transport.redis_url" in line and took < 15, (line, took)


def test_credentials_redis_refuses_fail_at_once_naming_the_password_setting(tmp_path, capsys, monkeypatch):
    with PrivateRedisServer(password=JOB_PASSWORD) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        monkeypatch.setenv("PD_TEST_REDIS_PASSWORD", "wrong")
        line, took = run_fails_fast(tmp_path, capsys, f"transport.redis_url={url}",
                                    "transport.password_env=PD_TEST_REDIS_PASSWORD")
        assert "refused the job's credentials" in line and "transport.password_env: $PD_TEST_REDIS_PASSWORD" in line
        assert took < 5, took
        line, _ = run_fails_fast(tmp_path, capsys, f"transport.redis_url={url}")
        assert "Authentication required" in line and "set transport.password_env, transport.password_file" in line
        monkeypatch.delenv("PD_TEST_REDIS_PASSWORD")
        line, _ = run_fails_fast(tmp_path, capsys, f"transport.redis_url={url}",
                                 "transport.password_env=PD_TEST_REDIS_PASSWORD")
        assert "transport.password_env names PD_TEST_REDIS_PASSWORD, but that environment variable is not set" in line
    assert JOB_PASSWORD not in line


def test_a_redis_url_from_the_environment_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYDISTILL_REDIS_URL", "unix:///tmp/redis.sock")
    line, _ = run_fails_fast(tmp_path, capsys)
    assert line.startswith("error: $POLYDISTILL_REDIS_URL:") and "redis:// or rediss://" in line


@pytest.mark.slow
def test_a_job_runs_as_a_redis_user_confined_to_its_key_prefix(tmp_path, local_ray):
    """The ACL recipe of docs/security.md: the job's user can touch nothing but ``polydistill:<job_id>:*``, and
    its password reaches every process from transport.password_file."""
    with PrivateRedisServer(password=SECRET) as server:
        admin = connect(server.url)
        admin.execute_command("ACL", "SETUSER", "job-a", "on", f">{JOB_PASSWORD}", "resetkeys",
                              f"~{JobKeys('job-a').pattern}", "resetchannels", "+@all", "-@dangerous")
        admin.set("someone-else:key", "kept")
        password_file = tmp_path / "redis-password"
        password_file.write_text(JOB_PASSWORD + "\n")
        overrides = [*small_job(f"redis://127.0.0.1:{server.port}/0"), "job_id=job-a", "transport.username=job-a",
                     f"transport.password_file={password_file}"]
        assert main(["run", str(EXAMPLES / "tiny.yaml"), "--output", str(tmp_path / "out"), "--no-progress",
                     *as_sets(overrides)]) == 0
        assert [key for key in admin.scan_iter()] == [b"someone-else:key"]
