"""Placement and pool scaling on a multi-node Ray cluster simulated in this process (ray.cluster_utils).

    head (no CPUs: drivers, the feeder and the pool actor only)
    teacher node A {teacher_slot: 2}   teacher node B {teacher_slot: 2}   student node {student_slot: 1}

The jobs ask for ``teacher.resources: {teacher_slot: 1}`` and ``student.resources: {student_slot: 1}``;
where each actor ran is read from Ray's state API (the actors' node ids), so production code is
observed as it is. The nodes are separate raylets on this machine, which is all a multi-node
cluster is to the scheduler.

The cluster uses its own temp dir (RAY_TMPDIR: its sockets, logs and the ``ray_current_cluster``
file that ``ray.init(address="auto")`` reads, so no other Ray on the machine can attach to it) and
token authentication with a token made for this module (RAY_AUTH_TOKEN: ~/.ray is not touched).
It is shut down in the fixture's teardown, and any process that still carries its temp dir in its
environment afterwards is killed by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

# tests/ is on sys.path (pytest puts its conftest's folder there): the helpers of the one-node pool test
from integration.test_pool import consumers, wait_for

from polydistill.actors.feeder import Feeder
from polydistill.actors.pool import TeacherPool, replica_bundle
from polydistill.cluster import jobs
from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.cluster.prepare import prepare_student, prepare_teacher
from polydistill.storage.job_data import load_job_split
from polydistill.storage.keys import (
    CONTROL_DESIRED_TEACHERS,
    CONTROL_STOP,
    METRIC_TEACHERS_RUNNING,
    TEACHER_GROUP,
    JobKeys,
)
from polydistill.student.trainer import StudentTrainer

# The stage placement test runs in the README's tier (the issue of heavy stages on the head node must not
# come back unnoticed); the pool drills are heavy.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEACHER_SLOTS = 2  # per teacher node: 2 nodes hold the pool's maximum of 4 replicas
MAX_REPLICAS = TEACHER_SLOTS * 2


@dataclass
class SimCluster:
    cluster: object  # ray.cluster_utils.Cluster
    teacher_nodes: frozenset[str]  # node ids (hex)
    student_node: str
    temp_dir: str
    dashboard: str  # the head's dashboard (Ray's state API), named so no other Ray on the machine answers


def _leftover_pids(temp_dir: str) -> list[int]:
    """Processes (other than this one) started with this cluster's RAY_TMPDIR in their environment."""
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def sim_cluster() -> Iterator[SimCluster]:
    from ray._raylet import AuthenticationTokenLoader, Config
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a module before this one left its Ray connected
        ray.shutdown()
    # Short: Ray puts unix sockets under it, and their paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="pdmn", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp_dir)
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "POLYDISTILL_REDIS_URL"):
            env.delenv(name, raising=False)
        # This process read the auth mode and token when Ray was imported (or first used): read them again,
        # as ray.init does when it turns token auth on.
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        cluster = None
        try:
            # The head's dashboard serves the state API the tests read placements from.
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": True, "dashboard_port": 0})
            teachers = [cluster.add_node(num_cpus=2, resources={"teacher_slot": TEACHER_SLOTS}, wait=False)
                        for _ in range(2)]
            student = cluster.add_node(num_cpus=1, resources={"student_slot": 1}, wait=False)
            cluster.wait_for_nodes(timeout=60)
            ray.init(address=cluster.address, log_to_driver=False)
            yield SimCluster(cluster, frozenset(n.node_id for n in teachers),
                             student.node_id, temp_dir, f"http://{cluster.webui_url}")
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            deadline = time.monotonic() + 10
            while (pids := _leftover_pids(temp_dir)) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in pids:  # workers that outlived their raylet
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(temp_dir, ignore_errors=True)
    Config.initialize("")  # back to the environment as it was
    AuthenticationTokenLoader.instance().reset_cache()


def job_config(tmp_path: Path, redis_url: str, job_id: str, *overrides: str):
    return load_config(
        EXAMPLES / "tiny.yaml",
        [
            f"transport.redis_url={redis_url}",
            f"job_id={job_id}",
            "data.languages=[eng_Latn, swh_Latn]",
            "data.eval_split=null",
            "training.epochs=1",
            "teacher.resources={teacher_slot: 1}",
            "student.resources={student_slot: 1}",
            *overrides,
        ],
        output_dir=str(tmp_path / "out"),
    )


def placements(sim: SimCluster, class_name: str, state: str | None = None) -> dict[str, str]:
    """actor id -> node id of every actor of this class the cluster has run (alive or not); the node is
    None for an actor killed before its constructor returned (a replica still loading at the end)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)]
    if state:
        filters.append(("state", "=", state))
    actors = list_actors(address=sim.dashboard, filters=filters, limit=1000, detail=True)
    return {actor.actor_id: actor.node_id for actor in actors}


def assert_exact(report: dict) -> None:
    assert report["samples_distilled"] == report["samples_expected"], report["samples_distilled"]
    assert report["batches_missing"] == 0 and report["duplicates_dropped"] == 0
    assert report["batches_applied"] == report["batches_expected"] == report["student_steps"]
    assert sum(t["samples"] for t in report["teachers"]) == report["samples_expected"]
    assert sum(t["batches"] for t in report["teachers"]) == report["batches_expected"]
    assert report["dead_letters"] in (0, [], None, {}), report["dead_letters"]


@pytest.mark.heavy
def test_replicas_run_on_teacher_nodes_and_the_student_on_its_node(sim_cluster, redis_server, redis_client,
                                                                   tmp_path):
    config = job_config(tmp_path, redis_server.url, "mn-place", "data.limit_per_language=200",
                        "training.batch_size=16", "teacher.replicas=2")
    teachers_before = placements(sim_cluster, "TeacherActor")
    students_before = placements(sim_cluster, "StudentActor")
    started = time.monotonic()
    report = run_job(config, show_progress=False)
    elapsed = time.monotonic() - started

    assert_exact(report)
    assert report["samples_expected"] == 400
    teachers = {a: n for a, n in placements(sim_cluster, "TeacherActor").items() if a not in teachers_before}
    students = {a: n for a, n in placements(sim_cluster, "StudentActor").items() if a not in students_before}
    assert len(teachers) == 2 and len(students) == 1, (teachers, students)
    assert set(students.values()) == {sim_cluster.student_node}, (students, sim_cluster)
    # A replica still loading when the student finished is killed unstarted (the pool's shutdown), and
    # Ray then records no node for it; every replica that served ran on a teacher node.
    served = [t for t in report["teachers"] if t["samples"] > 0]
    ran_on = [node for node in teachers.values() if node is not None]
    assert len(ran_on) >= len(served) >= 1, (teachers, report["teachers"])
    assert set(ran_on) <= sim_cluster.teacher_nodes, (teachers, sim_cluster)
    seconds = report["student_seconds"]["total"]
    print(f"\nplacement job: {elapsed:.1f} s end to end, student {report['samples_distilled'] / seconds:.1f} "
          f"samples/s; {len(ran_on)} replica(s) on {len(set(ran_on))} teacher node(s): "
          + ", ".join(f"{t['replica_id']} {t['samples']} samples" for t in report["teachers"]))


def test_heavy_stages_run_on_the_nodes_that_offer_what_they_ask_for(sim_cluster, redis_server, tmp_path):
    """Preparing the teacher asks for a teacher slot, the ablation, evaluation and compression for the
    student's slot (the default: the student's resources); each Ray task lands on such a node, none on
    the head, where the driver runs, and the report says where each ran."""
    config = job_config(tmp_path, redis_server.url, "mn-stages", "data.limit_per_language=64",
                        "training.batch_size=16", "teacher.replicas=1", "data.eval_split=test",
                        "teacher.finetune_resources={num_cpus: 1, resources: {teacher_slot: 1}}",
                        "evaluation.ablation=true", "evaluation.latency=false",
                        "compress={stages: [{name: distil, kind: measure}, {name: int8, kind: quantize}]}")
    report = run_job(config, show_progress=False)

    assert_exact(report)
    where = report["stage_placement"]
    assert set(where) == {"prepare_teacher", "ablation", "evaluate", "compress"}, where
    head = sim_cluster.cluster.head_node.node_id
    assert where["prepare_teacher"]["node_id"] in sim_cluster.teacher_nodes, (where, sim_cluster)
    for stage in ("ablation", "evaluate", "compress"):
        assert where[stage]["node_id"] == sim_cluster.student_node, (stage, where, sim_cluster)
    assert head not in {entry["node_id"] for entry in where.values()}
    assert {entry["device"] for entry in where.values()} == {"cpu"}  # no GPU asked for
    # The stages did their work there: the ablation was scored beside the student, compression left its rows.
    assert "ablation" in report["overall"]["language_average"]
    assert [row["name"] for row in report["stages"]] == ["distil", "int8"]


@pytest.mark.heavy
def test_pool_shrinks_for_a_slow_student_and_grows_on_teacher_nodes_for_a_fast_one(
    sim_cluster, redis_server, redis_client, tmp_path
):
    """The pool of tests/integration/test_pool.py, driven the same way (feeder and student in this
    process, a step at a time), on the simulated cluster: its replicas start on the teacher nodes."""
    samples, batch = 400, 16
    batches = -(-samples // batch)  # 25
    config = job_config(
        tmp_path, redis_server.url, "mn-autoscale", "data.limit_per_language=200", f"training.batch_size={batch}",
        "teacher.replicas=2",
        # A teacher a few times slower per batch than the student, so that a student reading at full
        # speed empties the knowledge stream, and one reading a batch now and then leaves it full.
        "teacher.config.num_hidden_layers=8", "teacher.config.hidden_size=256", "teacher.config.intermediate_size=1024",
        f"teacher.autoscaling={{min_replicas: 1, max_replicas: {MAX_REPLICAS}, target_backlog_per_replica: 2,"
        " upscale_delay_s: 0, downscale_delay_s: 0}",
        "transport.max_knowledge_backlog=4",
    )
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    out_dir = tmp_path / "out"
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = prepare_teacher(config, out_dir, train)
    student_init_dir, _ = prepare_student(config, teacher_dir, out_dir, train)
    feeder = Feeder(config, str(teacher_dir), redis_server.url)
    feeder.streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    feeder.streams.ensure_group(keys.knowledge_stream, keys.student_group("student"))
    assert feeder.feed() == batches  # the work backlog (32) holds the whole epoch

    before = placements(sim_cluster, "TeacherActor")
    requested: list[list[dict]] = []
    pool = TeacherPool(config, str(teacher_dir), redis_server.url, request_resources=requested.append)
    student = StudentTrainer(config, str(student_init_dir), batches, redis_server.url, str(out_dir / "student"))
    sizes: list[int] = []  # the pool's size after every change

    def step():
        decision = pool.step()
        if not sizes or sizes[-1] != pool.running:
            sizes.append(pool.running)
        return decision

    def consume(n: int) -> None:
        target = min(student.ledger.batches_applied + n, batches)
        while student.ledger.batches_applied < target:
            for entry_id, payload in student.fetch():
                student.apply(entry_id, payload)

    def all_ready(replicas: int) -> dict[str, float] | None:
        """Seconds each active replica took to start, once there are ``replicas`` and all serve."""
        ready = pool.readiness()
        return ready if len(ready) == replicas and None not in ready.values() else None

    def alive_replicas() -> dict[str, str]:
        return {a: n for a, n in placements(sim_cluster, "TeacherActor", "ALIVE").items() if a not in before}

    shut_down = False
    try:
        # -- 1. two replicas start on the teacher nodes and, with no student reading, fill the stream --------
        pool.start()
        sizes.append(pool.running)
        wait_for(lambda: all_ready(2), 120, "the first two replicas to load their model")
        wait_for(lambda: redis_client.xlen(keys.knowledge_stream) >= 4, 60, "the replicas to fill the knowledge stream")
        first = alive_replicas()
        assert len(first) == 2 and set(first.values()) <= sim_cluster.teacher_nodes, (first, sim_cluster)

        # -- 2. a slow student (a batch every 0.3 s): the stream stays full, the pool steps down to its minimum --
        slow_started, slow_applied = time.monotonic(), student.ledger.batches_applied

        def slow() -> bool:
            consume(1)
            time.sleep(0.3)
            step()
            return pool.running == 1 and not pool.leaving_ids()

        wait_for(slow, 60, "the pool to shrink to min_replicas", poll_s=0)
        slow_rate = (student.ledger.batches_applied - slow_applied) * batch / (time.monotonic() - slow_started)
        downs = [e for e in pool.events if e.replicas_to < e.replicas_from]
        assert downs and downs[-1].replicas_to == 1, pool.events
        # Why it shrank depends on timing: once the pool has measured the rates, because the student is the
        # bottleneck; on a loaded machine it may shrink first because the work left fits one replica.
        assert any(why in downs[-1].reason for why in ("students are the bottleneck", "work backlog")), downs[-1]
        assert pool.replica_ids() == ["teacher-0"]
        assert set(consumers(redis_client, keys)) <= {"teacher-0"}  # the one that left is out of the group

        # -- 3. a fast student empties the stream: with 2 batches of work per replica wanted, it grows to max --
        fast_started, fast_applied = time.monotonic(), student.ledger.batches_applied

        def fast() -> bool:
            while redis_client.xlen(keys.knowledge_stream) > 0 and not student.ledger.complete:
                consume(1)
            step()
            return pool.running == MAX_REPLICAS

        wait_for(fast, 60, f"the pool to grow to max_replicas={MAX_REPLICAS}", poll_s=0)
        fast_rate = (student.ledger.batches_applied - fast_applied) * batch / max(time.monotonic() - fast_started, 1e-9)
        up = pool.events[-1]
        assert (up.replicas_from, up.replicas_to) == (1, MAX_REPLICAS) and up.reason.startswith("scale up"), up
        assert requested[-1] == [replica_bundle(config)] * MAX_REPLICAS == [{"CPU": 0.5, "teacher_slot": 1.0}] * 4

        # The new replicas start where a teacher_slot is free: two per teacher node, so both nodes serve.
        grown_at = time.monotonic()
        ready = wait_for(lambda: all_ready(MAX_REPLICAS), 120, "the new replicas to load their model")
        grown = alive_replicas()
        assert len(grown) == MAX_REPLICAS, grown
        assert set(grown.values()) == sim_cluster.teacher_nodes, (grown, sim_cluster)
        assert all(list(grown.values()).count(node) == TEACHER_SLOTS for node in sim_cluster.teacher_nodes)
        start_s = time.monotonic() - grown_at

        # -- 4. the student finishes; every batch was distilled exactly once ------------------------------------
        while not student.ledger.complete:
            consume(4)
            step()
        redis_client.hset(keys.control, CONTROL_STOP, "1")
        stats = pool.shutdown(timeout_s=30)
        shut_down = True
    finally:
        if not shut_down:
            redis_client.hset(keys.control, CONTROL_STOP, "1")
            pool.shutdown(timeout_s=10)
    assert sum(s["batches"] for s in stats) == batches
    assert sum(s["samples"] for s in stats) == samples
    assert student.ledger.samples_applied == samples and student.ledger.batches_applied == batches
    assert student.ledger.duplicates_dropped == 0
    assert redis_client.xlen(keys.work_stream) == 0 and redis_client.xlen(keys.knowledge_stream) == 0
    assert redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 0
    assert redis_client.exists(keys.dead_letter_stream) == 0
    assert redis_client.hget(keys.metrics, METRIC_TEACHERS_RUNNING) == b"0"
    assert requested[-1] == []
    assert not alive_replicas()
    print(f"\npool sizes: {sizes}; events {[(e.replicas_from, e.replicas_to) for e in pool.events]}; "
          f"student {slow_rate:.0f} samples/s when slow, {fast_rate:.0f} samples/s when fast; "
          f"replicas ready {max(ready.values()):.1f} s after creation ({start_s:.1f} s after the decision); "
          "teachers: " + ", ".join(f"{s['replica_id']} {s['samples']}" for s in stats))


@pytest.mark.heavy
def test_manual_scale_during_a_run_loses_and_duplicates_no_sample(
    sim_cluster, redis_server, redis_client, tmp_path, monkeypatch
):
    """`polydistill scale` (cluster.jobs.scale) grows a running job's pool from 1 to 3 replicas and
    back to 1 mid-run; the replicas that leave do so between batches and the report is exact."""
    config = job_config(
        tmp_path, redis_server.url, "mn-scale", "data.limit_per_language=200", "training.batch_size=16",
        "training.epochs=6", "teacher.replicas=1",
        # The teachers are the bottleneck (as in the test above), so more replicas distil faster.
        "teacher.config.num_hidden_layers=8", "teacher.config.hidden_size=256", "teacher.config.intermediate_size=1024",
    )
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    # `scale` finds the job's Redis in the metadata `submit` gave the Ray job; this job runs in-process
    # (run_job, as the submitted entrypoint does), so the Jobs API lookup answers with that metadata.
    metadata = {jobs.META_JOB_ID: config.resolved_job_id, jobs.META_NAMESPACE: config.transport.namespace,
                jobs.META_REDIS_URL: redis_server.url}
    lookup = SimpleNamespace(get_job_info=lambda submission_id: SimpleNamespace(metadata=metadata))
    monkeypatch.setattr(jobs, "_client", lambda address, headers=None: lookup)
    teachers_before = placements(sim_cluster, "TeacherActor")
    students_before = placements(sim_cluster, "StudentActor")

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = run_job(config, show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread, raised there
            outcome["error"] = exc

    trace: list[tuple[float, int, int | None]] = []  # (time, samples distilled, replicas running)

    def progress() -> dict:
        if "error" in outcome:
            raise outcome["error"]
        if "report" in outcome:
            raise AssertionError(f"the job ended before the test could scale it; pool sizes seen: {trace}")
        current = jobs.read_progress(redis_client, keys) or {}
        if current.get("teachers_running") is not None:
            trace.append((time.monotonic(), current["samples"], current["teachers_running"]))
        return current

    def distilling_with_one() -> bool:
        current = progress()
        return current.get("samples", 0) > 0 and current.get("teachers_running") == 1

    def new_replicas_serve() -> bool:  # loaded, and each has distilled (held work) at least once
        current = progress()
        return current.get("teachers_running") == 3 and all(
            current["replicas"].get(replica, {}).get("batches", 0) >= 1 for replica in ("teacher-1", "teacher-2"))

    def back_to_one() -> dict | None:
        current = progress()
        return current if (current.get("teachers_wanted"), current.get("teachers_running")) == (1, 1) else None

    started = time.monotonic()
    job = threading.Thread(target=run, name="run_job", daemon=True)
    job.start()
    try:
        wait_for(distilling_with_one, 120, "the job to distil with its one replica", poll_s=0.2)
        jobs.scale("http://stub:8265", "mn-scale-submission", 3)
        assert redis_client.hget(keys.control, CONTROL_DESIRED_TEACHERS) == b"3"
        scaled_up = time.monotonic()
        wait_for(new_replicas_serve, 120, "the two new replicas to serve", poll_s=0.2)
        serving_s = time.monotonic() - scaled_up
        jobs.scale("http://stub:8265", "mn-scale-submission", 1)
        shrunk = wait_for(back_to_one, 30, "the pool to follow the override down", poll_s=0.2)
        assert shrunk["pool_reason"] == "manual override" and shrunk["teachers_override"] == 1
        samples_at_shrink = shrunk["samples"]
        jobs.scale("http://stub:8265", "mn-scale-submission", None)  # hand the pool back to teacher.replicas
        assert redis_client.hget(keys.control, CONTROL_DESIRED_TEACHERS) is None
        job.join(timeout=180)
    finally:
        if job.is_alive():  # a failed wait: stop the job so it does not run on into the next test
            redis_client.hset(keys.control, CONTROL_STOP, "1")
            job.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not job.is_alive(), "run_job did not return"
    if "error" in outcome:
        written = tmp_path / "out" / "report.json"  # run_job writes it before raising JobFailed
        if written.exists():
            failed = json.loads(written.read_text())
            raise AssertionError(
                f"{outcome['error']}; dead letters: {failed['dead_letters']}; pool: {failed['teacher_pool']}; "
                f"teachers: {failed['teachers']}") from outcome["error"]
        raise outcome["error"]
    report = outcome["report"]

    assert_exact(report)
    assert report["samples_expected"] == 2400 and samples_at_shrink < 2400
    pool = report["teacher_pool"]
    assert [(e["from"], e["to"]) for e in pool["events"]] == [(0, 1), (1, 3), (3, 1)], pool["events"]
    assert all(e["reason"] == "manual override" for e in pool["events"][1:]), pool["events"]
    assert pool["max_running"] == 3 and pool["final_running"] == 1 and pool["replicas_served"] == 3
    served = {t["replica_id"]: t["samples"] for t in report["teachers"]}
    assert set(served) == {"teacher-0", "teacher-1", "teacher-2"} and min(served.values()) > 0, served
    teachers = {a: n for a, n in placements(sim_cluster, "TeacherActor").items() if a not in teachers_before}
    students = {a: n for a, n in placements(sim_cluster, "StudentActor").items() if a not in students_before}
    assert len(teachers) == 3 and set(teachers.values()) <= sim_cluster.teacher_nodes, (teachers, sim_cluster)
    assert set(students.values()) == {sim_cluster.student_node}, students

    def rate(running: int) -> float:
        points = [(t, s) for t, s, r in trace if r == running]
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]) if len(points) > 1 else float("nan")

    print(f"\nmanual scale: 1 -> 3 replicas serving {serving_s:.1f} s after `scale 3`, back to 1 at "
          f"{samples_at_shrink}/2400 samples; job {elapsed:.1f} s end to end; distilled ~{rate(1):.0f} samples/s "
          f"with 1 replica, ~{rate(3):.0f} with 3 (incl. their start); teachers: "
          + ", ".join(f"{r} {n}" for r, n in served.items()))
