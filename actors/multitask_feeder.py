"""The feeder of a multi-task job (``extra_tasks``): one epoch interleaves the batches of every task.

Each task keeps its own data, tokenisation and per-epoch batch order (a ``Feeder`` per task);
this class decides the order in which the tasks' batches enter the pipeline and gives each one a
job-wide batch id, so that the student's ledger, the recovery's re-feeds and the report count
batches of all tasks in one sequence: every sample of every task exactly once per epoch. A batch
goes to its task's work stream, where that task's teacher pool reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from polydistill.actors.feeder import FeedPlan, Feeder
from polydistill.cluster.config import JobConfig
from polydistill.storage import wire
from polydistill.storage.keys import JobKeys
from polydistill.storage.streams import JobStreams, connect_job


def interleave_tasks(batches: dict[str, int], weights: dict[str, float]) -> list[tuple[str, int]]:
    """One epoch's order of (task, task's own batch index): a smooth weighted round robin, so that
    while tasks have batches left each gets a share of the next ones in proportion to its weight
    (1:2 weights give A B B A B B ...); a task that runs out leaves the rest to the others."""
    remaining, taken = dict(batches), {task: 0 for task in batches}
    credit = {task: 0.0 for task in batches}
    order: list[tuple[str, int]] = []
    while any(remaining.values()):
        active = [task for task in batches if remaining[task] > 0]
        total = sum(weights[task] for task in active)
        for task in active:
            credit[task] += weights[task]
        chosen = max(active, key=lambda task: credit[task])  # ties: the task listed first
        credit[chosen] -= total
        order.append((chosen, taken[chosen]))
        taken[chosen] += 1
        remaining[chosen] -= 1
    return order


def task_language(task: str, language: str) -> str:
    """Languages of an extra task are counted under '<task>/<language>' beside the main task's."""
    return language if task == "main" else f"{task}/{language}"


class MultiTaskFeeder:
    """Plain class; ``FeederActor`` (actors/shells.py) runs it under Ray when the job has extra tasks."""

    def __init__(self, config: JobConfig, teacher_dirs: dict[str, str], redis_url: str):
        self.config = config
        self.feeders = {task: Feeder(config.for_task(task), teacher_dirs[task], redis_url) for task in config.task_names}
        self.weights = {task: config.task_weight_of(task) for task in config.task_names}
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.streams = JobStreams.of_job(connect_job(redis_url, config.transport), self.keys, config.transport)
        main = self.feeders["main"]
        self.label_names, self.batches_from_cache = main.label_names, 0
        self.cleaning = {task: feeder.cleaning for task, feeder in self.feeders.items()}
        self.task_plans = {task: feeder.plan() for task, feeder in self.feeders.items()}

    def plan(self) -> FeedPlan:
        plans = self.task_plans
        return FeedPlan(
            epochs=self.config.training.epochs,
            batches_per_epoch=sum(plan.batches_per_epoch for plan in plans.values()),
            samples_per_epoch=sum(plan.samples_per_epoch for plan in plans.values()),
            samples_per_language={task_language(task, language): count for task, plan in plans.items()
                                  for language, count in plan.samples_per_language.items()},
        )

    def cache_state(self) -> None:
        return None  # the config refuses a knowledge cache for multi-task jobs

    def epoch_order(self) -> list[tuple[str, int]]:
        return interleave_tasks({task: plan.batches_per_epoch for task, plan in self.task_plans.items()}, self.weights)

    def work_batches(self, epoch: int, wanted: Iterable[int] | None = None) -> Iterator[wire.WorkBatch]:
        """The epoch's work batches in order (job-wide ids), or only those whose ids are ``wanted``; made
        one at a time, as they are sent."""
        wanted = None if wanted is None else set(wanted)
        rows = {task: feeder.epoch_batches(epoch) for task, feeder in self.feeders.items()}
        for batch_id, (task, index) in enumerate(self.epoch_order()):
            if wanted is None or batch_id in wanted:
                work = self.feeders[task].work_batch(epoch, batch_id, rows[task][index])
                yield dataclasses.replace(work, task=None if task == "main" else task)

    def feed(self, only=None, should_stop: Callable[[], bool] | None = None) -> int:
        """Enqueues every batch of every epoch (or only the listed (epoch, batch) pairs), each on its task's
        work stream, waiting while that stream is full; returns how many."""
        transport, sent = self.config.transport, 0
        for epoch in range(self.config.training.epochs):
            wanted = None if only is None else [batch for e, batch in only if e == epoch]
            if wanted == []:
                continue
            for work in self.work_batches(epoch, wanted):
                stream = self.keys.work_stream_of(work.task or "main")
                if should_stop is not None and should_stop():
                    return sent
                if not self.streams.wait_for_room(stream, transport.max_work_backlog,
                                                  max_bytes=transport.max_work_backlog_bytes,
                                                  timeout_s=transport.backpressure_timeout_s, should_stop=should_stop):
                    return sent
                self.streams.add(stream, wire.encode(work, self.config.distill.wire_codec))
                sent += 1
        return sent
