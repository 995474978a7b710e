"""The student's side of the knowledge stream: reading, the ledger, chunks, dead letters, done.

Redis delivers at least once, so the same batch can arrive twice (a re-fed batch, a copy left
pending by a restart) and a peer can send anything. What to do with one delivered message is
decided by ``decide``, a pure function of the message (or the error its payload raised), the
ledger and the chunks held so far; its verdicts:

- ``Learn``: a batch the ledger does not have, whole (a single message, or the last of its chunks
  reassembled): train on it, then ``done`` records it and acknowledges its entries together;
- ``Duplicate``: a batch the ledger already has, or a second copy of a chunk held: count it,
  acknowledge it (and drop any chunks held for a batch already learnt);
- ``Hold``: a chunk whose siblings are still on their way: keep it, unacknowledged, so a student
  that dies now leaves the whole batch pending (``storage/chunking.py``);
- ``Redelivered``: a chunk entry held already, delivered again from this consumer's pending list;
- ``DeadLetter``: the peer sent garbage (not msgpack, not knowledge of this job, an impossible chunk
  tag): keep it on the dead-letter stream with the reason, and acknowledge it.

Garbage is the peer's fault and never stops the student; a held chunk set that contradicts itself
can only come from a bug here, and raises ``ImpossibleState``. ``KnowledgeConsumer`` is the thin
adapter that issues the reads, acknowledgements and dead letters these verdicts call for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from polydistill.storage import wire
from polydistill.storage.chunking import chunk_tag, is_chunk, merge_chunks
from polydistill.storage.keys import JobKeys
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import Entry, GroupMissing, JobStreams

log = logging.getLogger(__name__)

# Look this often (one cheap read) at messages delivered to this consumer but not acknowledged: after
# Redis restarted from a snapshot, acks made after the snapshot are undone and come back pending.
OWN_PENDING_EVERY_S = 5.0
OWN_PENDING_COUNT = 64


class StallError(RuntimeError):
    """No knowledge arrived for too long: the teachers are gone or stuck."""


class ImpossibleState(RuntimeError):
    """The consumer's own bookkeeping contradicts itself: a bug, never something a peer sent."""


BatchKey = tuple[int, int]  # (epoch, batch id)


@dataclass(frozen=True)
class HeldBatch:
    """The chunks of one batch received so far (by 1-based index), their entries and payload bytes."""

    count: int
    chunks: Mapping[int, wire.Knowledge] = field(default_factory=dict)
    # Entries to acknowledge once the batch is learnt; they may include those of an earlier, different split.
    entry_ids: tuple = ()
    payload_bytes: int = 0

    def with_chunk(self, index: int, chunk: wire.Knowledge, entry_id, payload_bytes: int) -> "HeldBatch":
        return HeldBatch(self.count, {**self.chunks, index: chunk}, (*self.entry_ids, entry_id),
                         self.payload_bytes + payload_bytes)


HeldChunks = Mapping[BatchKey, HeldBatch]


@dataclass(frozen=True)
class Learn:
    knowledge: wire.Knowledge
    entry_ids: tuple
    payload_bytes: int


@dataclass(frozen=True)
class Duplicate:
    entry_ids: tuple


@dataclass(frozen=True)
class Hold:
    pass


@dataclass(frozen=True)
class Redelivered:
    pass


@dataclass(frozen=True)
class DeadLetter:
    reason: str


Decision = Learn | Duplicate | Hold | Redelivered | DeadLetter


def garbage(message: wire.Message | wire.WireError, job_id: str) -> str | None:
    """Why ``message`` is not knowledge this job can learn from; None when it is."""
    if isinstance(message, wire.WireError):
        return str(message)
    if not isinstance(message, wire.Knowledge) or message.work.job_id != job_id:
        return "not a knowledge message of this job"
    return None


def decide(entry_id, message: wire.Message | wire.WireError, payload_bytes: int, *, job_id: str,
           ledger: EpochLedger, held: HeldChunks) -> tuple[Decision, HeldChunks]:
    """What to do with one delivered message, and the chunks held afterwards (``held`` is left as it is)."""
    reason = garbage(message, job_id)
    if reason is not None:
        return DeadLetter(reason), held
    key = (message.work.epoch, message.work.batch_id)
    learnt = ledger.is_applied(*key)
    if not is_chunk(message):
        return (Duplicate((entry_id,)) if learnt else Learn(message, (entry_id,), payload_bytes)), held
    if learnt:  # a late chunk: drop it, and whatever is held for its batch
        rest = {other: batch for other, batch in held.items() if other != key}
        return Duplicate((entry_id, *(held[key].entry_ids if key in held else ()))), rest
    try:
        tag = chunk_tag(message)
    except wire.WireError as exc:
        return DeadLetter(str(exc)), held
    batch = held.get(key)
    if batch is not None:
        _check_held(key, batch)
    if batch is None or batch.count != tag.count:
        # Chunked differently (another message limit): gather afresh, still acknowledging the old entries.
        batch = HeldBatch(tag.count, entry_ids=batch.entry_ids if batch is not None else ())
    if entry_id in batch.entry_ids:
        return Redelivered(), {**held, key: batch}
    if tag.index in batch.chunks:
        return Duplicate((entry_id,)), {**held, key: batch}
    batch = batch.with_chunk(tag.index, message, entry_id, payload_bytes)
    if len(batch.chunks) < batch.count:
        return Hold(), {**held, key: batch}
    rest = {other: kept for other, kept in held.items() if other != key}
    whole = merge_chunks([batch.chunks[index] for index in range(1, batch.count + 1)])
    return Learn(whole, batch.entry_ids, batch.payload_bytes), rest


def _check_held(key: BatchKey, batch: HeldBatch) -> None:
    # decide() releases a batch the moment its last chunk is in, and admits only indices 1..count.
    if len(batch.chunks) >= batch.count or not all(1 <= index <= batch.count for index in batch.chunks):
        raise ImpossibleState(f"batch {key[1]} of epoch {key[0]} is held with chunks {sorted(batch.chunks)} of "
                              f"{batch.count}: a complete or impossible set is never held")


class LearntBatch(NamedTuple):
    epoch: int
    batch_id: int
    samples: int


@dataclass(frozen=True)
class Round:
    """One optimiser step's worth of bookkeeping: the batch this worker learns from (None: it has none),
    every batch the step applies (this worker's and, in a data-parallel round, its peers'), the copies the
    round refused, this worker's entries to acknowledge, and the wire bytes it counts."""

    knowledge: wire.Knowledge | None = None
    learnt: tuple[LearntBatch, ...] = ()
    duplicates: int = 0
    entry_ids: tuple = ()
    wire_bytes: int = 0
    wire_parts: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, learn: Learn) -> "Round":
        work = learn.knowledge.work
        return cls(learn.knowledge, (LearntBatch(work.epoch, work.batch_id, work.n_samples),),
                   entry_ids=learn.entry_ids, wire_bytes=learn.payload_bytes,
                   wire_parts=wire.knowledge_nbytes(learn.knowledge))


def decode(payload: bytes) -> wire.Message | wire.WireError:
    try:
        return wire.decode(payload)
    except wire.WireError as exc:
        return exc


class KnowledgeConsumer:
    """One student worker's reader of the knowledge stream, in its consumer group, with its ledger."""

    def __init__(self, streams: JobStreams, keys: JobKeys, group: str, consumer: str, ledger: EpochLedger, *,
                 shared_stream: bool, block_ms: int, reconnect_timeout_s: float):
        self.streams, self.keys, self.group, self.consumer = streams, keys, group, consumer
        self.stream = keys.knowledge_stream
        # Other groups (students, the cache writer) may read the same entries.
        self.shared_stream = shared_stream
        self.block_ms, self.reconnect_timeout_s = block_ms, reconnect_timeout_s
        self.ledger = ledger
        # The driver reads missing() from another thread while the loop records batches.
        self._ledger_lock = threading.Lock()
        self.held: HeldChunks = {}
        self._waited_s = 0.0
        self._own_pending_read = 0.0  # so the first read looks at this consumer's pending messages

    # -- reading ------------------------------------------------------------------------------
    def read(self) -> list[Entry]:
        """This consumer's unacknowledged messages (looked at every few seconds), else the next new one."""
        entries = []
        if time.monotonic() - self._own_pending_read > OWN_PENDING_EVERY_S:
            self._own_pending_read = time.monotonic()
            entries = self.streams.read_pending(self.stream, self.group, self.consumer, count=OWN_PENDING_COUNT)
        return entries or self.read_new()

    def read_new(self) -> list[Entry]:
        """The next message no consumer of the group has had, waiting up to ``transport.block_ms``."""
        started = time.perf_counter()
        entries = self.streams.read(self.stream, self.group, self.consumer, count=1, block_ms=self.block_ms)
        self._waited_s += time.perf_counter() - started
        return entries

    def take_waited_seconds(self) -> float:
        """Seconds spent waiting for new messages since the last call."""
        waited, self._waited_s = self._waited_s, 0.0
        return waited

    def wait_for_group(self, error: GroupMissing, should_stop: Callable[[], bool]) -> bool:
        """Redis lost its data: keep the ledger (in memory) and wait for the driver to recreate the
        streams and re-enqueue whatever this student has not learnt. False if told to stop."""
        log.warning("%s; waiting for the driver to recreate it", error)
        return self.streams.wait_for_group(self.stream, self.group, timeout_s=self.reconnect_timeout_s,
                                           should_stop=should_stop)

    # -- deciding -----------------------------------------------------------------------------
    def receive(self, entry_id, payload: bytes) -> Learn | None:
        """One delivered message through ``decide``: a batch to learn from is returned (``done`` follows
        the step); duplicates, held chunks and garbage are dealt with here."""
        decision, held = decide(entry_id, decode(payload), len(payload), job_id=self.keys.job_id,
                                ledger=self.ledger, held=self.held)
        self._warn_of_regathering(held)
        self.held = held
        match decision:
            case Learn():
                return decision
            case Duplicate(entry_ids):
                with self._ledger_lock:
                    self.ledger.count_duplicate()
                self.acknowledge(entry_ids)
            case DeadLetter(reason):
                self._dead_letter(entry_id, payload, reason)
        return None

    def accept(self, entry_id, payload: bytes) -> wire.Knowledge | None:
        """The knowledge in one message, for a data-parallel round, whose table decides what is a duplicate
        (and whose workers apply whole messages); None after dead-lettering garbage."""
        message = decode(payload)
        reason = garbage(message, self.keys.job_id)
        if reason is not None:
            self._dead_letter(entry_id, payload, reason)
            return None
        return message

    def _warn_of_regathering(self, held: HeldChunks) -> None:
        for (epoch, batch_id), batch in held.items():
            earlier = self.held.get((epoch, batch_id))
            if earlier is not None and earlier.count != batch.count:
                log.warning("batch %d of epoch %d arrives in %d chunks after %d: gathering it afresh",
                            batch_id, epoch, batch.count, earlier.count)

    # -- done ---------------------------------------------------------------------------------
    def done(self, round_: Round) -> None:
        """The round's batches and refused copies into the ledger, then its entries acknowledged: a student
        that dies in between gets them again, and the ledger it resumes with drops them as duplicates."""
        with self._ledger_lock:
            for batch in round_.learnt:
                self.ledger.record(batch.epoch, batch.batch_id, batch.samples)
            for _ in range(round_.duplicates):
                self.ledger.count_duplicate()
        self.acknowledge(round_.entry_ids)

    def acknowledge(self, entry_ids) -> None:
        # After a reset of the streams (Redis lost its data) the ack finds no group: a no-op.
        if not entry_ids:
            return
        if self.shared_stream:  # acknowledge ours, drop what every group has read
            self.streams.ack_and_trim(self.stream, self.group, list(entry_ids))
        else:
            self.streams.ack_and_delete(self.stream, self.group, list(entry_ids))

    def _dead_letter(self, entry_id, payload: bytes, reason: str) -> None:
        log.error("dead-lettering knowledge entry %s: %s", entry_id, reason)
        self.streams.dead_letter(entry_id, payload, reason, self.stream)
        self.acknowledge((entry_id,))

    # -- the ledger -----------------------------------------------------------------------------
    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) not learnt yet: what the driver must (re-)feed."""
        with self._ledger_lock:
            return self.ledger.missing()

    def ledger_state(self) -> dict:
        with self._ledger_lock:
            return self.ledger.to_dict()

    def restore(self, ledger: EpochLedger) -> None:
        """Continues from a checkpoint's ledger."""
        with self._ledger_lock:
            self.ledger = ledger
