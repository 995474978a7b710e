"""Two jobs' pools on one Ray cluster: the autoscaler's single standing request covers both."""

from __future__ import annotations

import pytest

from polydistill.actors.demand import ClusterDemand

pytestmark = pytest.mark.integration

GPU = {"GPU": 1.0, "teacher_slot": 1.0}
CPU = {"CPU": 2.0}


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_growing_and_stopping_pools_send_the_sum_of_live_demands(local_ray):
    sent: list[list[dict]] = []
    clock = Clock()
    job_a = ClusterDemand("ns/job-a/teacher", send=sent.append, clock=clock)
    job_b = ClusterDemand("ns/job-b/teacher", send=sent.append, clock=clock)

    job_a.set([GPU] * 2)
    assert sent[-1] == [GPU, GPU]
    job_b.set([CPU] * 3)  # B grows: A's demand stays in the request
    assert sent[-1] == [GPU, GPU, CPU, CPU, CPU]
    job_a.set([GPU] * 3)
    assert sent[-1] == [GPU, GPU, GPU, CPU, CPU, CPU]
    job_a.clear()  # A stops: exactly B's demand remains
    assert sent[-1] == [CPU, CPU, CPU]
    job_b.clear()
    assert sent[-1] == []


def test_a_pool_that_stops_renewing_drops_out_after_its_lease(local_ray):
    sent: list[list[dict]] = []
    clock = Clock()
    dead = ClusterDemand("ns/job-dead/teacher", send=sent.append, clock=clock, lease_s=30)
    live = ClusterDemand("ns/job-live/teacher", send=sent.append, clock=clock, lease_s=30)
    dead.set([GPU])
    live.set([CPU])
    assert sent[-1] == [GPU, CPU]
    clock.now += 11  # past a third of the lease: the live pool renews, the dead one never does
    live.renew()
    assert sent[-1] == [GPU, CPU]
    clock.now += 20  # the dead pool's lease has run out
    live.renew()
    assert sent[-1] == [CPU]
    live.clear()
    assert sent[-1] == []
