"""The student's side of the knowledge stream: reading, the ledger, chunks, dead letters, done.

Redis delivers at least once, so the same batch can arrive twice (a re-fed batch, a copy left
pending by a restart) and a peer can send anything. What to do with one delivered message is
decided by ``decide``, a pure function of the message (or the error its payload raised), the
ledger, the chunks held so far (``ChunkBuffer``), the clock and the buffer's limits; its verdicts:

- ``Learn``: a batch the ledger does not have, whole (a single message, or the last of its chunks
  reassembled): train on it, then ``done`` records it and acknowledges its entries together;
- ``Duplicate``: a batch the ledger already has, or a second copy of a chunk held: count it,
  acknowledge it (and drop any chunks held for a batch already learnt);
- ``PastEnd``: a batch of an epoch the student no longer learns (it stopped early, ``EpochLedger.end_after``):
  count it and acknowledge it, with any chunks held for it;
- ``Hold``: a chunk whose siblings are still on their way: keep it, unacknowledged, so a student
  that dies now leaves the whole batch pending (``storage/chunking.py``);
- ``Redelivered``: a chunk entry held already (or given up), delivered again from this consumer's
  pending list;
- ``DeadLetter``: the peer sent garbage (not msgpack, not knowledge of this job, an impossible chunk
  tag) or a batch the student must not learn (outside the ledger's plan, token ids past the student's
  vocabulary or rows past its positions, ``StudentInputs``): keep it on the dead-letter stream with the
  reason (and the batch, when it is one of the plan's, for the driver's accounting), and acknowledge it.

The buffer is bounded. A batch whose chunks have been held ``ChunkLimits.timeout_s`` without the
rest (``give_up_stale``), or the one held longest when the chunks held take more than
``ChunkLimits.max_bytes``, is given up: its chunks leave memory, its entries stay unacknowledged
and are not held again when delivered again, and when the batch comes again (a recovery feeds what
the ledger lacks) they are acknowledged with it. A single batch larger than the buffer is a
setting to change, and raises ``ChunkBufferTooSmall``.

Garbage is the peer's fault and never stops the student; a held chunk set that contradicts itself
can only come from a bug here, and raises ``ImpossibleState``. ``KnowledgeConsumer`` is the thin
adapter that issues the reads, acknowledgements and dead letters these verdicts call for; it does
not hand on what it reads again of its own pending chunks, so that a chunk that never finds its
siblings looks like no progress to the stall check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from polydistill.cluster.config import TransportConfig
from polydistill.storage import wire
from polydistill.storage.chunking import chunk_tag, is_chunk, merge_chunks
from polydistill.storage.keys import JobKeys
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.message_checks import MessageRejected, ModelLimits, check_in_plan, check_token_ids
from polydistill.storage.streams import Entry, GroupMissing, JobStreams
from polydistill.student.contract import ContractError
from polydistill.student.token_inputs import tokens_for

log = logging.getLogger(__name__)

# Look this often (one cheap read) at messages delivered to this consumer but not acknowledged: after
# Redis restarted from a snapshot, acks made after the snapshot are undone and come back pending.
OWN_PENDING_EVERY_S = 5.0
OWN_PENDING_COUNT = 64


class StallError(RuntimeError):
    """No knowledge arrived for too long: the teachers are gone or stuck."""


class ImpossibleState(RuntimeError):
    """The consumer's own bookkeeping contradicts itself: a bug, never something a peer sent."""


class ChunkBufferTooSmall(RuntimeError):
    """One batch's chunks take more memory than the student may hold: a setting to raise."""


BatchKey = tuple[int, int]  # (epoch, batch id)


@dataclass(frozen=True)
class ChunkLimits:
    """How much a student holds of batches whose chunks are not all in: bytes, and seconds per batch."""

    max_bytes: int
    timeout_s: float

    @classmethod
    def of(cls, transport: TransportConfig) -> "ChunkLimits":
        return cls(transport.max_held_chunk_bytes, transport.held_chunk_timeout_s)


@dataclass(frozen=True)
class HeldBatch:
    """The chunks of one batch received so far (by 1-based index), their entries and payload bytes, and
    when its first chunk was held (the consumer's clock)."""

    count: int
    chunks: Mapping[int, wire.Knowledge] = field(default_factory=dict)
    # Entries to acknowledge once the batch is learnt; they may include those of an earlier, different split.
    entry_ids: tuple = ()
    payload_bytes: int = 0
    since: float = 0.0

    def with_chunk(self, index: int, chunk: wire.Knowledge, entry_id, payload_bytes: int) -> "HeldBatch":
        return HeldBatch(self.count, {**self.chunks, index: chunk}, (*self.entry_ids, entry_id),
                         self.payload_bytes + payload_bytes, self.since)


@dataclass(frozen=True)
class ChunkBuffer:
    """The chunks held, by batch, and the entries of the batches given up (left unacknowledged: not held
    again when delivered again, and acknowledged when their batch is learnt or refused as a duplicate)."""

    held: Mapping[BatchKey, HeldBatch] = field(default_factory=dict)
    given_up: Mapping[BatchKey, tuple] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        return sum(batch.payload_bytes for batch in self.held.values())

    def has_entry(self, entry_id) -> bool:
        """Whether ``entry_id`` is a chunk held, or one of a batch given up."""
        return any(entry_id in batch.entry_ids for batch in self.held.values()) or any(
            entry_id in entries for entries in self.given_up.values())

    def without(self, key: BatchKey) -> "ChunkBuffer":
        """The buffer with nothing of batch ``key`` (learnt, or refused as a duplicate)."""
        return ChunkBuffer({other: batch for other, batch in self.held.items() if other != key},
                           {other: entries for other, entries in self.given_up.items() if other != key})

    def entries_of(self, key: BatchKey) -> tuple:
        """Every entry of batch ``key`` this buffer holds or gave up: to acknowledge with the batch."""
        held = self.held.get(key)
        return (*(held.entry_ids if held is not None else ()), *self.given_up.get(key, ()))

    def past_end(self, last_epoch: int) -> tuple["ChunkBuffer", tuple]:
        """The buffer without the batches of epochs after ``last_epoch`` (the plan ended early), and their entries."""
        keys = [key for key in {**self.held, **self.given_up} if key[0] > last_epoch]
        buffer, entries = self, ()
        for key in keys:
            entries += buffer.entries_of(key)
            buffer = buffer.without(key)
        return buffer, entries

    def giving_up(self, key: BatchKey) -> "ChunkBuffer":
        batch = self.held[key]
        rest = {other: kept for other, kept in self.held.items() if other != key}
        return ChunkBuffer(rest, {**self.given_up, key: (*self.given_up.get(key, ()), *batch.entry_ids)})


@dataclass(frozen=True)
class GivenUp:
    """A batch the buffer let go: which, how many of its chunks it held, for how long, and why."""

    key: BatchKey
    chunks_held: int
    count: int
    held_s: float
    payload_bytes: int
    timed_out: bool  # else: given up to make room for newer chunks


@dataclass(frozen=True)
class Learn:
    knowledge: wire.Knowledge
    entry_ids: tuple
    payload_bytes: int


@dataclass(frozen=True)
class Duplicate:
    entry_ids: tuple


@dataclass(frozen=True)
class PastEnd:
    entry_ids: tuple


@dataclass(frozen=True)
class Hold:
    given_up: tuple[GivenUp, ...] = ()  # batches let go to make room for this chunk


@dataclass(frozen=True)
class Redelivered:
    pass


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    # (epoch, batch id, samples) of a batch of this job's plan, which the driver then counts as dead-lettered.
    batch: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class StudentInputs:
    """What a batch may ask of the student: the token ids it reads (the teacher's, or those of the tokenizer
    ``source`` names: student/token_inputs.py) within ``limits``. A trimmed vocabulary's student that reads
    the teacher's ids reads them through its table, whose length is then the vocabulary checked."""

    limits: ModelLimits
    source: str | None = None

    @classmethod
    def of(cls, model_config, *, source: str | None, id_map_size: int | None = None) -> "StudentInputs":
        limits = ModelLimits.of(model_config)
        if id_map_size is not None:
            limits = ModelLimits(id_map_size, limits.max_positions)
        return cls(limits, source)

    def check(self, work: wire.WorkBatch) -> None:
        try:
            ids, _ = tokens_for(work, self.source)
        except ContractError as error:
            raise MessageRejected(str(error)) from None
        where = "WorkBatch.input_ids" if self.source is None else f"the ids of {self.source}"
        check_token_ids(ids, self.limits, where, model="student")


Decision = Learn | Duplicate | PastEnd | Hold | Redelivered | DeadLetter


def garbage(message: wire.Message | wire.WireError, job_id: str, ledger: EpochLedger | None = None,
            inputs: StudentInputs | None = None) -> DeadLetter | None:
    """Why ``message`` is not knowledge this job can learn from, as a dead letter; None when it is.

    With a ledger, a batch outside its plan is refused; with ``inputs``, one that asks what the student
    cannot take (token ids, row length): before training, which would raise deep in torch or learn a
    batch that is not the job's."""
    if isinstance(message, wire.WireError):
        return DeadLetter(str(message))
    if not isinstance(message, wire.Knowledge) or message.work.job_id != job_id:
        return DeadLetter("not a knowledge message of this job")
    work = message.work
    try:
        if ledger is not None:
            check_in_plan(work.epoch, work.batch_id, ledger.epochs, ledger.batches_per_epoch)
        if inputs is not None:
            inputs.check(work)
    except MessageRejected as exc:
        return DeadLetter(str(exc), (work.epoch, work.batch_id, work.n_samples))
    return None


def decide(entry_id, message: wire.Message | wire.WireError, payload_bytes: int, *, job_id: str,
           ledger: EpochLedger, buffer: ChunkBuffer, now: float,
           limits: ChunkLimits, inputs: StudentInputs | None = None) -> tuple[Decision, ChunkBuffer]:
    """What to do with one delivered message, and the buffer afterwards (``buffer`` is left as it is)."""
    refused = garbage(message, job_id, ledger, inputs)
    if refused is not None:
        return refused, buffer
    key = (message.work.epoch, message.work.batch_id)
    if ledger.is_past_end(key[0]):
        return PastEnd((entry_id, *buffer.entries_of(key))), buffer.without(key)
    learnt = ledger.is_applied(*key)
    # A whole batch, or any part of one learnt already, settles every entry of the batch held or given up.
    if learnt:
        return Duplicate((entry_id, *buffer.entries_of(key))), buffer.without(key)
    if not is_chunk(message):
        return Learn(message, (entry_id, *buffer.entries_of(key)), payload_bytes), buffer.without(key)
    try:
        tag = chunk_tag(message)
    except wire.WireError as exc:
        return DeadLetter(str(exc)), buffer
    if entry_id in buffer.given_up.get(key, ()):
        return Redelivered(), buffer
    batch = buffer.held.get(key)
    if batch is not None:
        _check_held(key, batch)
    if batch is None or batch.count != tag.count:
        # Chunked differently (another message limit): gather afresh, still acknowledging the old entries.
        batch = HeldBatch(tag.count, entry_ids=batch.entry_ids if batch is not None else (), since=now)
    if entry_id in batch.entry_ids:
        return Redelivered(), _with_held(buffer, key, batch)
    if tag.index in batch.chunks:
        return Duplicate((entry_id,)), _with_held(buffer, key, batch)
    batch = batch.with_chunk(tag.index, message, entry_id, payload_bytes)
    if len(batch.chunks) < batch.count:
        return _make_room(_with_held(buffer, key, batch), key, now, limits)
    whole = merge_chunks([batch.chunks[index] for index in range(1, batch.count + 1)])
    return Learn(whole, (*batch.entry_ids, *buffer.given_up.get(key, ())), batch.payload_bytes), buffer.without(key)


def _with_held(buffer: ChunkBuffer, key: BatchKey, batch: HeldBatch) -> ChunkBuffer:
    return ChunkBuffer({**buffer.held, key: batch}, buffer.given_up)


def _make_room(buffer: ChunkBuffer, keep: BatchKey, now: float, limits: ChunkLimits) -> tuple[Hold, ChunkBuffer]:
    """Holds batch ``keep``'s new chunk, giving up the batches held longest while the buffer is over its bytes."""
    given_up = []
    while buffer.held_bytes > limits.max_bytes:
        others = [key for key in buffer.held if key != keep]
        if not others:
            batch = buffer.held[keep]
            whole = batch.payload_bytes * batch.count // len(batch.chunks)
            raise ChunkBufferTooSmall(
                f"batch {keep[1]} of epoch {keep[0]} comes in {batch.count} chunks, and the {len(batch.chunks)} held "
                f"so far take {batch.payload_bytes:,} bytes, more than transport.max_held_chunk_bytes="
                f"{limits.max_bytes:,}: raise it above a whole batch's knowledge (about {whole:,} bytes)")
        oldest = min(others, key=lambda key: buffer.held[key].since)
        given_up.append(_given_up(oldest, buffer.held[oldest], now, timed_out=False))
        buffer = buffer.giving_up(oldest)
    return Hold(tuple(given_up)), buffer


def give_up_stale(buffer: ChunkBuffer, now: float, limits: ChunkLimits) -> tuple[ChunkBuffer, tuple[GivenUp, ...]]:
    """The buffer less the batches whose chunks have been held ``limits.timeout_s`` or longer, and those."""
    stale = [key for key, batch in buffer.held.items() if now - batch.since >= limits.timeout_s]
    given_up = tuple(_given_up(key, buffer.held[key], now, timed_out=True) for key in stale)
    for key in stale:
        buffer = buffer.giving_up(key)
    return buffer, given_up


def _given_up(key: BatchKey, batch: HeldBatch, now: float, *, timed_out: bool) -> GivenUp:
    return GivenUp(key, len(batch.chunks), batch.count, now - batch.since, batch.payload_bytes, timed_out)


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
                 shared_stream: bool, block_ms: int, reconnect_timeout_s: float,
                 chunk_limits: ChunkLimits | None = None, inputs: StudentInputs | None = None):
        """``chunk_limits``: the buffer's (``ChunkLimits.of(config.transport)``); None: the config's defaults.
        ``inputs``: what a batch may ask of the student (None: not checked)."""
        self.streams, self.keys, self.group, self.consumer = streams, keys, group, consumer
        self.stream = keys.knowledge_stream
        # Other groups (students, the cache writer) may read the same entries.
        self.shared_stream = shared_stream
        self.block_ms, self.reconnect_timeout_s = block_ms, reconnect_timeout_s
        self.ledger = ledger
        # The driver reads missing() from another thread while the loop records batches.
        self._ledger_lock = threading.Lock()
        self.buffer = ChunkBuffer()
        self.chunk_limits = chunk_limits or ChunkLimits.of(TransportConfig())
        self.inputs = inputs
        self.batches_given_up = 0
        self.defer_acks: Callable[[tuple], None] | None = None
        self._waited_s = 0.0
        self._own_pending_read = 0.0  # so the first read looks at this consumer's pending messages

    # -- reading ------------------------------------------------------------------------------
    def read(self) -> list[Entry]:
        """This consumer's unacknowledged messages (looked at every few seconds), else the next new one."""
        self.expire_held()
        return self.read_own_pending() or self.read_new()

    def expire_held(self) -> None:
        """Gives up held chunks that waited too long or take too much room (``give_up_stale``)."""
        self.buffer, given_up = give_up_stale(self.buffer, time.monotonic(), self.chunk_limits)
        self._report(given_up)

    def read_own_pending(self) -> list[Entry]:
        """This consumer's unacknowledged messages, every ``OWN_PENDING_EVERY_S`` (else none). The chunks it
        holds or gave up are left out: they would tell ``decide`` nothing new, and must not be taken for
        progress."""
        if time.monotonic() - self._own_pending_read <= OWN_PENDING_EVERY_S:
            return []
        self._own_pending_read = time.monotonic()
        return [(entry_id, payload) for entry_id, payload in
                self.streams.read_pending(self.stream, self.group, self.consumer, count=OWN_PENDING_COUNT)
                if not self.buffer.has_entry(entry_id)]

    def read_new(self, *, counts_as_waiting: bool = True) -> list[Entry]:
        """The next message no consumer of the group has had, waiting up to ``transport.block_ms``.
        ``counts_as_waiting``: the time spent counts as the student's waiting (not when read ahead)."""
        started = time.perf_counter()
        entries = self.streams.read(self.stream, self.group, self.consumer, count=1, block_ms=self.block_ms)
        if counts_as_waiting:
            self.count_waiting(time.perf_counter() - started)
        return entries

    def count_waiting(self, seconds: float) -> None:
        self._waited_s += seconds

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
    def receive(self, entry_id, payload: bytes, message: wire.Message | wire.WireError | None = None) -> Learn | None:
        """One delivered message through ``decide``: a batch to learn from is returned (``done`` follows
        the step); duplicates, held chunks and garbage are dealt with here. ``message``: the payload
        decoded already (read ahead), else it is decoded here."""
        if message is None:
            message = decode(payload)
        decision, buffer = decide(entry_id, message, len(payload), job_id=self.keys.job_id,
                                  ledger=self.ledger, buffer=self.buffer, now=time.monotonic(),
                                  limits=self.chunk_limits, inputs=self.inputs)
        self._warn_of_regathering(buffer)
        self.buffer = buffer
        match decision:
            case Learn():
                return decision
            case Hold(given_up):
                self._report(given_up)
            case Duplicate(entry_ids):
                with self._ledger_lock:
                    self.ledger.count_duplicate()
                self.acknowledge(entry_ids)
            case PastEnd(entry_ids):
                with self._ledger_lock:
                    self.ledger.count_past_end()
                self.acknowledge(entry_ids)
            case DeadLetter(reason, batch):
                self._dead_letter(entry_id, payload, reason, batch)
        return None

    def accept(self, entry_id, payload: bytes) -> wire.Knowledge | None:
        """The knowledge in one message, for a data-parallel round, whose table decides what is a duplicate
        (and whose workers apply whole messages); None after dead-lettering garbage."""
        message = decode(payload)
        refused = garbage(message, self.keys.job_id, self.ledger, self.inputs)
        if refused is not None:
            self._dead_letter(entry_id, payload, refused.reason, refused.batch)
            return None
        return message

    def _warn_of_regathering(self, buffer: ChunkBuffer) -> None:
        for (epoch, batch_id), batch in buffer.held.items():
            earlier = self.buffer.held.get((epoch, batch_id))
            if earlier is not None and earlier.count != batch.count:
                log.warning("batch %d of epoch %d arrives in %d chunks after %d: gathering it afresh",
                            batch_id, epoch, batch.count, earlier.count)

    def _report(self, given_up: tuple[GivenUp, ...]) -> None:
        limits = self.chunk_limits
        for batch in given_up:
            self.batches_given_up += 1
            why = (f"held {batch.held_s:.0f} s without the rest (transport.held_chunk_timeout_s={limits.timeout_s:g})"
                   if batch.timed_out else f"given up to make room: the chunks held took more than "
                   f"transport.max_held_chunk_bytes={limits.max_bytes:,} bytes")
            log.warning("student %s: gave up batch %d of epoch %d, %d of its %d chunks (%d bytes) %s; their entries "
                        "stay unacknowledged, and the batch is learnt when it is fed again", self.group,
                        batch.key[1], batch.key[0], batch.chunks_held, batch.count, batch.payload_bytes, why)

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
        """Acknowledges (and deletes) the entries, or hands them to ``defer_acks`` when a reading thread sends
        acknowledgements with its reads (``student/prefetch.py``): later is safe, since the ledger, not Redis'
        acknowledgements, says what was learnt."""
        if self.defer_acks is not None and entry_ids:
            self.defer_acks(tuple(entry_ids))
            return
        self.acknowledge_now(entry_ids)

    def acknowledge_now(self, entry_ids) -> None:
        # After a reset of the streams (Redis lost its data) the ack finds no group: a no-op.
        if not entry_ids:
            return
        if self.shared_stream:  # acknowledge ours, drop what every group has read
            self.streams.ack_and_trim(self.stream, self.group, list(entry_ids))
        else:
            self.streams.ack_and_delete(self.stream, self.group, list(entry_ids))

    def _dead_letter(self, entry_id, payload: bytes, reason: str, batch: tuple[int, int, int] | None = None) -> None:
        log.error("dead-lettering knowledge entry %s: %s", entry_id, reason)
        self.streams.dead_letter(entry_id, payload, reason, self.stream, batch=batch)
        self.acknowledge((entry_id,))

    # -- the ledger -----------------------------------------------------------------------------
    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) not learnt yet: what the driver must (re-)feed."""
        with self._ledger_lock:
            return self.ledger.missing()

    def end_after(self, epoch: int) -> int:
        """Early stopping: the plan ends with ``epoch`` (``EpochLedger.end_after``); chunks held of later epochs
        are acknowledged and let go (counted past the end). Returns the last epoch kept."""
        with self._ledger_lock:
            last = self.ledger.end_after(epoch)
            self.buffer, entries = self.buffer.past_end(last)
            if entries:
                self.ledger.count_past_end()
        self.acknowledge(entries)
        return last

    def ledger_state(self) -> dict:
        with self._ledger_lock:
            return self.ledger.to_dict()

    def restore(self, ledger: EpochLedger) -> None:
        """Continues from a checkpoint's ledger."""
        with self._ledger_lock:
            self.ledger = ledger
