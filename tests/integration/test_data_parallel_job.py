"""A student trained by two data-parallel workers from one consumer group: each reads its own
messages, gradients are averaged over gloo, and every sample is still learnt exactly once."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification

from polydistill.cluster.driver import run_job
from tests.integration.test_pipeline import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.heavy
def test_two_workers_share_the_stream_and_learn_every_sample_once(tmp_path, redis_server, local_ray):
    config = tiny_config(tmp_path, redis_server.url, "student.workers=2", "student.num_cpus=0.5",
                         "data.eval_split=null")
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 800
    assert report["samples_per_epoch"] == {"0": 400, "1": 400}
    assert report["batches_missing"] == 0 and report["dead_letters"] == 0
    parallel = report["data_parallel"]
    assert parallel["workers"] == 2
    read = parallel["samples_read_by_worker"]
    # Both workers read messages, and together exactly the job's samples (no message twice).
    assert all(n > 0 for n in read) and sum(read) == 800 + 16 * report["duplicates_dropped"]
    # A round applies up to one batch per worker: fewer optimiser steps than batches.
    assert report["batches_expected"] // 2 <= parallel["optimizer_steps"] < report["batches_expected"]
    assert report["final_loss"] == report["final_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(report["student_path"])
    assert model.config.num_hidden_layers == 2


@pytest.mark.heavy
def test_a_lost_worker_brings_the_group_back_from_its_checkpoint(tmp_path, redis_server, local_ray):
    # The worker rank 0 started (not the driver's actor): its peers' collectives fail, rank 0 ends
    # its process, and the driver restarts the group. Losing rank 0 itself is a lost student like
    # any other (its workers die with their owner).
    import os
    import signal

    from ray._private import state

    from tests.integration.test_faults import Injector, fault_config

    config = fault_config(tmp_path, redis_server.url, "student.workers=2", "student.num_cpus=0.5")

    def kill() -> None:
        students = sorted((info for info in state.actors().values()
                           if info["ActorClassName"] == "StudentActor" and info["State"] == "ALIVE"),
                          key=lambda info: info["Pid"])
        # The driver's actor (rank 0) was created first; its worker by it, afterwards.
        students.sort(key=lambda info: info.get("StartTime", 0))
        os.kill(students[-1]["Pid"], signal.SIGKILL)

    injector = Injector("data-parallel worker 1", config, redis_server.url, kill)
    injector.start()
    report = run_job(config, show_progress=False)
    injector.check()
    assert report["samples_distilled"] == report["samples_expected"] == 400
    assert report["batches_missing"] == 0 and report["samples_per_epoch"] == {"0": 200, "1": 200}
    [recovery] = report["recoveries"]
    assert recovery["student_restarted"]
