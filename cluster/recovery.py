"""The driver's recovery loop: notice a lost student, lost Redis data or lost messages, and
re-enqueue exactly what the student has not learnt.

What can go wrong, and what notices it::

    student worker dies or fails  its train() call fails with RayActorError, or RayTaskError
                                  (not for a NaN loss, Redis or its checkpoint)
    Redis comes back empty        the run marker (control hash field "run") is gone
    messages lost in flight       nothing queued or held, the feed is done, the student still
      (Redis restarted from an     misses batches (probe: StudentActor.missing())
      older snapshot)
    a teacher replica dies        nothing to do here: its pending batch stays in the work
                                  stream and another replica reclaims it (actors/teacher.py);
                                  the pool replaces the replica (actors/pool.py)
    the feeder dies               its feed call fails with RayActorError; Ray restarts the
                                  actor, and a recovery re-feeds what the students miss
    a teacher pool or the cache   its run() fails with RayActorError; Ray restarts the actor
      writer dies                 (which rebuilds its state from Redis and the plan) and the
                                  supervisor issues run() again (``LongCall``)

Batches dead-lettered (a poison message: actors/teacher.py, student/consumer.py) are never re-fed;
when a probe finds that every batch still missing was dead-lettered, the job is done and the driver
stops it: it ends completed with dead letters (cluster/dead_letters.py). Missing batches that no dead
letter names were lost in flight and are fed again, whatever other batches were dead-lettered; only a
dead letter that names no batch at all may be one of them, and then the job is stopped.

A job that is stopping (its stop flag set, by the driver or from outside: cluster/stopping.py) is
neither probed nor recovered: its students are leaving with what they have. They get
``STOP_GRACE_S`` to finish their batch and checkpoint; after that the driver ends them itself.

One procedure answers the first three (``Supervisor.recover``), and the first start of a job is
the same procedure with nothing applied yet::

    1. bump the feed generation        the running feed call stops before its next chunk
       and wait for that call to end   (actors.shells.FeedSuperseded)
    2. restart the student if it died  the new one loads its checkpoint (student/checkpoint.py)
    3. in ONE transaction: empty the   consumers never see a stream without its group; a late
       work and knowledge streams,     XACK of an old entry is a no-op on the new stream
       recreate their groups, set the
       run marker and the generation
    4. ask the student what it misses  the live ledger, or the checkpoint's after a restart
    5. feed exactly those batches      Feeder.feed(only=...): the plan is a pure function

Why this is exact: after step 3 nothing older than the reset can be lost any more, and step 5
enqueues every batch that step 4 did not find in the student's ledger, so every batch is applied
at least once; the ledger drops any second copy (a teacher mid-batch during the reset publishes
into the new stream), so none is applied twice. Step 1 is what keeps the old feed from adding
stale copies after the reset, and step 4 comes after step 3 so that a batch applied meanwhile
is not re-fed for nothing. The student keeps its in-memory ledger across a Redis data loss: its
reads fail with ``GroupMissing`` and it waits (bounded) for step 3.

Deciding is a pure function (``watch``) of one observation, the previous state and the clock,
unit-tested without Ray or Redis; ``Supervisor`` does the I/O.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import ray
import redis

from polydistill.cluster.config import JobConfig
from polydistill.cluster.dead_letters import DeadLetterBook
from polydistill.cluster.stopping import STOPPED_BY_DRIVER, JobFailed, request_stop
from polydistill.storage.keys import CONTROL_FEED_GENERATION, CONTROL_RUN, CONTROL_STOP, TEACHER_GROUP, JobKeys
from polydistill.storage.streams import JobStreams
from polydistill.student.checkpoint import CheckpointError
from polydistill.student.trainer import NonFiniteLoss

log = logging.getLogger(__name__)

QUIET_S = 2.0  # nothing queued or in flight for this long before asking the student what it misses
FEED_STOP_TIMEOUT_S = 60.0  # a superseded feed call checks its generation before every chunk
POLL_S = 0.5
# From the stop request to the last student's return: a batch to finish and a checkpoint to save.
STOP_GRACE_S = 20.0
# A control actor (feeder, teacher pool, cache writer) that died: Ray starts it again on the driver's
# node; the feeder's start (tokenizing the training split) is the slowest.
ACTOR_RESTART_TIMEOUT_S = 300.0


class RecoveryFailed(RuntimeError):
    """The job could not be brought back: too many recoveries, or batches lost to dead letters."""


class StopOverdue(RuntimeError):
    """Students still training ``STOP_GRACE_S`` after the job was told to stop."""


# -- deciding (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """One reading of the job, taken in a single Redis transaction."""

    run_marker_present: bool
    feeding: bool  # the current feed call is still enqueuing
    work_backlog: int
    knowledge_backlog: int
    stop_requested: bool = False  # the job's stop flag is set


@dataclass(frozen=True)
class WatchState:
    quiet_since: float | None = None
    stop_seen_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "recover", "probe", "stop", "finish", "abandon"]
    reason: str = ""


def watch(observation: Observation, state: WatchState, now: float, quiet_s: float = QUIET_S,
          stop_grace_s: float = STOP_GRACE_S) -> tuple[Verdict, WatchState]:
    """What the driver should do after one observation: wait, recover, probe the student, or abandon
    students that do not stop."""
    if observation.stop_requested:
        # The students are leaving: what they miss is for `polydistill resume`, not for a recovery.
        seen_at = now if state.stop_seen_at is None else state.stop_seen_at
        if now - seen_at > stop_grace_s:
            return Verdict("abandon", f"the students did not stop within {stop_grace_s:g} s of the stop request"), \
                WatchState(stop_seen_at=seen_at)
        return Verdict("wait"), WatchState(stop_seen_at=seen_at)
    if not observation.run_marker_present:
        return Verdict("recover", "Redis lost the job's data (its run marker is gone)"), WatchState()
    if observation.feeding or observation.work_backlog or observation.knowledge_backlog:
        return Verdict("wait"), WatchState()
    if state.quiet_since is None:
        return Verdict("wait"), WatchState(quiet_since=now)
    if now - state.quiet_since < quiet_s:
        return Verdict("wait"), state
    # Restart the quiet period so that probes come at most every quiet_s.
    return Verdict("probe", f"nothing queued or in flight for {quiet_s:g} s and the feed is done"), WatchState(now)


def judge_probe(missing: int, unnamed_dead_letters: int, missing_dead_lettered: int = 0) -> Verdict:
    """After a probe: the students miss ``missing`` batches although nothing is in flight, of which
    ``missing_dead_lettered`` are named by a dead letter; ``unnamed_dead_letters`` dead letters name no
    batch (a message too broken to say which batch it was, or one lost with Redis before it was read).

    A dead letter that names some other batch (a bad copy beside the plan, an epoch outside it) says
    nothing about the missing ones: those were lost in flight and are fed again."""
    if missing == 0:
        return Verdict("wait")  # the student is about to return
    if missing_dead_lettered == missing:
        # Every batch still missing was dead-lettered with its reason: re-feeding one would only fail
        # again, and the job is done (cluster/dead_letters.py: completed with dead letters).
        return Verdict("finish", f"the {missing} batches still missing were dead-lettered")
    if unnamed_dead_letters > 0:
        # Dead letters that name no batch may be the missing ones: end the job, whose report then shows
        # what is missing and why.
        return Verdict("stop", f"{missing} batches missing and {unnamed_dead_letters} dead-lettered messages "
                               "that name no batch")
    return Verdict("recover", f"{missing - missing_dead_lettered} batches were lost in flight (Redis restarted "
                   "from an older snapshot?)")


# -- acting -------------------------------------------------------------------------------------
@dataclass
class Recovery:
    cause: str
    detected_at: float  # time.time()
    seconds: float  # detection -> missing batches re-enqueued (a control actor: -> restarted and answering)
    batches_refed: int
    student_restarted: bool
    actor_restarted: str | None = None  # a control actor Ray restarted: "feeder", "teacher pool 'x'", ...

    def as_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "detected_at": round(self.detected_at, 3), "seconds": round(self.seconds, 3),
                "batches_refed": self.batches_refed, "student_restarted": self.student_restarted,
                "actor_restarted": self.actor_restarted}


@dataclass
class LongCall:
    """A control actor's call that runs until the job ends (a teacher pool's or the cache writer's run()).

    The actor is started with ``max_restarts``: when it dies, Ray starts it again and the call failed
    with it is issued again on the new incarnation, which rebuilds its state from Redis and the plan.
    Ray does not retry it by itself, so that the supervisor sees the death and the report shows it."""

    what: str  # for logs and the report: "teacher pool 'teacher'", "cache writer"
    actor: ray.actor.ActorHandle
    method: str
    ref: ray.ObjectRef | None = None
    finished: bool = False

    def issue(self) -> ray.ObjectRef:
        self.ref = getattr(self.actor, self.method).remote()
        return self.ref


class Supervisor:
    """Feeds the job, watches it, and recovers it (see the module docstring)."""

    def __init__(
        self,
        config: JobConfig,
        streams: JobStreams,
        feeder: ray.actor.ActorHandle,
        make_students: dict[str, Callable[[], ray.actor.ActorHandle]],
        total_batches: int,
        reader_groups: Callable[[], list[str]] = list,
    ):
        self.config = config
        # Other consumer groups of the knowledge stream to recreate on a reset (the cache writer, while
        # it still writes): called at each reset, since one that is done must not come back.
        self.reader_groups = reader_groups
        self.streams = streams
        self.keys: JobKeys = streams.keys
        self.feeder = feeder
        # Several students learn from one teacher pass, each through its own consumer group; the
        # re-feeds below are the union of what any of them misses (each drops copies it has).
        self.make_students = make_students
        self.total_batches = total_batches
        self.run_token = uuid.uuid4().hex
        self.generation = 0
        self.students: dict[str, ray.actor.ActorHandle] = {}
        self.train_refs: dict[str, ray.ObjectRef] = {}
        self.summaries: dict[str, dict] = {}
        self.feed_ref: ray.ObjectRef | None = None
        self.batches_fed = 0
        self.feeds_lost = 0  # feed calls whose feeder died: the batches they enqueued are not in batches_fed
        self.dead_letter_book = DeadLetterBook()
        self._dead_letters_seen = 0
        self.recoveries: list[Recovery] = []
        self._state = WatchState()

    # -- starting ---------------------------------------------------------------------------------
    def start(self, resume: bool) -> None:
        """Starts the student and the feed; on resume only the batches not in the checkpoint."""
        self.students = {name: make() for name, make in self.make_students.items()}
        self.generation = 1
        self._reset()
        only = self._missing() if resume else None
        if resume:
            log.info("resuming: %d of %d batches still to distil", len(only), self.total_batches)
        self.feed_ref = self.feeder.feed.remote(only, self.generation)
        self.train_refs = {name: student.train.remote() for name, student in self.students.items()}

    def _missing(self) -> list[tuple[int, int]]:
        """(epoch, batch) pairs that at least one unfinished student has not applied."""
        asked = [student.missing.remote() for name, student in self.students.items() if name not in self.summaries]
        return sorted({tuple(pair) for pairs in ray.get(asked) for pair in pairs})

    def _release_group(self, name: str) -> None:
        """A student that has finished reads no more: its group must not hold back the trimming of
        entries (re-feeds, late copies) that the other students still need."""
        if self.config.knowledge_stream_shared:
            self.streams.client.xgroup_destroy(self.keys.knowledge_stream, self.keys.student_group(name))
            self.streams.trim_consumed(self.keys.knowledge_stream)

    def _reset(self) -> None:
        transaction = self.streams.client.pipeline(transaction=True)
        groups = [(self.keys.knowledge_stream, self.keys.student_group(name))
                  for name in self.make_students if name not in self.summaries]
        groups += [(self.keys.knowledge_stream, group) for group in self.reader_groups()]
        # Every teacher's input: the work stream, and with several teachers the streams between them.
        teacher_inputs = [(stream, TEACHER_GROUP) for stream in
                          self.keys.teacher_inputs(len(self.config.teacher_names), self.config.task_names)]
        self.streams.reset([*teacher_inputs, *groups], pipeline=transaction)
        transaction.hset(self.keys.control, mapping={CONTROL_RUN: self.run_token,
                                                     CONTROL_FEED_GENERATION: self.generation})
        transaction.execute()

    # -- watching ---------------------------------------------------------------------------------
    def wait(self, long_calls: list[LongCall], on_progress: Callable[[dict[str, str]], None]) -> dict[str, dict]:
        """Returns every student's summary by name; recovers on the way (a control actor that died: its
        call issued again); raises the first other failure of a long call."""
        while True:
            running = {ref: name for name, ref in self.train_refs.items() if name not in self.summaries}
            if not running:
                return self.summaries
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            if ready:
                name = running[ready[0]]
                try:
                    self.summaries[name] = ray.get(ready[0])
                    self._release_group(name)
                except ray.exceptions.RayActorError as exc:
                    self.recover(f"the student worker {name!r} died ({type(exc).__name__})", restart_student=name)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, NonFiniteLoss):  # a restart would learn the same NaN again
                        raise JobFailed(f"student {name!r}: {exc.cause}") from None
                    if isinstance(exc.cause, (redis.RedisError, CheckpointError)):
                        raise  # the job's Redis or its checkpoint: a new student would meet the same
                    # A broken worker, like a dead one, is restarted from its checkpoint (bounded by
                    # training.max_recoveries); a bad message it met is refused before training instead.
                    self.recover(f"the student worker {name!r} failed ({type(exc.cause).__name__}: {exc.cause})",
                                 restart_student=name)
                continue
            for call in long_calls:
                if not call.finished and ray.wait([call.ref], timeout=0)[0]:
                    self._collect(call)
            if ray.wait([self.feed_ref], timeout=0)[0]:
                try:
                    ray.get(self.feed_ref)
                except ray.exceptions.RayActorError as exc:
                    # What the dead call had enqueued is unknown: re-feed whatever the students miss.
                    self.recover(f"the feeder died ({type(exc).__name__})", restarted_actor="feeder")
                    continue
            observation, progress, dead_letters = self._observe()
            self._dead_letters_seen = dead_letters
            verdict, self._state = watch(observation, self._state, time.monotonic())
            if verdict.action == "probe":
                missing = self._missing()
                if dead_letters:
                    self.dead_lettered_batches()
                book = self.dead_letter_book
                verdict = judge_probe(len(missing), book.unnamed, sum(1 for pair in missing if pair in book.named))
                if verdict.action == "stop":
                    log.error("stopping the job: %s (see %s)", verdict.reason, self.keys.dead_letter_stream)
                    request_stop(self.streams.client, self.keys, STOPPED_BY_DRIVER)
                elif verdict.action == "finish":
                    log.warning("job %s ends: %s (see %s)", self.keys.job_id, verdict.reason,
                                self.keys.dead_letter_stream)
                    request_stop(self.streams.client, self.keys, STOPPED_BY_DRIVER)
            if verdict.action == "abandon":
                raise StopOverdue(f"{verdict.reason}: {', '.join(sorted(running.values()))} still training")
            if verdict.action == "recover":
                self.recover(verdict.reason)
            on_progress(progress)

    def _collect(self, call: LongCall) -> None:
        """A long call has returned: fine, failed with the job (raised), or died with its actor (issued again)."""
        try:
            ray.get(call.ref)
            call.finished = True
        except ray.exceptions.RayActorError as exc:
            self.restart_long_call(call, f"the {call.what} died ({type(exc).__name__})")

    def restart_long_call(self, call: LongCall, cause: str) -> None:
        """Issues ``call`` again on the actor Ray restarts (bounded by training.max_recoveries, like every
        recovery); the time recorded runs until the new incarnation answers."""
        self._check_recovery_budget(cause)
        detected_at, started = time.time(), time.monotonic()
        log.warning("job %s: %s; waiting for Ray to restart it", self.keys.job_id, cause)
        self._wait_for_restart(call.actor, cause)
        call.issue()
        recovery = Recovery(cause, detected_at, time.monotonic() - started, 0, False, call.what)
        self.recoveries.append(recovery)
        log.warning("job %s: the %s is back after %.1f s", self.keys.job_id, call.what, recovery.seconds)

    def _wait_for_restart(self, actor: ray.actor.ActorHandle, cause: str) -> None:
        """Until the actor that Ray restarts answers, retrying while Ray reports it unavailable."""
        deadline = time.monotonic() + ACTOR_RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 0.0))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise RecoveryFailed(f"job {self.keys.job_id}: {cause}, and Ray did not restart it within "
                                         f"{ACTOR_RESTART_TIMEOUT_S:g} s") from None
                time.sleep(POLL_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                raise RecoveryFailed(f"job {self.keys.job_id}: {cause}, and Ray did not restart it "
                                     f"({type(exc).__name__}: {exc})") from None

    def ask(self, actor: ray.actor.ActorHandle, method: str, what: str, timeout_s: float = 30.0) -> Any:
        """A control actor's answer once the job is ending. One killed just before (it had no long call left
        to fail and tell the supervisor) is waited for while Ray restarts it, recorded as a recovery, and
        asked again."""
        try:
            return ray.get(getattr(actor, method).remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError as exc:  # ActorUnavailableError too: restarting
            cause = f"the {what} died while the job ended ({type(exc).__name__})"
            self._check_recovery_budget(cause)
            detected_at, started = time.time(), time.monotonic()
            self._wait_for_restart(actor, cause)
            self.recoveries.append(Recovery(cause, detected_at, time.monotonic() - started, 0, False, what))
            return ray.get(getattr(actor, method).remote(), timeout=timeout_s)

    def result_of(self, call: LongCall, timeout_s: float) -> Any:
        """The long call's return value once the job is stopping; a call whose actor died meanwhile is
        issued once more, and the new incarnation returns at once (the stop flag is set)."""
        try:
            return ray.get(call.ref, timeout=timeout_s)
        except ray.exceptions.RayActorError as exc:
            self.restart_long_call(call, f"the {call.what} died while the job ended ({type(exc).__name__})")
            return ray.get(call.ref, timeout=timeout_s)

    def _observe(self) -> tuple[Observation, dict[str, str], int]:
        feeding = not ray.wait([self.feed_ref], timeout=0)[0]  # a failed feed call was raised by wait()
        transaction = self.streams.client.pipeline(transaction=True)
        transaction.hmget(self.keys.control, [CONTROL_RUN, CONTROL_STOP])
        transaction.xlen(self.keys.knowledge_stream)
        transaction.xlen(self.keys.dead_letter_stream)
        transaction.hgetall(self.keys.progress)
        teacher_inputs = self.keys.teacher_inputs(len(self.config.teacher_names), self.config.task_names)
        for stream in teacher_inputs:  # batches on their way through the teachers
            transaction.xlen(stream)
        (marker, stop), knowledge, dead, progress, *work = transaction.execute()
        observation = Observation(
            run_marker_present=marker == self.run_token.encode(),
            stop_requested=stop == b"1",
            feeding=feeding,
            work_backlog=sum(int(length) for length in work),
            knowledge_backlog=int(knowledge),
        )
        return observation, {k.decode(): v.decode() for k, v in progress.items()}, int(dead)

    # -- recovering -------------------------------------------------------------------------------
    def _check_recovery_budget(self, cause: str) -> None:
        limit = self.config.training.max_recoveries
        if len(self.recoveries) >= limit:
            raise RecoveryFailed(
                f"job {self.keys.job_id} needed a recovery ({cause}) after {len(self.recoveries)} already "
                f"(training.max_recoveries={limit}); giving up. Earlier causes: "
                + "; ".join(r.cause for r in self.recoveries)
            )

    def recover(self, cause: str, *, restart_student: str | None = None, restarted_actor: str | None = None) -> None:
        """``restarted_actor``: the control actor whose death this is (Ray restarts it), for the report."""
        self._check_recovery_budget(cause)
        detected_at, started = time.time(), time.monotonic()
        log.warning("job %s: %s; recovering", self.keys.job_id, cause)
        if self._marker_present():
            self.dead_lettered_batches()
        else:
            self.dead_letter_book.stream_lost(self._dead_letters_seen)
            self._dead_letters_seen = 0
        # 1. Stop the feed call in progress (before the reset, so that it adds nothing afterwards).
        self.generation += 1
        self.streams.client.hset(self.keys.control, CONTROL_FEED_GENERATION, self.generation)
        self.batches_fed += self._batches_sent(FEED_STOP_TIMEOUT_S)
        # 2. A new student loads the last checkpoint.
        if restart_student:
            ray.kill(self.students[restart_student], no_restart=True)
            self.students[restart_student] = self.make_students[restart_student]()
        # 3. Fresh streams and groups, the run marker and the generation, in one transaction.
        self._reset()
        # 4-5. Re-enqueue exactly what the students have not learnt, less the batches dead-lettered: fed
        # again, they would only fail again.
        missing = [pair for pair in self._missing() if pair not in self.dead_letter_book.named]
        if restarted_actor == "feeder":  # a call made while Ray is still restarting it fails at once
            self._wait_for_restart(self.feeder, cause)
        self.feed_ref = self.feeder.feed.remote(missing, self.generation)
        if restart_student:
            self.train_refs[restart_student] = self.students[restart_student].train.remote()
        self._state = WatchState()
        recovery = Recovery(cause, detected_at, time.monotonic() - started, len(missing), bool(restart_student),
                            restarted_actor)
        self.recoveries.append(recovery)
        log.warning("job %s recovered in %.1f s: %d batches re-enqueued%s", self.keys.job_id, recovery.seconds,
                    len(missing), ", student restarted from its checkpoint" if restart_student else "")

    def _marker_present(self) -> bool:
        return self.streams.client.hget(self.keys.control, CONTROL_RUN) == self.run_token.encode()

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, timeout_s: float = 120.0) -> int:
        """Batches enqueued over the whole run (every feed call, re-feeds included)."""
        return self.batches_fed + self._batches_sent(timeout_s)

    def _batches_sent(self, timeout_s: float) -> int:
        """What the current feed call enqueued; 0 for a call whose feeder died (counted in ``feeds_lost``:
        what it had enqueued died with it, and the recovery re-fed whatever the students missed)."""
        try:
            return ray.get(self.feed_ref, timeout=timeout_s)
        except ray.exceptions.RayActorError:
            self.feeds_lost += 1
            return 0

    def dead_letters(self) -> int:
        return self.dead_letter_book.lost + int(self.streams.client.xlen(self.keys.dead_letter_stream))

    def dead_lettered_batches(self) -> dict[tuple[int, int], tuple[str, int]]:
        """(epoch, batch) -> (reason, samples) of every batch a dead letter has named so far; kept across a
        Redis data loss, which takes the dead-letter stream with it."""
        self.dead_letter_book.read_stream(self.streams.read_dead_letters())
        return dict(self.dead_letter_book.named)
