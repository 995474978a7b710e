"""A teacher replica: reads work batches, runs the teacher, publishes knowledge.

Publishing the knowledge and acknowledging the work happen in one Redis transaction, so a
replica killed at any point leaves its batch either done or still pending (and reclaimable by
another replica), never lost and never half-published. Every replica reclaims, on a timer, the
batches other replicas left pending for ``transport.reclaim_idle_ms``; one handed out more than
``transport.max_deliveries`` times is dead-lettered instead of killing replica after replica.
If Redis comes back empty, the replica waits for the driver to recreate the work stream.

One bad message never ends the job: a batch that does not decode, or asks what the teacher cannot
give (token ids past its vocabulary, rows longer than its positions), is dead-lettered at once with
the reason; one whose computation raises is tried again in place (XCLAIM counts each try as a
delivery) and dead-lettered when it raised the same error on ``transport.max_deliveries`` deliveries
(``storage/delivery.py``, ``after_failure``). While a batch computes, the replica renews its claim on
it every ``reclaim_idle_ms / 3``, so a batch that is slow, not abandoned, is never reclaimed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import redis
import torch
from transformers import PreTrainedModel

from polydistill.cluster.config import JobConfig, TeacherStage
from polydistill.storage import wire
from polydistill.storage.chunking import knowledge_messages
from polydistill.storage.keys import TEACHER_GROUP, JobKeys, teacher_metric_field
from polydistill.storage.delivery import DeadLetter, Retry, WorkerFault, after_failure, split_over_delivered
from polydistill.storage.message_checks import ModelLimits, check_token_ids
from polydistill.storage.streams import GroupMissing, JobStreams, connect_job
from polydistill.student.build import model_class
from polydistill.student.contract import KnowledgeRequest, teacher_contract
from polydistill.student.precision import use_bf16
from polydistill.student.task_kinds import task_kind

log = logging.getLogger(__name__)


class WorkerFailing(RuntimeError):
    """This replica fails on messages for reasons none of them explains: the pool replaces it."""


def batch_of(payload: bytes) -> tuple[int, int, int] | None:
    """(epoch, batch id, samples) of the batch a payload carries, when it decodes; for a dead letter."""
    try:
        message = wire.decode(payload)
    except wire.WireError:
        return None
    work = message if isinstance(message, wire.WorkBatch) else message.work
    return work.epoch, work.batch_id, work.n_samples

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.inference_mode()
def teacher_vote(
    model: PreTrainedModel, work: wire.WorkBatch, stage: TeacherStage, *, autocast_bf16: bool = False
) -> tuple[wire.TeacherVote, int, float]:
    """One teacher's class logits over the rows of the languages routed to it (the others stay zero
    and unserved): the teacher runs on those rows only. Returns the vote, rows served and seconds."""
    started = time.perf_counter()
    rows = [i for i, language in enumerate(work.languages) if stage.serves(language)]
    logits = np.zeros((work.n_samples, model.config.num_labels), dtype=np.float32)
    served = np.zeros(work.n_samples, dtype=np.uint8)
    if rows:
        device = next(model.parameters()).device
        mask = work.attention_mask[rows]
        width = int(mask.sum(1).max())  # routed rows may be shorter than the batch's longest
        input_ids = torch.from_numpy(work.input_ids[rows, :width].astype(np.int64)).to(device)
        attention_mask = torch.from_numpy(mask[:, :width].astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            output = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits[rows] = output.float().cpu().numpy()
        served[rows] = 1
    vote = wire.TeacherVote(teacher=stage.name, logits=logits, served=served)
    return vote, len(rows), time.perf_counter() - started


class TeacherReplica:
    """Plain class; ``TeacherActor`` (actors/shells.py) runs it under Ray."""

    def __init__(self, replica_id: str, config: JobConfig, model_dir: str, redis_url: str,
                 stage: TeacherStage | None = None):
        self.replica_id = replica_id
        self.config = config
        # Which teacher of the job this replica runs, and where it sits in the line of teachers.
        self.stage = stage if stage is not None else config.teacher_stage()
        section = config.teacher  # the pool passes the job as this teacher sees it (for_teacher / for_task)
        torch.set_num_threads(section.threads)
        self.device = torch.device("cuda" if section.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        dtype = _DTYPES[section.inference_dtype] if self.device.type == "cuda" else torch.float32
        # The knowledge contract, resolved here exactly as the students resolve it: what to ship per batch.
        # Features come from the first teacher only; the teachers after it add soft labels.
        self.request = teacher_contract(config, model_dir) if self.stage.index == 0 else KnowledgeRequest(soft=True)
        # Attention maps need the eager implementation (SDPA never materialises them); otherwise keep the fast one.
        attention = "eager" if self.request.needs_attentions else None
        self.model = model_class(config.task).from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention
        ).to(self.device).eval()
        # On a CPU, bfloat16 inference runs under autocast over float32 weights: the matmuls use
        # the CPU's BF16 instructions while layer norms and softmax stay in float32.
        self.autocast_bf16 = self.device.type == "cpu" and use_bf16(
            section.inference_dtype == "bfloat16", "cpu", "teacher.inference_dtype")
        self.kind = task_kind(config.task)  # what this task's teacher computes on a batch
        self.limits = ModelLimits.of(self.model.config)  # what a work batch may ask of this teacher
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.source, self.sink = self.keys.stage_streams(self.stage.index, self.stage.count, self.stage.task)
        self.streams = JobStreams.of_job(connect_job(redis_url, config.transport), self.keys, config.transport)
        self.batches_done = 0
        self.samples_done = 0
        self.busy_seconds = 0.0
        self.reclaimed = 0  # batches taken over from replicas that died holding them
        self.messages_published = 0  # more than batches_done when batches travel in chunks

    def compute(self, work: wire.WorkBatch) -> wire.Knowledge:
        return self.kind.teacher_knowledge(self.model, work, self.config, self.request, teacher_id=self.replica_id,
                                           autocast_bf16=self.autocast_bf16)

    def add_knowledge(self, message: wire.WorkBatch | wire.Knowledge) -> tuple[wire.Knowledge, int, float]:
        """This teacher's knowledge of a batch: of a work batch (the first teacher), or added to the
        knowledge of the teachers before it; how many samples it labelled, and its own seconds."""
        if not self.stage.ensemble:
            knowledge = self.compute(message)
            return knowledge, message.n_samples, knowledge.teacher_seconds
        if self.stage.index == 0:
            if self.request.needs_hidden_states or self.request.needs_attentions:
                # Features need a pass over every row anyway (this teacher then serves every language).
                knowledge = self.compute(message)
                vote = wire.TeacherVote(self.stage.name, knowledge.soft.logits,
                                        np.ones(message.n_samples, dtype=np.uint8))
                knowledge = dataclasses.replace(knowledge, soft=None, ensemble=(vote,))
                return knowledge, message.n_samples, knowledge.teacher_seconds
            vote, served, seconds = teacher_vote(self.model, message, self.stage, autocast_bf16=self.autocast_bf16)
            return wire.Knowledge(work=message, teacher_id=self.replica_id, ensemble=(vote,),
                                  teacher_seconds=seconds), served, seconds
        vote, served, seconds = teacher_vote(self.model, message.work, self.stage, autocast_bf16=self.autocast_bf16)
        # A batch fed again after a recovery starts from the first teacher, so it never holds this vote
        # already; replacing rather than appending keeps a message valid even so.
        votes = tuple(v for v in message.ensemble if v.teacher != self.stage.name) + (vote,)
        knowledge = dataclasses.replace(message, ensemble=votes, teacher_seconds=message.teacher_seconds + seconds)
        return knowledge, served, seconds

    def encode(self, knowledge: wire.Knowledge) -> list[bytes]:
        """The batch's knowledge as one message, or as chunks that each fit the message limit
        (``distill.knowledge_message_bytes``, else the wire's): ``storage/chunking.py``.

        With several teachers in line only the last one splits: the streams between them carry
        whole batches, since a later teacher adds its vote to the batch and a chunk of a chunk
        could not be gathered again."""
        if self.stage.index + 1 < self.stage.count:
            return [wire.encode(knowledge, self.config.distill.wire_codec)]
        return knowledge_messages(knowledge, self.config.distill.knowledge_message_bytes or wire.MAX_MESSAGE_BYTES,
                                  self.config.distill.wire_codec)

    def serve(self, should_stop: Callable[[], bool]) -> dict:
        """Processes work until told to stop; returns this replica's counters."""
        transport = self.config.transport
        stream, group = self.source, TEACHER_GROUP
        # Work this consumer read before a restart is still pending under its name: finish it first.
        own_pending = True
        last_reclaim = time.monotonic()
        while not should_stop():
            # Wait for room in the knowledge stream *before* taking a batch, not after computing it: a
            # replica held up by a slow student then holds no work, so its batch never looks abandoned
            # to the others' reclaim. The stream may overshoot the limit by (replicas - 1) messages.
            if not self.streams.wait_for_room(self.sink, transport.max_knowledge_backlog,
                                              max_bytes=transport.max_knowledge_backlog_bytes,
                                              timeout_s=transport.backpressure_timeout_s, should_stop=should_stop):
                break
            try:
                if own_pending:
                    own_pending = False
                    entries = self._screen(self.streams.read_pending(stream, group, self.replica_id, count=16))
                elif time.monotonic() - last_reclaim > transport.reclaim_idle_ms / 1000:
                    # Take over batches a dead replica read but never acknowledged. On a timer, not only
                    # when idle, so that a long work stream does not leave them until the very end.
                    last_reclaim = time.monotonic()
                    entries = self._screen(self.streams.reclaim(
                        stream, group, self.replica_id, min_idle_ms=transport.reclaim_idle_ms, count=4))
                    if entries:
                        log.warning("replica %s reclaimed %d batch(es) left pending by another replica",
                                    self.replica_id, len(entries))
                    self.reclaimed += len(entries)
                else:
                    entries = self.streams.read(stream, group, self.replica_id, count=1, block_ms=transport.block_ms)
            except GroupMissing as exc:
                log.warning("%s; waiting for the driver to recreate it", exc)
                if not self.streams.wait_for_group(stream, group, timeout_s=transport.reconnect_timeout_s,
                                                   should_stop=should_stop):
                    break
                continue
            for entry_id, payload in entries:
                self._handle(entry_id, payload, should_stop)
        return self.stats()

    def _screen(self, entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Entries delivered again (own pending, reclaimed), less those over transport.max_deliveries,
        which go to the dead-letter stream with the reason."""
        if not entries:
            return entries
        stream, group = self.source, TEACHER_GROUP
        counts = self.streams.delivery_counts(stream, group, [entry_id for entry_id, _ in entries])
        keep, dead = split_over_delivered(entries, counts, self.config.transport.max_deliveries)
        for (entry_id, payload), reason in dead:
            self._dead_letter(entry_id, payload, reason)
        return keep

    def _handle(self, entry_id: bytes, payload: bytes, should_stop: Callable[[], bool]) -> None:
        """One work entry: computed and published, retried, or dead-lettered (``after_failure`` decides);
        an error that the entry cannot explain raises ``WorkerFailing``, and the pool starts a new replica."""
        transport = self.config.transport
        errors: list[str] = []
        while True:
            # Renewed while the batch computes, so that no other replica reclaims a batch that is only slow.
            with self.streams.keep_claimed(self.source, TEACHER_GROUP, self.replica_id, entry_id,
                                           transport.reclaim_idle_ms / 3000):
                try:
                    message = self._check(payload)
                    knowledge, served, seconds = self.add_knowledge(message)
                    payloads = self.encode(knowledge)
                except (redis.RedisError, GroupMissing):
                    raise  # Redis' trouble, not the message's: the streams' own retries and waits apply
                except Exception as exc:  # noqa: BLE001 - every error of one message is judged by after_failure
                    errors.append(f"{type(exc).__name__}: {exc}")
                    at_fault = isinstance(exc, wire.WireError)
                    deliveries = self.streams.delivery_counts(self.source, TEACHER_GROUP, [entry_id]).get(entry_id)
                    if deliveries is None:
                        return  # acknowledged or taken over meanwhile: no longer this replica's
                    verdict = after_failure(errors, deliveries, transport.max_deliveries, message_at_fault=at_fault)
                else:
                    self._publish(entry_id, payloads, served, seconds)
                    return
            match verdict:
                case Retry():
                    log.warning("replica %s: work entry %s raised %s (delivery %d of at most %d); trying it again",
                                self.replica_id, entry_id, errors[-1], deliveries, transport.max_deliveries)
                    payload = self.streams.claim_again(self.source, TEACHER_GROUP, self.replica_id, entry_id)
                    if payload is None:
                        return
                case DeadLetter(reason):
                    self._dead_letter(entry_id, payload, reason)
                    return
                case WorkerFault(reason):
                    raise WorkerFailing(f"teacher replica {self.replica_id}: {reason}")

    def _check(self, payload: bytes) -> wire.WorkBatch | wire.Knowledge:
        """The message in ``payload`` if this teacher can compute it; else WireError (MessageRejected)."""
        expected = wire.WorkBatch if self.stage.index == 0 else wire.Knowledge
        message = wire.decode(payload)
        if not isinstance(message, expected):
            raise wire.WireError(f"expected a {expected.__name__} message on {self.source}, "
                                 f"got {type(message).__name__}")
        work = message if isinstance(message, wire.WorkBatch) else message.work
        check_token_ids(work.input_ids, self.limits, "WorkBatch.input_ids", model="teacher")
        return message

    def _dead_letter(self, entry_id, payload: bytes, reason: str) -> None:
        log.error("dead-lettering entry %s of %s: %s", entry_id, self.source, reason)
        transaction = self.streams.client.pipeline(transaction=True)
        self.streams.dead_letter(entry_id, payload, reason, self.source, batch=batch_of(payload),
                                 pipeline=transaction)
        self.streams.ack_and_delete(self.source, TEACHER_GROUP, [entry_id], pipeline=transaction)
        transaction.execute()

    def _publish(self, entry_id, payloads: list[bytes], served: int, seconds: float) -> None:
        # The counters travel in the same transaction as the publish+ack, so the pool's throughput
        # measurements (and `polydistill status`) count each batch exactly when it is done. A batch in
        # chunks is published whole in that one transaction too: every chunk, or none.
        transaction = self.streams.client.pipeline(transaction=True)
        for payload in payloads[:-1]:
            self.streams.add(self.sink, payload, pipeline=transaction)
        self.streams.publish_and_ack(self.sink, payloads[-1], self.source, TEACHER_GROUP, entry_id,
                                     pipeline=transaction)
        self._count(transaction, served, seconds)
        transaction.execute()
        self.batches_done += 1
        self.samples_done += served
        self.busy_seconds += seconds
        self.messages_published += len(payloads)

    def _count(self, pipeline, samples: int, busy_seconds: float) -> None:
        key = self.keys.metrics
        pipeline.hincrby(key, teacher_metric_field(self.replica_id, "batches"), 1)
        pipeline.hincrby(key, teacher_metric_field(self.replica_id, "samples"), samples)
        pipeline.hincrbyfloat(key, teacher_metric_field(self.replica_id, "busy_seconds"), busy_seconds)

    def stats(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "teacher": self.stage.name,
            "batches": self.batches_done,
            "samples": self.samples_done,
            "busy_seconds": round(self.busy_seconds, 3),
            "reclaimed": self.reclaimed,
            "messages": self.messages_published,
        }
