"""Ctrl-C on `polydistill run`: the job stops as `polydistill stop` stops it, leaves one line and a
checkpoint, removes its keys, and the command exits 130 without a traceback.

The command runs as a process of its own, in a session of its own, and the signal goes to that whole
process group, as a terminal sends it: the driver, the local Ray it started and the Redis beside it
all receive it. The job's Redis here is the test's, named by ``transport.redis_url``, so that the test
can look for the keys left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from polydistill.cluster.config import load_config
from polydistill.cluster.exit_codes import EXIT_INTERRUPTED
from polydistill.storage.keys import JobKeys
from polydistill.storage.streams import connect
from polydistill.student.checkpoint import find_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def interrupted_run(tmp_path: Path, redis_url: str, presses: int) -> tuple[subprocess.CompletedProcess, float, list]:
    """Runs the tiny example until the student has applied a few batches, then presses Ctrl-C ``presses``
    times, each after the driver has answered the one before; returns the finished process, the seconds
    from the first press to its exit and the job's keys left in Redis."""
    overrides = [
        f"transport.redis_url={redis_url}", f"job_id=ctrl-c-{presses}", "data.languages=[eng_Latn, swh_Latn]",
        "data.limit_per_language=100", "data.eval_split=null", "training.epochs=4", "training.batch_size=8",
        "training.log_every=1", "training.checkpoint_every=4", "teacher.replicas=1",
    ]
    out = tmp_path / "out"
    config = load_config(EXAMPLES / "tiny.yaml", overrides)
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    client = connect(redis_url)
    command = [sys.executable, "-m", "polydistill", "run", str(EXAMPLES / "tiny.yaml"), "--output", str(out),
               "--no-progress"]
    for item in overrides:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while int(client.hget(keys.progress, "batches") or 0) < 6:
            assert process.poll() is None, f"the job ended before Ctrl-C: {''.join(stderr_lines)}"
            assert time.monotonic() < deadline, "the student applied no batch within 120 s"
            time.sleep(0.05)
        pressed = time.monotonic()
        for press in range(presses):
            os.killpg(process.pid, signal.SIGINT)
            # Two signals before the driver's handler runs would count as one press.
            while press + 1 < presses and not any("Ctrl-C again" in line for line in stderr_lines):
                assert time.monotonic() - pressed < 10, "the driver did not answer the first Ctrl-C"
                time.sleep(0.01)
        stdout = process.stdout.read()
        process.wait(timeout=60)
        ended_s = time.monotonic() - pressed
        reader.join(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    left = client.keys(keys.pattern)
    client.close()
    return subprocess.CompletedProcess(command, process.returncode, stdout, "".join(stderr_lines)), ended_s, left


def test_ctrl_c_stops_the_job_with_a_checkpoint_and_one_line(tmp_path, redis_server):
    finished, ended_s, left = interrupted_run(tmp_path, redis_server.url, presses=1)
    print(f"\n[ctrl-c] exit {finished.returncode} {ended_s:.1f} s after the press; stderr:\n{finished.stderr}")
    assert "Traceback" not in finished.stderr and "Traceback" not in finished.stdout
    assert finished.returncode == EXIT_INTERRUPTED
    out = (tmp_path / "out").resolve()
    lines = [line for line in finished.stderr.splitlines() if "polydistill resume" in line]
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("stopped by Ctrl-C: ") and " of 800 samples distilled, checkpoint in " in lines[0]
    assert lines[0].endswith(f"continue with: polydistill resume {out}")
    assert find_checkpoint(out / "checkpoints" / "student") is not None
    stopped = json.loads((out / "report.json").read_text())
    assert stopped["status"] == "stopped" and stopped["stopped_by"] == "Ctrl-C"
    assert f": {stopped['samples_distilled']} of 800 samples distilled" in lines[0]
    assert left == [], f"the interrupted job left keys behind: {left}"


@pytest.mark.heavy  # the first press's drill stays in the README's tier
def test_a_second_ctrl_c_ends_at_once(tmp_path, redis_server):
    finished, ended_s, left = interrupted_run(tmp_path, redis_server.url, presses=2)
    print(f"\n[ctrl-c x2] exit {finished.returncode} {ended_s:.1f} s after the first press; stderr:\n{finished.stderr}")
    assert "Traceback" not in finished.stderr and "Traceback" not in finished.stdout
    assert finished.returncode == EXIT_INTERRUPTED
    out = (tmp_path / "out").resolve()
    assert finished.stderr.rstrip().splitlines()[-1].endswith(f"polydistill resume {out}")
    # Ended before the students could report: the stop's way out (stopped, but reported) writes it.
    assert not (out / "report.json").exists()
    assert left == [], f"the interrupted job left keys behind: {left}"
