"""Job submission end to end: a real Ray head with its dashboard (the Jobs API server) started by the
test, the tiny example submitted through cluster/jobs.py, watched, scaled, and a second job stopped.

The head runs with Ray's token authentication on (the default for local clusters since Ray 2.59),
with a token made for this test only, passed to the head in its environment and to the client as a
header; ~/.ray is not touched. It uses its own --temp-dir, so no other Ray on this machine can
attach to it by accident, and it is stopped by killing its own process group (never `ray stop`,
which would stop every Ray of this user).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from polydistill.cluster import jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.yaml"
SMALL = [
    "data.languages=[eng_Latn, swh_Latn]",
    "data.limit_per_language=200",
    "data.eval_split=null",
    "training.epochs=1",
    "training.batch_size=16",
    "teacher.replicas=1",
]


@dataclass(frozen=True)
class Head:
    address: str
    headers: dict[str, str]
    temp_dir: str
    metrics_port: int  # the node's metrics agent: Prometheus text at /metrics

    def diagnostics(self) -> str:
        """The tails of the head's own logs, for a failure message."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        parts = []
        for path in [Path(self.temp_dir) / "head.log", logs / "ray_process_exit.log", logs / "dashboard.log",
                     logs / "raylet.out", logs / "gcs_server.out"]:
            if path.exists():
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(parts)


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are chosen, so the kernel cannot hand
    the same port out twice (Ray refuses to start when two of its components share one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _kill_tree(process: subprocess.Popen, temp_dir: str) -> None:
    """Kills the head's process group, then any process of this head that left the group."""
    try:  # a throwaway head: no need for a graceful shutdown
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=15)
    time.sleep(0.5)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    token = secrets.token_hex(32)
    # Short: Ray puts unix sockets under it, and their paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="pdray", dir="/tmp")
    agent_port_flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                        "runtime-env-agent-port", "ray-client-server-port")
    gcs_port, dashboard_port, metrics_port, *agent_ports = _free_ports(3 + len(agent_port_flags))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # workers hand their metrics to the agent every second instead of every ten
           "RAY_metrics_report_interval_ms": "1000",
           # the entrypoint's `python` must be this environment's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "POLYDISTILL_REDIS_URL"):
        env.pop(name, None)
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
             f"--metrics-export-port={metrics_port}",
             # Every port this head listens on is a free one: Ray's fixed defaults (e.g. the job agent's
             # 52365) collide with any other Ray running on the machine, and then no job can start.
             *(f"--{flag}={port}" for flag, port in zip(agent_port_flags, agent_ports)),
             "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    head = Head(f"http://127.0.0.1:{dashboard_port}", {"Authorization": f"Bearer {token}"}, temp_dir, metrics_port)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                request = urllib.request.Request(f"{head.address}/api/version", headers=head.headers)
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not serve its dashboard ({exc}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield head
    finally:
        _kill_tree(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_status(head: Head, job: str, until, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = jobs.status(head.address, job, headers=head.headers)
        except ConnectionError as exc:
            pytest.fail(f"the Ray head stopped answering ({exc}):\n{head.diagnostics()}")
        if until(result):
            return result
        if result["status"] in jobs.TERMINAL or time.monotonic() > deadline:
            logs = jobs.logs(head.address, job, headers=head.headers)
            pytest.fail(f"waiting for {what}: job is {result['status']} ({result['message']})\n{logs[-4000:]}")
        time.sleep(0.5)


def test_submit_status_scale_logs(ray_head, redis_server, redis_client, tmp_path):
    submitted = time.monotonic()
    job = jobs.submit(ray_head.address, TINY, SMALL, str(tmp_path / "out"), redis_server.url,
                      headers=ray_head.headers)
    assert job.startswith("out-")  # the job id: the output folder's name (the config's rule) + a random suffix
    # The Redis URL is in the job's environment, not in the entrypoint that `ray job list` shows.
    info = jobs._client(ray_head.address, ray_head.headers).get_job_info(job)
    assert redis_server.url not in info.entrypoint and info.entrypoint.startswith("python -m polydistill run ")
    assert info.runtime_env["env_vars"]["POLYDISTILL_REDIS_URL"] == redis_server.url

    # -- status and scale while it runs ------------------------------------------------------------
    running = wait_status(ray_head, job,
                          lambda r: r["progress"] and r["progress"]["teachers_running"] == 1, 120,
                          "the teacher pool to run")
    assert running["status"] == "RUNNING"
    jobs.scale(ray_head.address, job, 2, headers=ray_head.headers)
    scaled = wait_status(ray_head, job,
                         lambda r: r["progress"] is None
                         or (r["progress"]["teachers_wanted"], r["progress"]["teachers_running"]) == (2, 2), 30,
                         "the pool to take the override")
    if scaled["progress"] is not None:  # None: the job finished before the pool's next step
        assert scaled["progress"]["teachers_override"] == 2
        assert scaled["progress"]["pool_reason"] == "manual override"
        assert "teachers: 2 running / 2 wanted, manual override 2" in jobs.format_status(scaled)
        print("\n" + jobs.format_status(scaled))

    # -- it completes; its keys are gone; the logs end with the summary ------------------------------
    final = wait_status(ray_head, job, lambda r: r["status"] == "SUCCEEDED", 180, "SUCCEEDED")
    elapsed = time.monotonic() - submitted
    assert final["progress"] is None  # the driver removed the job's keys
    assert list(redis_client.scan_iter(match=f"polydistill:{job}:*")) == []
    text = jobs.logs(ray_head.address, job, headers=ray_head.headers)
    assert "distilled 400/400 samples in" in text, text[-3000:]
    assert (tmp_path / "out" / "report.json").exists()
    print(f"\nsubmitted job SUCCEEDED {elapsed:.1f} s after submission")


def test_stop_ends_a_running_job_cleanly(ray_head, redis_server, redis_client, tmp_path):
    job = jobs.submit(ray_head.address, TINY, [*SMALL, "training.epochs=50"], str(tmp_path / "out"),
                      redis_server.url, headers=ray_head.headers)
    wait_status(ray_head, job, lambda r: r["progress"] and r["progress"]["samples"] > 0, 120,
                "the job to distil")
    stopped_at = time.monotonic()
    assert jobs.stop(ray_head.address, job, wait_s=90, headers=ray_head.headers) == "STOPPED"
    stop_s = time.monotonic() - stopped_at
    # The driver wound down before Ray's SIGKILL: the student saved a checkpoint, the keys are gone.
    logs = jobs.logs(ray_head.address, job, headers=ray_head.headers)
    assert "SIGTERM: asked every worker to stop" in logs, logs[-3000:]
    assert (tmp_path / "out" / "student" / "config.json").exists(), logs[-3000:]
    assert list(redis_client.scan_iter(match=f"polydistill:{job}:*")) == [], logs[-3000:]
    assert jobs.stop(ray_head.address, job, headers=ray_head.headers) == "STOPPED"  # idempotent
    print(f"\nstop: STOPPED {stop_s:.1f} s after `stop`")


# The metrics the job's actors export through ray.util.metrics (Prometheus names; Ray prefixes "ray_").
POOL_METRICS = ["polydistill_teacher_replicas_wanted", "polydistill_teacher_replicas_running",
                "polydistill_work_backlog", "polydistill_knowledge_backlog", "polydistill_samples_distilled",
                "polydistill_student_loss", "polydistill_student_samples_per_s", "polydistill_teacher_samples",
                "polydistill_batches_enqueued", "polydistill_teacher_batch_seconds",
                "polydistill_teacher_samples_per_s", "polydistill_student_loss_term", "polydistill_wire_bytes",
                "polydistill_language_samples"]


def scrape(head: Head) -> dict[str, list[str]]:
    """polydistill_* sample lines on the head's metrics endpoint, by metric name (without Ray's prefix)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("#") or "polydistill_" not in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("ray_")
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in POOL_METRICS:
                name = name.removesuffix(suffix)
        found.setdefault(name, []).append(line)
    return found


def test_autoscaled_pool_scale_metrics_and_exact_report(ray_head, redis_server, redis_client, tmp_path):
    """The policy grows the pool, `scale` pins it, the metrics endpoint shows the job, the report is exact."""
    submitted = time.monotonic()
    job = jobs.submit(ray_head.address, TINY, [
        *SMALL, "training.epochs=3",
        # Grow at once when the work backlog asks for it (4 batches per replica); never shrink on the
        # policy's own account, so that the only shrink is the manual one.
        # (an upscale delay of 4 s: long enough for status to see 1 replica first)
        ("teacher.autoscaling={min_replicas: 1, max_replicas: 3, target_backlog_per_replica: 4,"
         " upscale_delay_s: 4, downscale_delay_s: 3600}"),
        "transport.max_knowledge_backlog=4",  # a slow student holds the work back: the backlog stays up
    ], str(tmp_path / "out"), redis_server.url, headers=ray_head.headers)
    seen_running: list[int] = []
    rates: list[float] = []
    metrics: dict[str, list[str]] = {}
    scraped = [0.0]  # when the metrics endpoint was last read
    peak = [0.0]  # the most replicas running that the metrics endpoint showed for this job

    def watch(until):
        def check(result):
            progress = result["progress"]
            if progress and progress["teachers_running"] is not None:
                if not seen_running or seen_running[-1] != progress["teachers_running"]:
                    seen_running.append(progress["teachers_running"])
                if progress["samples_per_s"]:
                    rates.append(progress["samples_per_s"])
            if time.monotonic() < scraped[0] + 2:  # the endpoint is slow on a busy machine: every 2 s
                return until(result)
            scraped[0] = time.monotonic()
            for name, lines in scrape(ray_head).items():
                metrics[name] = lines
                if name == "polydistill_teacher_replicas_running":
                    peak[0] = max([peak[0], *(float(line.rsplit(" ", 1)[1]) for line in lines if job in line)])
            return until(result)
        return check

    # -- the policy grows the pool from 1 replica, and the new replicas serve ------------------------------
    grown = wait_status(ray_head, job, watch(lambda r: r["progress"] and r["progress"]["teachers_running"] == 3 and (
        sum(c["batches"] > 0 for c in r["progress"]["replicas"].values()) >= 2 or r["progress"]["samples"] >= 400)),
        120, "the policy to grow the pool")
    assert seen_running[:2] == [1, 3], seen_running  # status saw 1 replica, then the policy's 3
    assert grown["progress"]["pool_reason"].startswith(("scale up 1 -> 3", "hold at 3")), grown["progress"]
    print("\n" + jobs.format_status(grown))

    # -- `scale` overrides it; the pool follows ---------------------------------------------------------
    jobs.scale(ray_head.address, job, 1, headers=ray_head.headers)
    pinned = wait_status(ray_head, job, watch(lambda r: r["progress"] is None or (
        r["progress"]["teachers_wanted"], r["progress"]["teachers_running"]) == (1, 1)), 30,
        "the pool to follow `scale --teachers 1`")
    followed = pinned["progress"] is not None
    if followed:
        assert pinned["progress"]["teachers_override"] == 1
        assert pinned["progress"]["pool_reason"].startswith("manual override")
        assert "teachers: 1 running / 1 wanted, manual override 1" in jobs.format_status(pinned)
        print(jobs.format_status(pinned))

    final = wait_status(ray_head, job, watch(lambda r: r["status"] == "SUCCEEDED"), 180, "SUCCEEDED")
    scraped[0] = 0.0
    watch(lambda r: True)(final)  # one last read of the endpoint
    elapsed = time.monotonic() - submitted
    assert final["progress"] is None and list(redis_client.scan_iter(match=f"polydistill:{job}:*")) == []

    # -- the dashboard's metrics endpoint exposed the job's metrics ---------------------------------------
    missing = [name for name in POOL_METRICS if name not in metrics]
    assert not missing, f"not on :{ray_head.metrics_port}/metrics: {missing}; seen {sorted(metrics)}"
    assert any(f'job="{job}"' in line for lines in metrics.values() for line in lines)
    assert peak[0] >= 2, metrics["polydistill_teacher_replicas_running"]

    # -- exact accounting, and the pool's history in the report -------------------------------------------
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["samples_distilled"] == report["samples_expected"] == 1200
    assert report["batches_missing"] == 0 and report["duplicates_dropped"] == 0
    assert report["batches_applied"] == report["batches_expected"] == report["student_steps"]
    assert sum(t["samples"] for t in report["teachers"]) == report["samples_expected"]
    assert sorted(report["samples_per_epoch"].values() if isinstance(report["samples_per_epoch"], dict) else report["samples_per_epoch"]) == [400, 400, 400]
    pool = report["teacher_pool"]
    assert pool["initial"] == report["teacher_replicas"] == 1
    assert pool["max_running"] >= 2 and pool["replicas_served"] == len(report["teachers"]) >= 2
    ups = [e for e in pool["events"] if e["to"] > e["from"] and e["reason"].startswith("scale up")]
    assert ups, pool["events"]
    if followed:
        assert pool["final_running"] == 1
        assert any(e["to"] == 1 and e["reason"].startswith("manual override") for e in pool["events"]), pool["events"]
    student_rate = report["samples_distilled"] / report["student_seconds"]["total"]
    print(f"pool sizes seen in status: {seen_running}; report: max {pool['max_running']}, final "
          f"{pool['final_running']}, events {[(e['at_s'], e['from'], e['to']) for e in pool['events']]}")
    print(f"student: {student_rate:.1f} samples/s over the run, status rates {min(rates, default=0):.1f}.."
          f"{max(rates, default=0):.1f}; teachers: " + ", ".join(
              f"{t['replica_id']} {t['samples']} samples {t['batches'] / max(t['busy_seconds'], 1e-9):.2f} batches/busy s"
              for t in report["teachers"]))
    print(f"metrics on the endpoint: {sorted(metrics)}; replicas running peaked there at {peak[0]:g}")
    print(f"autoscaled job SUCCEEDED {elapsed:.1f} s after submission")
