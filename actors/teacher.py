"""A teacher replica: reads work batches, runs the teacher, publishes knowledge.

Publishing the knowledge and acknowledging the work happen in one Redis transaction, so a
replica killed at any point leaves its batch either done or still pending (and reclaimable by
another replica), never lost and never half-published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from cluster.config import JobConfig
from storage import wire
from storage.keys import TEACHER_GROUP, JobKeys
from storage.streams import JobStreams, connect

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherReplica:
    """Plain class; ``actors.shells.TeacherActor`` runs it under Ray."""

    def __init__(self, replica_id: str, config: JobConfig, model_dir: str, redis_url: str):
        self.replica_id = replica_id
        self.config = config
        torch.set_num_threads(config.teacher.threads)
        self.device = torch.device("cuda" if config.teacher.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        dtype = _DTYPES[config.teacher.inference_dtype] if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.streams = JobStreams(
            connect(redis_url, password=config.transport.password, tls_ca_file=config.transport.tls_ca_file),
            self.keys,
        )
        self.batches_done = 0
        self.samples_done = 0
        self.busy_seconds = 0.0

    @torch.inference_mode()
    def compute(self, work: wire.WorkBatch) -> wire.Knowledge:
        started = time.perf_counter()
        input_ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(self.device)
        attention_mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float().cpu().numpy()
        top_k = self.config.distill.top_k
        if top_k is not None and top_k < logits.shape[-1]:
            soft = wire.topk_soft_labels(logits, top_k)
        else:
            soft = wire.SoftLabels.full(logits)
        return wire.Knowledge(
            work=work,
            teacher_id=self.replica_id,
            soft=soft,
            hidden_states={},
            attentions={},
            embeddings=None,
            teacher_seconds=time.perf_counter() - started,
        )

    def serve(self, should_stop: Callable[[], bool]) -> dict:
        """Processes work until told to stop; returns this replica's counters."""
        transport = self.config.transport
        stream, group = self.keys.work_stream, TEACHER_GROUP
        # Work this consumer read before a restart is still pending under its name: finish it first.
        backlog = self.streams.read_pending(stream, group, self.replica_id, count=16)
        last_reclaim = time.monotonic()
        while not should_stop():
            entries = backlog or self.streams.read(stream, group, self.replica_id, count=1, block_ms=transport.block_ms)
            backlog = []
            if not entries and time.monotonic() - last_reclaim > transport.reclaim_idle_ms / 1000:
                # Idle: take over batches that a dead replica read but never acknowledged.
                entries = self.streams.reclaim(stream, group, self.replica_id, min_idle_ms=transport.reclaim_idle_ms, count=4)
                last_reclaim = time.monotonic()
            for entry_id, payload in entries:
                self._handle(entry_id, payload, should_stop)
        return self.stats()

    def _handle(self, entry_id: bytes, payload: bytes, should_stop: Callable[[], bool]) -> None:
        transport = self.config.transport
        try:
            work = wire.decode(payload)
            if not isinstance(work, wire.WorkBatch):
                raise wire.WireError(f"expected a work batch on the work stream, got {type(work).__name__}")
        except wire.WireError as exc:
            log.error("dead-lettering work entry %s: %s", entry_id, exc)
            self.streams.dead_letter(entry_id, payload, str(exc), self.keys.work_stream)
            self.streams.ack_and_delete(self.keys.work_stream, TEACHER_GROUP, [entry_id])
            return
        knowledge = self.compute(work)
        self.streams.wait_for_room(
            self.keys.knowledge_stream,
            transport.max_knowledge_backlog,
            timeout_s=transport.backpressure_timeout_s,
            should_stop=should_stop,
        )
        self.streams.publish_and_ack(
            self.keys.knowledge_stream, wire.encode(knowledge), self.keys.work_stream, TEACHER_GROUP, entry_id
        )
        self.batches_done += 1
        self.samples_done += work.n_samples
        self.busy_seconds += knowledge.teacher_seconds

    def stats(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "batches": self.batches_done,
            "samples": self.samples_done,
            "busy_seconds": round(self.busy_seconds, 3),
        }
