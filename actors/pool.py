"""The teacher pool: owns a job's teacher replicas and keeps their number where it should be.

    every interval:  reap replicas that left ─▶ measure (Redis) ─▶ decide (pure policy) ─▶ scale

The pool size comes from ``cluster.autoscaling.decide`` when ``teacher.autoscaling`` is set, from
``teacher.replicas`` otherwise; either way a ``desired_teachers`` field in the job's control hash
(written by ``polydistill scale``) overrides it while present.

Growing asks Ray's autoscaler for the replicas' resources first (``request_resources``), so a
cluster launches the GPU nodes the new replicas need; on a local Ray that request is a no-op.
The autoscaler keeps one standing request for the whole cluster, so the request sent is the sum
over every live pool of every job (``actors/demand.py``), never this pool's alone.
Shrinking is graceful: the pool sets the leaving replica's own stop field, the replica finishes
and acknowledges the batch it holds (its publish and ack are one transaction) and returns its
counters; only then is its actor killed. A batch is never taken from a replica mid-way, so
nothing is lost and nothing is done twice.

``TeacherPool`` is a plain class (tests drive it from the test process); ``TeacherPoolActor`` runs
it under Ray for the driver and reports the pool's gauges to the Ray dashboard.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import redis
from ray.util import metrics as ray_metrics

from polydistill.actors.demand import ClusterDemand
from polydistill.actors.shells import TeacherActor
from polydistill.cluster.autoscaling import PoolDecision, PoolMetrics, PoolState, decide
from polydistill.cluster.config import JobConfig, TeacherStage, with_redis_password
from polydistill.storage.keys import (
    CONTROL_DESIRED_TEACHERS,
    CONTROL_STOP,
    METRIC_POOL_REASON,
    METRIC_TEACHERS_RUNNING,
    METRIC_TEACHERS_WANTED,
    TEACHER_COUNTERS,
    TEACHER_GROUP,
    TEACHER_STARTED,
    JobKeys,
    parse_teacher_metric_field,
    replica_stop_field,
    teacher_metric_field,
)
from polydistill.storage.streams import BackpressureTimeout, GroupMissing, JobStreams, connect_job

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
DEFAULT_RATE_WINDOW_S = 10.0


def replica_bundle(config: JobConfig) -> dict[str, float]:
    """The resources one teacher replica asks Ray for (zero amounts left out)."""
    teacher = config.teacher
    bundle = {"CPU": teacher.num_cpus, "GPU": teacher.num_gpus, **teacher.resources}
    return {name: float(amount) for name, amount in bundle.items() if amount > 0}


class WindowedRate:
    """Events per busy second over the last ``window_s`` seconds, from two cumulative counters.

    Fed (time, events so far, busy seconds so far); the rate is the ratio of their increases within
    the window, or of their totals while the window holds no increase (e.g. right after a start, or
    while a producer reports only every few steps). None until anything was busy.
    """

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque[tuple[float, float, float]] = deque()

    def update(self, now: float, events: float, busy_s: float) -> float | None:
        self.samples.append((now, events, busy_s))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        _, first_events, first_busy = self.samples[0]
        if busy_s - first_busy > 1e-6 and events > first_events:
            return (events - first_events) / (busy_s - first_busy)
        return events / busy_s if busy_s > 1e-6 else None


@dataclass
class _Replica:
    replica_id: str
    index: int
    actor: ray.actor.ActorHandle
    serve_ref: ray.ObjectRef
    started: float
    created_at: float  # wall clock, to compare with the replica's own TEACHER_STARTED stamp
    ready_after_s: float | None = None  # from creation to serving (model loaded)
    leaving_since: float | None = None


@dataclass(frozen=True)
class ScalingEvent:
    """One change of the pool's target size, kept for tests, status and the report."""

    at: float
    replicas_from: int
    replicas_to: int
    reason: str


@dataclass
class _Totals:
    batches: float = 0.0
    busy_seconds: float = 0.0
    per_replica: dict[str, dict[str, float]] = field(default_factory=dict)


class TeacherPool:
    """Owns the teacher replicas of one job (plain class: the caller must be connected to Ray)."""

    def __init__(
        self,
        config: JobConfig,
        model_dir: str,
        redis_url: str,
        *,
        on_measure: Callable[[PoolMetrics, PoolDecision, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        request_resources: Callable[[list[dict[str, float]]], None] | None = None,
        stage: TeacherStage | None = None,
        restarted: bool = False,
    ):
        # ``restarted``: this pool takes over from one that died (Ray restarted its actor; see ``_take_over``).
        # ``config`` is the job as this pool's teacher sees it (``JobConfig.for_teacher``); ``stage``
        # says which of the job's teachers that is: the pool reads and writes that teacher's streams.
        self.config = config
        self.stage = stage if stage is not None else config.teacher_stage()
        self.replica_prefix = self.stage.name
        self._own_replica = re.compile(rf"^{re.escape(self.replica_prefix)}-\d+$")
        # `polydistill scale` sets the main pool's size; each extra teacher's pool has a field of its own.
        self.main_pool = self.stage.name == "teacher"
        self.override_field = (CONTROL_DESIRED_TEACHERS if self.main_pool
                               else f"{CONTROL_DESIRED_TEACHERS}:{self.stage.name}")
        self.model_dir = model_dir
        self.redis_url = redis_url
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        # The password is read here, for the pool's own client only: ``config`` goes on to the replicas
        # without it, and each reads it where it runs.
        self.client = connect_job(redis_url, with_redis_password(config).transport)
        self.streams = JobStreams(self.client, self.keys)
        self.source, self.sink = self.keys.stage_streams(self.stage.index, self.stage.count, self.stage.task)
        self.scaling = config.teacher.autoscaling
        self.clock = clock
        self.on_measure = on_measure
        # Every pool on the cluster shares one standing request; ``request_resources`` (tests) records it.
        self.demand = ClusterDemand(f"{self.keys.namespace}/{self.keys.job_id}/{self.stage.name}",
                                    send=request_resources)
        self._options = {
            "num_cpus": config.teacher.num_cpus,
            "num_gpus": config.teacher.num_gpus,
            "resources": dict(config.teacher.resources),
            "max_restarts": 0,
        }
        self._active: dict[str, _Replica] = {}
        self._leaving: dict[str, _Replica] = {}
        self._retired: list[tuple[int, dict]] = []
        self._next_index = 0
        self._state = PoolState()
        self._teacher_rate = WindowedRate(rate_window_s)
        self._student_rate = WindowedRate(rate_window_s)
        self._lock = threading.RLock()
        self._started = False
        self.wanted = config.teacher.replicas
        self.events: list[ScalingEvent] = []
        self.last_decision: PoolDecision | None = None
        self.max_running = 0  # the most replicas active at once
        self.final_running: int | None = None  # active when the pool was shut down
        self._born = clock()
        self.restarted = restarted
        self._lost_with_pool: list[tuple[int, str]] = []  # (index, replica id) of the earlier pool's replicas
        if restarted:
            self._take_over()

    def _take_over(self) -> None:
        """The earlier pool died and its replicas with it (Ray ends the actors an actor owns). Their ids
        are found in Redis (counters, consumers of the work group); new replicas are numbered after them, so
        that no name clashes with a replica Ray has not removed yet and each one's counters stay its own.
        The batches they held stay pending and the new replicas reclaim them (actors/teacher.py)."""
        found = {parsed[0] for raw in self.client.hkeys(self.keys.metrics)
                 if (parsed := parse_teacher_metric_field(raw.decode())) is not None}
        found.update(self._consumers() or {})
        earlier = sorted((int(replica_id.rsplit("-", 1)[1]), replica_id) for replica_id in found
                         if self._own_replica.match(replica_id))
        self._lost_with_pool = earlier
        self._next_index = earlier[-1][0] + 1 if earlier else 0
        log.warning("teacher pool %s/%s restarted: %d replicas died with the earlier pool; new ones start at "
                    "index %d", self.keys.job_id, self.stage.name, len(earlier), self._next_index)

    # -- what the pool holds ---------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Replicas serving or starting; leaving ones are not counted (they hold no new work)."""
        return len(self._active)

    def replica_ids(self) -> list[str]:
        return list(self._active)

    def leaving_ids(self) -> list[str]:
        return list(self._leaving)

    def readiness(self) -> dict[str, float | None]:
        """Seconds each active replica took from creation to serving; None while it is still starting
        (a new node booting, the model loading)."""
        with self._lock:
            waiting = [r for r in self._active.values() if r.ready_after_s is None]
            if waiting:
                stamps = self.client.hmget(
                    self.keys.metrics, [teacher_metric_field(r.replica_id, TEACHER_STARTED) for r in waiting])
                for replica, stamp in zip(waiting, stamps):
                    if stamp is not None:
                        replica.ready_after_s = max(float(stamp) - replica.created_at, 0.0)
            return {replica_id: r.ready_after_s for replica_id, r in self._active.items()}

    def stats(self) -> list[dict]:
        """Counters of every replica that has left, in the order the replicas were started."""
        return [stats for _, stats in sorted(self._retired, key=lambda item: item[0])]

    def summary(self) -> dict:
        """The pool's sizes and every change of its target size, for the job's report."""
        return {
            "initial": self.config.teacher.replicas,
            "max_running": self.max_running,
            "final_running": self.final_running if self.final_running is not None else self.running,
            "replicas_served": len(self._retired) + len(self._active) + len(self._leaving),
            # A pool that Ray restarted: the earlier pool's events and sizes are gone with it; its replicas'
            # counters are what they had written to Redis (the teachers list marks them lost_with_pool).
            "restarted": self.restarted,
            "replicas_lost_with_pool": [replica_id for _, replica_id in self._lost_with_pool],
            "events": [{"at_s": round(e.at - self._born, 2), "from": e.replicas_from, "to": e.replicas_to,
                        "reason": e.reason} for e in self.events],
        }

    # -- scaling ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the initial replicas (``teacher.replicas``) unless already started."""
        with self._lock:
            if not self._started:
                self._started = True
                self.scale_to(self.config.teacher.replicas, "initial size (teacher.replicas)")

    def scale_to(self, replicas: int, reason: str = "scale_to") -> None:
        """Adds replicas, or asks the newest ones to leave after their current batch."""
        if replicas < 0:
            raise ValueError(f"a pool cannot run {replicas} replicas")
        with self._lock:
            self._started = True
            current = self.running
            self.wanted = replicas
            if replicas == current:
                return
            self.events.append(ScalingEvent(self.clock(), current, replicas, reason))
            log.info("teacher pool %s: %d -> %d replicas (%s)", self.keys.job_id, current, replicas, reason)
            # A standing request for the whole pool, so that the cluster autoscaler launches nodes for
            # the new replicas now, and releases the request for the ones leaving.
            self.demand.set([replica_bundle(self.config)] * replicas)
            for _ in range(replicas - current):
                self._start_replica()
            for replica_id in list(self._active)[replicas:][::-1]:
                self._retire(replica_id)

    def _start_replica(self) -> None:
        index = self._next_index
        self._next_index += 1
        replica_id = f"{self.replica_prefix}-{index}"
        self.client.hdel(self.keys.control, replica_stop_field(replica_id))
        # Named, so that the Ray dashboard's actor list says which job and teacher each replica serves.
        actor = TeacherActor.options(**self._options, name=f"{self.keys.job_id}:{replica_id}").remote(
            replica_id, self.config, self.model_dir, self.redis_url, self.stage)
        self._active[replica_id] = _Replica(replica_id, index, actor, actor.serve.remote(), self.clock(), time.time())
        self.max_running = max(self.max_running, len(self._active))

    def _retire(self, replica_id: str) -> None:
        replica = self._active.pop(replica_id)
        self.client.hset(self.keys.control, replica_stop_field(replica_id), "1")
        replica.leaving_since = self.clock()
        self._leaving[replica_id] = replica

    def poll(self) -> list[str]:
        """Collects the replicas whose serve() returned; returns their ids.

        A leaving replica returns after its last batch. A replica whose actor died (node lost,
        OOM) is dropped with the counters it had reported; its unacknowledged batch is reclaimed
        by another replica. So is one whose serve() raised (a broken replica: one bad message is
        dead-lettered inside it, actors/teacher.py), and the pool starts another in its place; Redis
        trouble is the job's, which every replica would meet, and is raised here.
        """
        with self._lock:
            replicas = {r.serve_ref: r for r in [*self._active.values(), *self._leaving.values()]}
            if not replicas:
                return []
            ready, _ = ray.wait(list(replicas), num_returns=len(replicas), timeout=0)
            done = []
            for ref in ready:
                replica = replicas[ref]
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    log.warning("teacher replica %s died (%s); its pending batch will be reclaimed",
                                replica.replica_id, type(exc).__name__)
                    stats = self._counters_of(replica.replica_id)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, (redis.RedisError, BackpressureTimeout, GroupMissing)):
                        raise
                    log.error("teacher replica %s failed (%s: %s); replacing it, its pending batch will be "
                              "reclaimed", replica.replica_id, type(exc.cause).__name__, exc.cause)
                    stats = self._counters_of(replica.replica_id)
                self._forget(replica, stats)
                done.append(replica.replica_id)
            return done

    def _forget(self, replica: _Replica, stats: dict) -> None:
        self._active.pop(replica.replica_id, None)
        self._leaving.pop(replica.replica_id, None)
        self._retired.append((replica.index, stats))
        self.client.hdel(self.keys.control, replica_stop_field(replica.replica_id))
        self._drop_consumer(replica.replica_id)
        ray.kill(replica.actor)

    def _consumers(self) -> dict[str, int] | None:
        """Consumers of the work group and the batches each holds; None when the group is gone."""
        try:
            consumers = self.client.xinfo_consumers(self.source, TEACHER_GROUP)
        except redis.ResponseError:  # no such stream or group (the job is ending)
            return None
        result = {}
        for consumer in consumers:
            name = consumer["name"]
            result[name.decode() if isinstance(name, bytes) else name] = int(consumer["pending"])
        return result

    def _drop_consumer(self, replica_id: str) -> None:
        """Removes a departed replica from the consumer group, unless it still owns pending work
        (which must stay claimable: deleting the consumer would drop it from the pending list)."""
        if (self._consumers() or {}).get(replica_id) == 0:
            self.client.xgroup_delconsumer(self.source, TEACHER_GROUP, replica_id)

    def _counters_of(self, replica_id: str) -> dict:
        values = self.client.hmget(self.keys.metrics, [teacher_metric_field(replica_id, c) for c in TEACHER_COUNTERS])
        batches, samples, busy = (float(v) if v is not None else 0.0 for v in values)
        return {"replica_id": replica_id, "teacher": self.stage.name, "batches": int(batches),
                "samples": int(samples), "busy_seconds": round(busy, 3)}

    # -- measuring and deciding ------------------------------------------------------------------
    def measure(self) -> PoolMetrics:
        """One reading of the pipeline from Redis (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.source)
        pipe.xlen(self.sink)
        pipe.hgetall(self.keys.metrics)
        pipe.hmget(self.keys.progress, ["batches", "busy_seconds"])
        pipe.hget(self.keys.control, self.override_field)
        work, knowledge, counters, (student_batches, student_busy), desired = pipe.execute()
        now = self.clock()
        totals = _teacher_totals(counters, self._own_replica)
        teacher_rate = self._teacher_rate.update(now, totals.batches, totals.busy_seconds)
        student_rate = None
        if student_batches is not None and student_busy is not None:
            student_rate = self._student_rate.update(now, float(student_batches), float(student_busy))
        return PoolMetrics(
            work_backlog=int(work),
            knowledge_backlog=int(knowledge),
            knowledge_backlog_limit=self.config.transport.max_knowledge_backlog,
            running_replicas=self.running,
            per_replica_batches_per_s=teacher_rate,
            student_batches_per_s=student_rate,
            manual_override=self._parse_override(desired),
        )

    def _parse_override(self, raw: bytes | None) -> int | None:
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            log.warning("ignoring %s=%r in %s: not a replica count", CONTROL_DESIRED_TEACHERS, raw, self.keys.control)
            return None
        return value

    def step(self, now: float | None = None) -> PoolDecision:
        """Reap, measure, decide, scale: one tick of the pool."""
        with self._lock:
            self.start()
            self.poll()
            now = self.clock() if now is None else now
            metrics = self.measure()
            if self.scaling is not None:
                decision, self._state = decide(metrics, self.scaling, self._state, now)
            elif metrics.manual_override is not None:
                decision = PoolDecision(metrics.manual_override, "manual override")
            else:
                decision = PoolDecision(self.config.teacher.replicas, "fixed pool (teacher.replicas)")
            if decision.replicas != self.running:
                self.scale_to(decision.replicas, decision.reason)
            self.wanted = decision.replicas
            self.last_decision = decision
            self.demand.renew()
            self.readiness()
            self._publish(metrics, decision)
            return decision

    def _publish(self, metrics: PoolMetrics, decision: PoolDecision) -> None:
        if self.main_pool:  # `polydistill status` shows the main pool
            self.client.hset(self.keys.metrics, mapping={
                METRIC_TEACHERS_WANTED: decision.replicas,
                METRIC_TEACHERS_RUNNING: self.running,
                METRIC_POOL_REASON: decision.reason,
            })
        if self.on_measure is not None:
            self.on_measure(metrics, decision, self.running)

    # -- the loop ----------------------------------------------------------------------------------
    def job_stopped(self) -> bool:
        return self.client.hget(self.keys.control, CONTROL_STOP) == b"1"

    def run(self, interval_s: float = DEFAULT_INTERVAL_S, should_stop: Callable[[], bool] | None = None,
            drain_timeout_s: float = 120.0) -> list[dict]:
        """Steps every ``interval_s`` until the job's stop flag; returns every replica's counters."""
        stop = should_stop or self.job_stopped
        while not stop():
            self.step()
            deadline = self.clock() + interval_s
            while self.clock() < deadline and not stop():
                time.sleep(min(0.1, interval_s))
        return self.shutdown(drain_timeout_s)

    def shutdown(self, timeout_s: float = 120.0) -> list[dict]:
        """Asks every replica to leave, waits for their last batches, returns all counters."""
        with self._lock:
            if self.final_running is None:
                self.final_running = self.running
            for replica_id in list(self._active):
                self._retire(replica_id)
            # A replica still starting has never read from the group, so it holds no work, and once
            # started it would see the stop flag before reading: kill it instead of waiting for it.
            readers = self._consumers()
            for replica in list(self._leaving.values()):
                if readers is not None and replica.replica_id not in readers:
                    self._forget(replica, self._counters_of(replica.replica_id))
            refs = [r.serve_ref for r in self._leaving.values()]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            self.poll()
            for replica in list(self._leaving.values()):  # did not finish in time: counters from Redis
                log.warning("teacher replica %s did not stop within %.0f s; killing it", replica.replica_id, timeout_s)
                self._forget(replica, self._counters_of(replica.replica_id))
            # The earlier pool's replicas (a restarted pool): counters from Redis, consumers let go.
            for index, replica_id in self._lost_with_pool:
                if all(index != retired_index for retired_index, _ in self._retired):
                    self._retired.append((index, {**self._counters_of(replica_id), "lost_with_pool": True}))
                    self._drop_consumer(replica_id)
            self.wanted = 0
            self.demand.clear()
            if self.main_pool:
                self.client.hset(self.keys.metrics, mapping={METRIC_TEACHERS_WANTED: 0, METRIC_TEACHERS_RUNNING: 0})
            return self.stats()


def _teacher_totals(counters: dict[bytes, bytes], own_replica: re.Pattern | None = None) -> _Totals:
    """The counters of the replicas whose ids ``own_replica`` matches (all when None)."""
    totals = _Totals()
    for raw_field, raw_value in counters.items():
        parsed = parse_teacher_metric_field(raw_field.decode())
        if parsed is None:
            continue
        replica_id, counter = parsed
        if own_replica is not None and not own_replica.match(replica_id):
            continue
        value = float(raw_value)
        totals.per_replica.setdefault(replica_id, {})[counter] = value
        if counter == "batches":
            totals.batches += value
        elif counter == "busy_seconds":
            totals.busy_seconds += value
    return totals


@ray.remote(max_concurrency=4)
class TeacherPoolActor:
    """Runs a ``TeacherPool`` for the driver; threaded so that ``snapshot`` answers while ``run`` loops."""

    def __init__(self, config: JobConfig, model_dir: str, redis_url: str,
                 rate_window_s: float = DEFAULT_RATE_WINDOW_S, stage: TeacherStage | None = None):
        from polydistill.cluster.quiet import quiet_libraries

        quiet_libraries()
        stage = stage if stage is not None else config.teacher_stage()
        tags = {"job": config.resolved_job_id, "teacher": stage.name}
        self.gauges = {
            name: ray_metrics.Gauge(name, description, tag_keys=("job", "teacher"))
            for name, description in [
                ("polydistill_teacher_replicas_wanted", "Teacher replicas the pool wants"),
                ("polydistill_teacher_replicas_running", "Teacher replicas serving or starting"),
                ("polydistill_work_backlog", "Work batches waiting for or held by teachers"),
                ("polydistill_knowledge_backlog", "Knowledge messages waiting for students"),
            ]
        }
        for gauge in self.gauges.values():
            gauge.set_default_tags(tags)
        # Started again by Ray after the earlier pool's process died: take over from it (TeacherPool._take_over).
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.pool = TeacherPool(config, model_dir, redis_url, on_measure=self._report, rate_window_s=rate_window_s,
                                stage=stage, restarted=restarted)

    def _report(self, metrics: PoolMetrics, decision: PoolDecision, running: int) -> None:
        self.gauges["polydistill_teacher_replicas_wanted"].set(decision.replicas)
        self.gauges["polydistill_teacher_replicas_running"].set(running)
        self.gauges["polydistill_work_backlog"].set(metrics.work_backlog)
        self.gauges["polydistill_knowledge_backlog"].set(metrics.knowledge_backlog)

    def run(self, interval_s: float = DEFAULT_INTERVAL_S) -> list[dict]:
        try:
            return self.pool.run(interval_s)
        finally:
            self.gauges["polydistill_teacher_replicas_wanted"].set(0)
            self.gauges["polydistill_teacher_replicas_running"].set(0)

    def scale_to(self, replicas: int) -> None:
        self.pool.scale_to(replicas, "scale_to call")

    def summary(self) -> dict:
        return self.pool.summary()

    def snapshot(self) -> dict:
        return {
            "wanted": self.pool.wanted,
            "running": self.pool.readiness(),  # replica id -> seconds it took to start (None: starting)
            "leaving": self.pool.leaving_ids(),
            "reason": self.pool.last_decision.reason if self.pool.last_decision else None,
            "events": [event.__dict__ for event in self.pool.events],
        }
