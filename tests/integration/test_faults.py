"""Faults injected at a random point of a real job (private redis-server, local Ray), each followed
by the exact accounting: every sample distilled once, no batch applied twice.

"No batch applied twice" is checked independently of the ledger's own counts: the student takes
one optimiser step per applied batch, and its step counter is saved and restored with its
weights, so ``student_steps == batches_expected`` together with a complete ledger means each
batch reached the final weights exactly once.

The injection point is drawn from POLYDISTILL_FAULT_SEED (printed; random when unset).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.storage.keys import TEACHER_GROUP, JobKeys
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import connect

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BATCHES = 2 * (200 // 8)  # 2 epochs of 2 languages x 100 sentences in batches of 8
SEED = int(os.environ.get("POLYDISTILL_FAULT_SEED", time.time_ns() % 1_000_000))
PASSWORD = "fault-test-Pa55word"


def fault_config(tmp_path: Path, redis_url: str, *overrides: str):
    return load_config(
        EXAMPLES / "tiny.yaml",
        [
            f"transport.redis_url={redis_url}",
            "data.languages=[eng_Latn, swh_Latn]",
            "data.limit_per_language=100",
            "data.eval_split=null",
            "training.epochs=2",
            "training.batch_size=8",
            "training.log_every=1",  # progress after every step: the injector watches it
            "training.checkpoint_every=4",
            "teacher.replicas=1",
            "transport.reconnect_timeout_s=30",
            *overrides,
        ],
        output_dir=str(tmp_path / "out"),
    )


class Injector(threading.Thread):
    """Runs ``fault`` once the student has applied a random share (25-65 %) of the batches."""

    def __init__(self, name: str, config, redis_url: str, fault: Callable[[], None], *,
                 when: Callable[[], bool] = lambda: True, password: str | None = None, tls_ca_file=None):
        super().__init__(daemon=True)
        self.rng = random.Random(f"{SEED}-{name}")
        self.target = self.rng.randint(int(0.25 * BATCHES), int(0.65 * BATCHES))
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.client = connect(redis_url, password=password, tls_ca_file=tls_ca_file, reconnect_timeout_s=30)
        self.fault, self.when = fault, when
        self.injected_at: float | None = None
        self.batches_at_injection: int | None = None
        self.error: BaseException | None = None
        print(f"\n[{name}] seed {SEED}: fault after {self.target} of {BATCHES} batches")

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                batches = int(self.client.hget(self.keys.progress, "batches") or 0)
                if batches >= self.target and self.when():
                    self.batches_at_injection = batches
                    self.injected_at = time.time()
                    self.fault()
                    return
                time.sleep(0.02)
        except BaseException as exc:  # surfaced by check()
            self.error = exc

    def check(self) -> None:
        self.join(timeout=30)
        assert self.error is None, f"the fault injector failed: {self.error!r}"
        assert self.injected_at is not None, "the job ended before the fault was injected"


def kill_one(class_name: str, rng: random.Random, name_part: str = "") -> int:
    """SIGKILLs the worker process of one live actor of ``class_name`` (a pre-empted node, an OOM kill)
    whose actor name contains ``name_part``."""
    from ray._private import state

    alive = [info for info in state.actors().values()
             if info["ActorClassName"] == class_name and info["State"] == "ALIVE"
             and name_part in (info.get("Name") or "")]
    assert alive, f"no live {class_name} to kill"
    victim = rng.choice(sorted(alive, key=lambda info: info["Pid"]))
    os.kill(victim["Pid"], signal.SIGKILL)
    return victim["Pid"]


def assert_exact(report: dict) -> None:
    assert report["batches_expected"] == BATCHES
    assert report["samples_distilled"] == report["samples_expected"] == 400
    assert report["samples_per_epoch"] == {"0": 200, "1": 200}
    assert report["batches_missing"] == 0
    assert report["student_steps"] == report["batches_expected"], "a batch was applied twice (or skipped)"
    assert report["dead_letters"] == 0
    assert report["final_loss"] == report["final_loss"]  # not NaN


def summary(name: str, injector: Injector, report: dict, started: float) -> None:
    recoveries = report["recoveries"]
    detail = "; ".join(
        f"{r['cause']}: detected {r['detected_at'] - injector.injected_at:.1f} s after the fault, "
        f"recovered in {r['seconds']:.1f} s, {r['batches_refed']} batches re-fed" for r in recoveries
    ) or "no driver recovery needed"
    line = (f"[{name}] fault at batch {injector.batches_at_injection}; {detail}; "
            f"{report['duplicates_dropped']} duplicates dropped; job {time.perf_counter() - started:.1f} s")
    print(line)
    if os.environ.get("POLYDISTILL_FAULT_LOG"):  # figures for a closing note, outside pytest's capture
        with open(os.environ["POLYDISTILL_FAULT_LOG"], "a", encoding="utf-8") as log:
            log.write(line + "\n")


def test_teacher_replica_killed_mid_batch(tmp_path, redis_server, local_ray):
    # A teacher slower than the student keeps both replicas busy, each holding a batch it has read
    # but not yet published; one of them is killed while it holds one.
    config = fault_config(
        tmp_path, redis_server.url, "teacher.replicas=2", "transport.reclaim_idle_ms=1000",
        "teacher.config.hidden_size=384", "teacher.config.num_hidden_layers=6", "teacher.config.intermediate_size=1536",
        "teacher.config.num_attention_heads=6", "student.config.num_attention_heads=2",
    )
    client = connect(redis_server.url)
    work = JobKeys(config.resolved_job_id).work_stream

    def both_replicas_hold_work() -> bool:
        try:
            consumers = client.xpending(work, TEACHER_GROUP)["consumers"] or []
        except Exception:
            return False
        return sum(1 for consumer in consumers if int(consumer["pending"]) > 0) >= 2

    injector = Injector("teacher", config, redis_server.url,
                        lambda: kill_one("TeacherActor", injector.rng), when=both_replicas_hold_work)
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    # The dead replica's batch was taken over through XAUTOCLAIM by a live one (and the pool
    # started a replacement: three replicas served in all).
    assert sum(t.get("reclaimed", 0) for t in report["teachers"]) >= 1, report["teachers"]
    assert len(report["teachers"]) == 3
    assert report["recoveries"] == []
    summary("teacher", injector, report, started)


@pytest.mark.heavy
def test_second_teacher_replica_killed_mid_batch(tmp_path, redis_server, local_ray):
    """Two teachers in line: a replica of the second one dies holding a batch it took from the stream
    between the teachers; another replica of that teacher takes it over, and nothing is lost."""
    config = fault_config(
        tmp_path, redis_server.url, "transport.reclaim_idle_ms=1000",
        "extra_teachers=[{name: second, model: random, replicas: 2, num_cpus: 0.5, languages: [swh_Latn],"
        " config: {model_type: bert, hidden_size: 384, num_hidden_layers: 6, intermediate_size: 1536,"
        " num_attention_heads: 6, max_position_embeddings: 128}}]",
    )
    client = connect(redis_server.url)
    between = JobKeys(config.resolved_job_id).stage_streams(1, 2)[0]

    def second_teacher_holds_work() -> bool:
        try:
            consumers = client.xpending(between, TEACHER_GROUP)["consumers"] or []
        except Exception:
            return False
        return any(int(consumer["pending"]) > 0 for consumer in consumers)

    injector = Injector("second-teacher", config, redis_server.url,
                        lambda: kill_one("TeacherActor", injector.rng, name_part=":second-"),
                        when=second_teacher_holds_work)
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    assert report["teacher_samples_per_language"] == {"teacher": {"eng_Latn": 200, "swh_Latn": 200},
                                                      "second": {"swh_Latn": 200}}
    second = [t for t in report["teachers"] if t["teacher"] == "second"]
    assert len(second) == 3, second  # two, one killed, one started in its place
    assert report["recoveries"] == []
    summary("second teacher", injector, report, started)


def test_student_worker_killed_resumes_from_its_checkpoint(tmp_path, redis_server, local_ray):
    config = fault_config(tmp_path, redis_server.url)
    injector = Injector("student", config, redis_server.url, lambda: kill_one("StudentActor", injector.rng))
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    [recovery] = report["recoveries"]
    assert recovery["student_restarted"] and "student worker 'student' died" in recovery["cause"]
    resumed = report["resumed_from_step"]
    assert resumed is not None and resumed % 4 == 0 and resumed <= injector.batches_at_injection
    # Every batch not in the checkpoint, including those applied and acknowledged after it, was re-fed.
    assert recovery["batches_refed"] == BATCHES - resumed
    checkpoint = Path(config.output_dir) / "checkpoints" / "student"
    assert json.loads((checkpoint / "state.json").read_text())["training"]["step"] == BATCHES
    summary("student", injector, report, started)


def control_actor_recovery(report: dict, actor: str) -> dict:
    """The one recovery of a job whose ``actor`` (a control actor) was killed, with what the report says."""
    [recovery] = report["recoveries"]
    assert recovery["actor_restarted"] == actor and not recovery["student_restarted"], recovery
    assert f"the {actor} died" in recovery["cause"]
    return recovery


def test_feeder_killed_mid_feed_is_restarted_and_what_the_students_miss_is_fed_again(
        tmp_path, redis_server, local_ray):
    # A short work stream keeps the feed call running until the last epoch: the kill lands mid-feed.
    config = fault_config(tmp_path, redis_server.url, "transport.max_work_backlog=2")
    injector = Injector("feeder", config, redis_server.url, lambda: kill_one("FeederActor", injector.rng))
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    recovery = control_actor_recovery(report, "feeder")
    assert 0 < recovery["batches_refed"] <= BATCHES - injector.batches_at_injection
    # The dead call's count died with it; every feed call that returned is counted.
    assert report["feeds_lost"] == 1
    summary("feeder", injector, report, started)


@pytest.mark.heavy  # failed 1 of 4 runs: a kill that lands as the job ends is not yet told apart
def test_teacher_pool_killed_mid_epoch_is_restarted_with_new_replicas(tmp_path, redis_server, local_ray):
    # The dead pool's replica dies with it holding a batch; a new replica reclaims it after reclaim_idle_ms.
    config = fault_config(tmp_path, redis_server.url, "transport.reclaim_idle_ms=1000")
    injector = Injector("pool", config, redis_server.url, lambda: kill_one("TeacherPoolActor", injector.rng))
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    control_actor_recovery(report, "teacher pool 'teacher'")
    pool = report["teacher_pool"]
    assert pool["restarted"] and pool["replicas_lost_with_pool"] == ["teacher-0"], pool
    lost = [t for t in report["teachers"] if t.get("lost_with_pool")]
    assert [t["replica_id"] for t in lost] == ["teacher-0"], report["teachers"]
    assert any(t["replica_id"] == "teacher-1" for t in report["teachers"]), report["teachers"]
    summary("pool", injector, report, started)


@pytest.mark.heavy
def test_cache_writer_killed_mid_epoch_is_restarted_and_the_job_completes(tmp_path, redis_server, local_ray):
    config = fault_config(tmp_path, redis_server.url, "knowledge_cache.enabled=true",
                          f"knowledge_cache.dir={tmp_path / 'cache'}")
    injector = Injector("cache writer", config, redis_server.url,
                        lambda: kill_one("CacheWriterActor", injector.rng))
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    control_actor_recovery(report, "cache writer")
    writer = report["knowledge_cache"]["writer"]
    # The restarted writer starts an empty cache: it is sealed only if a later epoch brought every sample.
    assert writer["sealed"] == (writer["samples_written"] == 200), writer
    summary("cache writer", injector, report, started)


def test_poison_work_batches_injected_mid_run_are_dead_lettered_and_the_job_completes_with_them(
        tmp_path, redis_server, local_ray):
    """Mid-run, a planned batch no teacher has read yet is swapped for a copy whose token ids are past the
    teacher's vocabulary, and two more poison batches are added: a 331-byte one of shape [2**32, 2**32]
    and a copy of another batch with rows longer than the teacher's positions. Each is dead-lettered with
    its reason, the job goes on, and it ends completed with dead letters: the swapped batch's samples
    counted as dead-lettered, every other sample distilled once."""
    import dataclasses

    import msgpack
    import numpy as np

    from polydistill.storage import wire

    # Few knowledge messages in flight, so that work batches wait unread in the work stream.
    config = fault_config(tmp_path, redis_server.url, "transport.max_knowledge_backlog=2")
    client = connect(redis_server.url)
    work_stream = JobKeys(config.resolved_job_id).work_stream

    def an_unread_batch() -> tuple[str, bytes] | None:
        try:
            [group] = client.xinfo_groups(work_stream)
            newest = client.xrevrange(work_stream, count=1)
        except Exception:
            return None
        if not newest or newest[0][0].decode() <= group["last-delivered-id"].decode():
            return None
        return newest[0][0], newest[0][1][b"m"]

    def poison() -> None:
        entry_id, payload = an_unread_batch()
        batch = wire.decode(payload)
        past_vocabulary = dataclasses.replace(batch, input_ids=np.full_like(batch.input_ids, 1_000_000))
        too_long = dataclasses.replace(batch, batch_id=0, input_ids=np.ones((batch.n_samples, 200), np.int32),
                                       attention_mask=np.ones((batch.n_samples, 200), np.uint8))
        body = msgpack.unpackb(wire.encode(batch), raw=False)
        for name in ("input_ids", "attention_mask"):
            body[name] = {"dtype": "int32", "shape": [2**32, 2**32], "raw": b""}
        overflowing = msgpack.packb(body, use_bin_type=True)
        transaction = client.pipeline(transaction=True)
        transaction.xdel(work_stream, entry_id)
        for bad in (wire.encode(past_vocabulary), overflowing, wire.encode(too_long)):
            transaction.xadd(work_stream, {b"m": bad})
        deleted, *_ = transaction.execute()
        assert deleted == 1, "a teacher read the batch meanwhile"

    injector = Injector("poison", config, redis_server.url, poison, when=lambda: an_unread_batch() is not None)
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert report["status"] == "completed_with_dead_letters"
    assert report["dead_letters"] == 3
    [(reason, samples)] = report["samples_dead_lettered"].items()
    assert reason.startswith("MessageRejected: WorkBatch.input_ids: token ids span [1000000, 1000000], outside "
                             "the teacher's vocabulary of ")
    assert samples == 8
    # Exact accounting: distilled + dead-lettered = expected, and no batch applied twice.
    assert report["samples_distilled"] + samples == report["samples_expected"] == 400
    assert report["batches_missing"] == 1 and report["batches_applied"] == BATCHES - 1
    assert report["student_steps"] == report["batches_applied"], "a batch was applied twice"
    assert report["recoveries"] == []
    written = json.loads((Path(config.output_dir) / "report.json").read_text())
    assert written["status"] == "completed_with_dead_letters" and written["samples_dead_lettered"] == {reason: 8}
    assert client.keys(f"*{config.resolved_job_id}*") == [], "the job left keys behind"
    summary("poison", injector, report, started)


def test_knowledge_outside_the_plan_injected_mid_run_is_dead_lettered_by_the_student(
        tmp_path, redis_server, local_ray):
    """A copy of a knowledge message moved to an epoch the plan does not have, and one whose token ids are
    past the student's vocabulary, are refused before training; every planned sample is distilled once."""
    import dataclasses

    import numpy as np

    from polydistill.storage import wire

    # Few knowledge messages ahead of the injected ones, so that the student reads them before it completes.
    config = fault_config(tmp_path, redis_server.url, "transport.max_knowledge_backlog=2")
    client = connect(redis_server.url)
    knowledge_stream = JobKeys(config.resolved_job_id).knowledge_stream

    def a_knowledge_message() -> bytes | None:
        newest = client.xrevrange(knowledge_stream, count=1)
        return newest[0][1][b"m"] if newest else None

    def poison() -> None:
        knowledge = wire.decode(a_knowledge_message())
        work = knowledge.work
        outside = dataclasses.replace(knowledge, work=dataclasses.replace(work, epoch=7))
        past_vocabulary = dataclasses.replace(
            knowledge, work=dataclasses.replace(work, input_ids=np.full_like(work.input_ids, 1_000_000)))
        for bad in (outside, past_vocabulary):
            client.xadd(knowledge_stream, {b"m": wire.encode(bad)})

    injector = Injector("poison knowledge", config, redis_server.url, poison,
                        when=lambda: a_knowledge_message() is not None)
    injector.start()
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    injector.check()
    assert report["status"] == "completed_with_dead_letters" and report["dead_letters"] == 2
    assert report["samples_dead_lettered"] == {}  # the planned batches were learnt from their own copies
    assert report["samples_distilled"] == report["samples_expected"] == 400
    assert report["student_steps"] == report["batches_expected"] == BATCHES, "a batch was applied twice"
    assert report["recoveries"] == []
    summary("poison knowledge", injector, report, started)


@pytest.mark.heavy
def test_redis_restarted_with_its_data_gone_over_tls_with_a_password(tmp_path, local_ray, tls_files, caplog, capfd):
    """Also the security checks of a whole job: TLS with a CA file, AUTH through transport.password,
    and the password in none of report.json, report.md, job.yaml, the driver's logs or Ray's logs."""
    caplog.set_level(logging.DEBUG)
    with PrivateRedisServer(password=PASSWORD, tls_cert_file=tls_files.cert, tls_key_file=tls_files.key,
                            tls_ca_file=tls_files.ca) as server:
        url = f"rediss://127.0.0.1:{server.port}/0"
        config = fault_config(tmp_path, url, f"transport.password={PASSWORD}", f"transport.tls_ca_file={tls_files.ca}")
        injector = Injector("redis-empty", config, url, lambda: server.restart(keep_data=False),
                            password=PASSWORD, tls_ca_file=tls_files.ca)
        injector.start()
        started = time.perf_counter()
        report = run_job(config, show_progress=False)
        injector.check()
    assert_exact(report)
    [recovery] = report["recoveries"]
    assert "Redis lost the job's data" in recovery["cause"] and not recovery["student_restarted"]
    assert 0 < recovery["batches_refed"] <= BATCHES - injector.batches_at_injection
    summary("redis-empty", injector, report, started)

    out = Path(config.output_dir)
    for name in ("report.json", "report.md", "job.yaml"):
        assert PASSWORD not in (out / name).read_text(), name
    assert "password: null" in (out / "job.yaml").read_text()
    captured = capfd.readouterr()
    assert PASSWORD not in caplog.text + captured.out + captured.err
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in session_logs.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.heavy
def test_redis_unreachable_for_a_while_and_a_write_lost_with_it_are_ridden_out(tmp_path, local_ray):
    """Redis stops for 3 s and comes back from its snapshot; a write made after the snapshot (here:
    the newest queued batch, which nobody has read yet) is lost with it. Every producer and consumer
    rides the outage out by retrying; the driver notices the lost batch once nothing else is in
    flight and re-feeds it."""
    with PrivateRedisServer() as server:
        config = fault_config(tmp_path, server.url, "transport.max_knowledge_backlog=2")
        work = JobKeys(config.resolved_job_id).work_stream
        client = connect(server.url)

        def outage_then_lost_write() -> None:
            server.restart(keep_data=True, down_s=3.0)
            pending = {info["message_id"] for info in client.xpending_range(work, TEACHER_GROUP, "-", "+", 1000)}
            unread = [entry_id for entry_id, _ in client.xrange(work) if entry_id not in pending]
            assert unread, "no queued batch left to lose"
            client.xdel(work, unread[-1])

        injector = Injector("redis-down", config, server.url, outage_then_lost_write)
        injector.start()
        started = time.perf_counter()
        report = run_job(config, show_progress=False)
        injector.check()
    assert_exact(report)
    [recovery] = report["recoveries"]
    # At least the batch dropped here; writes that raced the snapshot (SAVE, then the stop) are lost too.
    assert "lost in flight" in recovery["cause"] and recovery["batches_refed"] >= 1
    summary("redis-down", injector, report, started)


def test_a_stop_from_outside_ends_the_job_stopped_and_resume_completes_it(tmp_path, redis_server, local_ray):
    from polydistill.cluster.cli import main
    from polydistill.cluster.stopping import JobStopped
    from polydistill.cluster.stopping import STOPPED_BY_STOP_COMMAND, request_stop
    from polydistill.student.checkpoint import find_checkpoint

    # Twice the usual epochs, with the stop still placed within the first 33 batches: the student
    # polls the stop flag every 0.5 s, and a short job could finish before it looks.
    config = fault_config(tmp_path, redis_server.url, "training.epochs=4")
    control = connect(redis_server.url)
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    # What `polydistill stop` writes (cluster/jobs.py) before Ray sends the driver SIGTERM.
    injector = Injector("stop+resume", config, redis_server.url,
                        lambda: request_stop(control, keys, STOPPED_BY_STOP_COMMAND))
    injector.start()
    started = time.perf_counter()
    with pytest.raises(JobStopped) as raised:
        run_job(config, show_progress=False)
    stop_seconds = time.time() - injector.injected_at
    injector.check()
    out = Path(config.output_dir).resolve()
    stopped = json.loads((out / "report.json").read_text())
    assert stopped["status"] == "stopped" and stopped["stopped_by"] == STOPPED_BY_STOP_COMMAND
    assert 0 < stopped["samples_distilled"] < stopped["samples_expected"] == 2 * 400
    assert 0 < stopped["student_steps"] < 2 * BATCHES
    assert stopped["recoveries"] == [], "a stopping job was taken for one that lost batches"
    # The line the CLI prints: what was distilled, where the checkpoint is, how to continue.
    assert not raised.value.interrupted and raised.value.checkpoint == out / "checkpoints" / "student"
    assert find_checkpoint(raised.value.checkpoint) is not None
    assert raised.value.samples_kept == stopped["samples_distilled"]
    assert str(raised.value) == (f"stopped by polydistill stop: {stopped['samples_distilled']} of 800 samples "
                                 f"distilled, checkpoint in {out / 'checkpoints' / 'student'}; "
                                 f"continue with: polydistill resume {out}")
    assert control.keys(keys.pattern) == [], "the stopped job left keys behind"

    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["resume", str(out), "--no-progress"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and "stopped_by" not in report
    assert report["samples_distilled"] == report["samples_expected"] == 2 * 400
    assert report["batches_missing"] == 0 and report["dead_letters"] == 0
    assert report["student_steps"] == report["batches_expected"] == 2 * BATCHES, "a batch was applied twice"
    # The stopped run checkpointed on its way out, so nothing it applied is learnt twice or lost.
    assert report["resumed_from_step"] == stopped["student_steps"]
    print(f"[stop] the stopped job ended {stop_seconds:.1f} s after the stop request")
    summary("stop+resume", injector, report, started)
