"""Ray actors: thin shells that run the plain classes and report metrics to the Ray dashboard.

Stopping goes through the job's control hash in Redis rather than an actor method call, so a
long-running loop never has to be interrupted and any process (driver, CLI) can ask for it.

An actor's arguments are visible to whoever can inspect the Ray cluster, so the config an actor
receives carries no Redis password: each actor reads it where it runs (``with_redis_password``)
and hands the plain classes, in its own process, the config that has it.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util import metrics

from polydistill.cluster.config import JobConfig, with_redis_password
from polydistill.cluster.quiet import quiet_libraries
from polydistill.storage.keys import (
    CONTROL_FEED_GENERATION,
    CONTROL_STOP,
    TEACHER_STARTED,
    JobKeys,
    replica_stop_field,
    teacher_metric_field,
)
from polydistill.storage.streams import connect_job


class StopFlag:
    """Polls the job's stop flag at most every ``interval`` seconds (one HMGET, off the hot path).

    ``extra_fields`` are further control-hash fields that also mean "stop" for this worker alone,
    e.g. the one the teacher pool sets to retire a single replica.
    """

    def __init__(self, redis_url: str, config: JobConfig, interval: float = 0.5, extra_fields: tuple[str, ...] = ()):
        self.client = connect_job(redis_url, config.transport)
        self.key = JobKeys(config.resolved_job_id, config.transport.namespace).control
        self.fields = (CONTROL_STOP, *extra_fields)
        self.interval = interval
        self._checked = 0.0
        self._stopped = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._stopped and now - self._checked >= self.interval:
            self._checked = now
            self._stopped = b"1" in self.client.hmget(self.key, self.fields)
        return self._stopped


class FeedSuperseded:
    """Stop flag of one feed call: the job's stop, or a newer feed generation in the control hash.

    The driver bumps the generation when it recovers (student restarted, Redis lost its data) and
    re-feeds only what the student is missing; a generation that vanished (Redis came back empty)
    also stops the old call, so it never enqueues into streams the driver is about to reset.
    """

    def __init__(self, stop: StopFlag, generation: int, interval: float = 0.2):
        self.stop, self.generation, self.interval = stop, str(generation).encode(), interval
        self._checked = 0.0
        self._superseded = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._superseded and now - self._checked >= self.interval:
            self._checked = now
            self._superseded = self.stop.client.hget(self.stop.key, CONTROL_FEED_GENERATION) != self.generation
        return self._superseded or self.stop()


def _tags(config: JobConfig) -> dict[str, str]:
    return {"job": config.resolved_job_id}


@ray.remote
class FeederActor:
    def __init__(self, config: JobConfig, tokenizer_dir: str | dict[str, str], redis_url: str):
        """``tokenizer_dir``: the teacher's folder, or in a multi-task job every task's teacher folder by task."""
        quiet_libraries()
        from polydistill.actors.feeder import Feeder
        from polydistill.actors.multitask_feeder import MultiTaskFeeder

        config = with_redis_password(config)
        self.feeder = (MultiTaskFeeder(config, tokenizer_dir, redis_url) if isinstance(tokenizer_dir, dict)
                       else Feeder(config, tokenizer_dir, redis_url))
        self.stop = StopFlag(redis_url, config)
        self.enqueued = metrics.Counter(
            "polydistill_batches_enqueued", "Work batches put on the work stream", tag_keys=("job",)
        )
        self.enqueued.set_default_tags(_tags(config))
        self.per_language = metrics.Gauge(
            "polydistill_language_samples", "Samples per epoch of each language (after cleaning)",
            tag_keys=("job", "language"),
        )
        self.per_language.set_default_tags(_tags(config))
        # Known from the start: a feeder that Ray restarted is only asked to feed, not to plan again.
        self.samples_per_language: dict[str, int] = dict(self.feeder.plan().samples_per_language)

    def _publish_languages(self) -> None:
        # Recorded again at each feed: a gauge set only once, before the node's metrics agent
        # took this worker's first report, can be missing from the dashboard.
        for language, count in self.samples_per_language.items():
            self.per_language.set(count, tags={"language": language})

    def plan(self):
        plan = self.feeder.plan()
        self.samples_per_language = dict(plan.samples_per_language)
        self._publish_languages()
        return plan, self.feeder.label_names, self.feeder.cleaning

    def feed(self, only=None, generation: int | None = None) -> int:
        self._publish_languages()
        should_stop = self.stop if generation is None else FeedSuperseded(self.stop, generation)
        sent = self.feeder.feed(only=only, should_stop=should_stop)
        if sent:  # Ray's counters refuse 0: a feed with nothing left to send (a resume, a stop) adds nothing
            self.enqueued.inc(sent)
        self._publish_languages()
        return sent

    def cache_state(self) -> dict | None:
        return self.feeder.cache_state()

    def batches_from_cache(self) -> int:
        return self.feeder.batches_from_cache


@ray.remote
class CacheWriterActor:
    def __init__(self, config: JobConfig, root: str, key, expected_samples: int, redis_url: str):
        quiet_libraries()
        from polydistill.actors.cache_writer import CacheFiller

        config = with_redis_password(config)
        self.filler = CacheFiller(config, root, key, expected_samples, redis_url)
        self.stop = StopFlag(redis_url, config)

    def run(self) -> dict:
        return self.filler.run(self.stop)


@ray.remote
class TeacherActor:
    def __init__(self, replica_id: str, config: JobConfig, model_dir: str, redis_url: str, stage=None):
        quiet_libraries()
        from polydistill.actors.teacher import TeacherReplica

        config = with_redis_password(config)
        self.replica = TeacherReplica(replica_id, config, model_dir, redis_url, stage)
        # Leaves on the job's stop flag or on its own (the pool scaling down), after the current batch.
        self.stop = StopFlag(redis_url, config, extra_fields=(replica_stop_field(replica_id),))
        self.metrics_key = JobKeys(config.resolved_job_id, config.transport.namespace).metrics
        tags = {**_tags(config), "replica": replica_id}
        self.samples = metrics.Counter(
            "polydistill_teacher_samples", "Samples a teacher replica has labelled", tag_keys=("job", "replica")
        )
        self.batch_seconds = metrics.Histogram(
            "polydistill_teacher_batch_seconds", "Busy seconds per teacher batch (mean over each report)",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0], tag_keys=("job", "replica"),
        )
        self.rate = metrics.Gauge("polydistill_teacher_samples_per_s", "Teacher samples per busy second",
                                  tag_keys=("job", "replica"))
        for metric in (self.samples, self.batch_seconds, self.rate):
            metric.set_default_tags(tags)

    def serve(self) -> dict:
        # Loaded and serving: the pool counts the replica as started (scale-up latency, `status`).
        self.stop.client.hset(self.metrics_key, teacher_metric_field(self.replica.replica_id, TEACHER_STARTED), time.time())
        reported = 0
        batches, busy = 0, 0.0

        def should_stop() -> bool:
            nonlocal reported, batches, busy
            replica = self.replica
            if replica.samples_done != reported:
                self.samples.inc(replica.samples_done - reported)
                reported = replica.samples_done
            if replica.batches_done > batches:
                per_batch = (replica.busy_seconds - busy) / (replica.batches_done - batches)
                for _ in range(replica.batches_done - batches):
                    self.batch_seconds.observe(max(per_batch, 0.0))
                batches, busy = replica.batches_done, replica.busy_seconds
                if busy > 0:
                    self.rate.set(replica.samples_done / busy)
            return self.stop()

        return self.replica.serve(should_stop)


@ray.remote(max_concurrency=2)  # missing() answers the driver while train() loops
class StudentActor:
    def __init__(self, config: JobConfig, student_init_dir: str, batches_per_epoch: int, redis_url: str,
                 student_dir: str, name: str = "student", checkpoint_dir: str | None = None,
                 rank: int = 0, rendezvous: str | None = None):
        quiet_libraries()
        from polydistill.student.data_parallel import free_rendezvous
        from polydistill.student.trainer import StudentTrainer

        # A data-parallel student: rank 0 (the actor the driver knows) starts the other workers as
        # actors it owns, so that they share its fate (student/data_parallel.py).
        workers = config.student.workers
        self.workers: list = []
        if workers > 1 and rank == 0:
            rendezvous = free_rendezvous(ray.util.get_node_ip_address())
            options = {"num_cpus": config.student.num_cpus, "num_gpus": config.student.num_gpus,
                       "resources": dict(config.student.resources), "max_restarts": 0}
            self.workers = [
                StudentActor.options(**options).remote(config, student_init_dir, batches_per_epoch, redis_url,
                                                       student_dir, name, checkpoint_dir, worker, rendezvous)
                for worker in range(1, workers)
            ]
        self.rank = rank

        config = with_redis_password(config)  # after starting the workers: they read it themselves
        keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.client = connect_job(redis_url, config.transport)
        self.progress_key = keys.progress
        self.name = name
        self.started = time.monotonic()
        # Tagged by student as well: extra students (extra_students) report beside the main one.
        self.loss = metrics.Gauge("polydistill_student_loss", "Student training loss", tag_keys=("job", "student"))
        self.rate = metrics.Gauge("polydistill_student_samples_per_s", "Student samples per second",
                                  tag_keys=("job", "student"))
        self.distilled = metrics.Gauge("polydistill_samples_distilled", "Samples distilled so far",
                                       tag_keys=("job", "student"))
        self.loss_term = metrics.Gauge("polydistill_student_loss_term", "Student loss by term (soft, hard, ...)",
                                       tag_keys=("job", "student", "term"))
        self.wire_bytes = metrics.Gauge("polydistill_wire_bytes", "Knowledge bytes the student has received",
                                        tag_keys=("job", "student"))
        for gauge in (self.loss, self.rate, self.distilled, self.loss_term, self.wire_bytes):
            gauge.set_default_tags({**_tags(config), "student": name})
        self.trainer = StudentTrainer(
            config, student_init_dir, batches_per_epoch, redis_url, student_dir, name,
            progress=self._report if rank == 0 else None, checkpoint_dir=checkpoint_dir,
            rank=rank, world_size=workers, rendezvous=rendezvous,
        )
        self.stop = StopFlag(redis_url, config)

    def _report(self, progress: dict) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = progress["samples"] / elapsed
        self.loss.set(progress["loss"])
        self.rate.set(rate)
        self.distilled.set(progress["samples"])
        self.wire_bytes.set(self.trainer.state.wire_bytes)
        latest = self.trainer.state.loss_history[-1] if self.trainer.state.loss_history else {}
        for term, value in latest.items():
            if term not in ("step", "epoch", "loss") and isinstance(value, (int, float)):
                self.loss_term.set(value, tags={"term": term})
        # For `polydistill status` and the teacher pool: samples per epoch, and the seconds the student
        # was busy (not waiting for knowledge), from which the pool reads the student's capacity.
        per_epoch = {f"samples_epoch_{epoch}": n for epoch, n in self.trainer.ledger.samples.items()}
        busy = max(elapsed - self.trainer.state.wait_seconds, 0.0)
        fields = {**progress, **per_epoch, "samples_per_s": round(rate, 2), "busy_seconds": round(busy, 3)}
        if self.name != "student":  # the main student's fields stay unprefixed: the pool sizes itself on them
            fields = {f"{self.name}.{key}": value for key, value in fields.items()}
        self.client.hset(self.progress_key, mapping=fields)

    def train(self) -> dict:
        self.started = time.monotonic()
        others = [worker.train.remote() for worker in self.workers]
        if not others:
            return self.trainer.train(self.stop)
        try:
            summary = self.trainer.train(self.stop)
            per_worker = ray.get(others)
        except Exception:
            # A worker died or a collective broke: end this process, so that the driver sees a lost
            # student and restarts the whole group from the last checkpoint.
            logging.getLogger(__name__).exception("data-parallel student %s failed; exiting", self.name)
            os._exit(1)
        # Which worker read how much: the proof that the work was shared.
        summary["data_parallel"]["samples_read_by_worker"] = [
            worker["data_parallel"]["samples_read"] for worker in [summary, *per_worker]]
        return summary

    def missing(self) -> list[tuple[int, int]]:
        """(epoch, batch) pairs the student has not applied (after a restart: not in its checkpoint)."""
        return self.trainer.missing()
