"""The cache writer: a reader of the knowledge stream beside the students, with its own consumer
group, that keeps every sample's knowledge on disk (``storage.knowledge_cache``) and seals the
cache once every training sample is in it. Which samples those are, and from which input ids, it
reads from the plan the feeder wrote beside the cache: knowledge of any other sample, or computed
from other input ids, is refused and counted (``records_rejected``), never kept. From then on the
feeder serves batches from the cache and the teachers have nothing left to do.

Killed mid-run, the writer is started again by Ray: its consumer ("writer") first reads the entries the
dead one had read but not acknowledged, then new ones. What the dead one had written is not carried
over (a fresh partial folder starts empty): the cache is sealed in this job only if every sample's
knowledge still passes by (a later epoch), otherwise a later job fills it.

It acknowledges with ``ack_and_trim``, so the stream keeps an entry until the students have read
it too. Once sealed it reads no more and removes its group (again, should a recovery recreate it)
so that it never holds back the trimming of entries the students still need.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from polydistill.cluster.config import JobConfig
from polydistill.storage import wire
from polydistill.storage.keys import CACHE_WRITER_GROUP, JobKeys
from polydistill.storage.knowledge_cache import CacheKey, CachePlan, CacheWriter, plan_path
from polydistill.storage.streams import GroupMissing, JobStreams, connect_job

log = logging.getLogger(__name__)

WRITER_CONSUMER = "writer"  # the one consumer of the cache writer's group, the same name after a restart


class CacheFiller:
    """Plain class; ``CacheWriterActor`` (actors/shells.py) runs it under Ray."""

    def __init__(self, config: JobConfig, root: str, key: CacheKey, expected_samples: int, redis_url: str):
        self.config = config
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.streams = JobStreams.of_job(connect_job(redis_url, config.transport), self.keys, config.transport)
        plan = CachePlan.load(plan_path(Path(root), key))
        if len(plan) != expected_samples:
            raise ValueError(f"the knowledge cache plan {plan_path(Path(root), key)} holds {len(plan)} samples, but "
                             f"an epoch has {expected_samples}: the cache keeps each training sample once, and an "
                             "epoch must hold each of them once")
        self.writer = CacheWriter(Path(root), key, plan)
        self.sealed_at: str | None = None
        self.seconds_writing = 0.0

    def run(self, should_stop: Callable[[], bool]) -> dict:
        stream = self.keys.knowledge_stream
        # Entries a writer of this group read but did not acknowledge (it died): they stay pending under the
        # consumer's name and would hold back the stream's trimming for good; read them first.
        unacknowledged = True
        while not should_stop():
            if self.sealed_at is not None:
                self._leave_group()
                time.sleep(0.5)
                continue
            try:
                entries = (self.streams.read_pending(stream, CACHE_WRITER_GROUP, WRITER_CONSUMER, count=8)
                           if unacknowledged else [])
                unacknowledged = bool(entries)
                if not entries:
                    entries = self.streams.read(stream, CACHE_WRITER_GROUP, WRITER_CONSUMER, count=8,
                                                block_ms=self.config.transport.block_ms)
            except GroupMissing:  # Redis lost its data; the driver recreates the group
                time.sleep(0.2)
                continue
            started = time.perf_counter()
            for entry_id, payload in entries:
                try:
                    knowledge = wire.decode(payload)
                except wire.WireError:
                    knowledge = None  # the students dead-letter it; nothing to keep
                if isinstance(knowledge, wire.Knowledge) and knowledge.work.job_id == self.keys.job_id:
                    self.writer.add(knowledge)
                self.streams.ack_and_trim(stream, CACHE_WRITER_GROUP, [entry_id])
            self.seconds_writing += time.perf_counter() - started
            if self.writer.complete:
                self.sealed_at = str(self.writer.seal())
                log.info("knowledge cache sealed: %s (%d samples)", self.sealed_at, len(self.writer.index))
                self._leave_group()
        if self.sealed_at is None:
            self.writer.abandon()  # the job ended first (stopped, failed): a partial cache is never read
        return self.summary()

    def _leave_group(self) -> None:
        stream = self.keys.knowledge_stream
        if self.streams.has_group(stream, CACHE_WRITER_GROUP):
            self.streams.client.xgroup_destroy(stream, CACHE_WRITER_GROUP)
            self.streams.trim_consumed(stream)

    def summary(self) -> dict:
        return {"sealed": self.sealed_at is not None, "path": self.sealed_at,
                "samples_written": len(self.writer.index), "records_rejected": self.writer.rejected,
                "bytes_written": self.writer.bytes_written, "seconds_writing": round(self.seconds_writing, 3)}
