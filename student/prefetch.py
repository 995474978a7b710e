"""Reading ahead: the next knowledge messages fetched and decoded while the student steps.

Without it a student's loop reads a message, decodes it, then steps: the Redis round trip and the
decode add to every step, however fast the teachers are. ``Prefetcher`` runs ``XREADGROUP`` and
``wire.decode`` in a thread of its own, up to ``transport.prefetch`` messages ahead, so the loop
finds the next batch decoded when its step ends (socket reads and numpy release the GIL).

What stays in the loop's thread: deciding what a message is (``student/consumer.py``), the chunk
buffer and the ledger; the thread only reads which entries the buffer holds (an immutable value the
loop replaces). A message read ahead is
pending under this consumer like one read in the loop: a student killed with messages in the queue
leaves them pending, delivered again as today. The loop's acknowledgements are sent by the thread
too, all those of a step in one call before its next read: acknowledging later than the step is
safe (a student killed in between gets the batch again, and its ledger drops it), and the loop then
never waits on Redis at all. Stopping sends what is left.

The thread is the consumer's only reader, of its own pending entries too, and it never hands the
loop an entry twice: it skips pending entries it has read before. The loop finishes an entry in its
own time (a chunk may wait, held, for its batch's last one; a batch is acknowledged after its step),
so "pending" says nothing about whether the loop has seen it; "read before by this process" does. The
pending entries it hands on are those a previous run of this consumer left unacknowledged.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from polydistill.storage import wire
from polydistill.storage.streams import Entry
from polydistill.student.consumer import KnowledgeConsumer, decode

_PUT_EVERY_S = 0.1


class Prefetcher:
    """A thread that keeps up to ``depth`` decoded messages of one consumer ready for its loop."""

    def __init__(self, consumer: KnowledgeConsumer, depth: int):
        if depth < 1:
            raise ValueError(f"a prefetch depth must be at least 1, got {depth}")
        self.consumer, self.depth = consumer, depth
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._read_before: set = set()  # the reading thread's own
        self._acks: queue.SimpleQueue = queue.SimpleQueue()  # entry ids the loop has finished with
        consumer.defer_acks = self._acknowledge
        self._decoded: dict[Any, wire.Message | wire.WireError] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop's side ----------------------------------------------------------------------
    def next(self) -> list[Entry]:
        """The next message read ahead, waiting up to ``transport.block_ms`` for one. Raises what stopped the
        reading thread (Redis lost the group, or is gone for longer than the consumer retries)."""
        self.consumer.expire_held()
        if self._thread is None:
            self._start()
        started = time.perf_counter()
        try:
            item = self._ready.get(timeout=self.consumer.block_ms / 1000)
        except queue.Empty:
            return []
        finally:
            self.consumer.count_waiting(time.perf_counter() - started)
        if isinstance(item, BaseException):
            # The thread ended with this; the next call starts a fresh one, once the caller has dealt with it.
            self._thread.join()
            self._thread = None
            raise item
        entry_id, payload, message = item
        self._decoded[entry_id] = message
        return [(entry_id, payload)]

    def _acknowledge(self, entry_ids: tuple) -> None:
        """The loop's acknowledgements: sent by the reading thread while it runs, else at once (a caller that
        hands the loop messages itself, or a loop between a thread's error and the next one)."""
        if self._thread is not None and self._thread.is_alive():
            self._acks.put(entry_ids)
        else:
            self.consumer.acknowledge_now(entry_ids)

    def take_decoded(self, entry_id) -> wire.Message | wire.WireError | None:
        """The decoded message of an entry ``next`` returned (None for one it did not read ahead)."""
        return self._decoded.pop(entry_id, None)

    def stop(self) -> None:
        """Stops the thread and sends the acknowledgements it had not sent yet."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.consumer.block_ms / 1000 + 5)
        self._thread = None
        self._send_acks()

    # -- the reading thread ---------------------------------------------------------------------
    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._read_ahead, name=f"prefetch-{self.consumer.consumer}",
                                        daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        try:
            while not self._stop.is_set():
                self._send_acks()
                entries = ([entry for entry in self.consumer.read_own_pending() if entry[0] not in self._read_before]
                           or self.consumer.read_new(counts_as_waiting=False))
                self._read_before.update(entry_id for entry_id, _ in entries)
                for entry_id, payload in entries:
                    message = decode(payload)
                    if isinstance(message, wire.Knowledge):
                        wire.knowledge_nbytes(message)  # counted here, looked up by the loop
                    self._put((entry_id, payload, message))
        except BaseException as exc:  # Redis lost its data or is gone: the loop handles it as without prefetch
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_PUT_EVERY_S)
                return
            except queue.Full:
                self._send_acks()  # the loop is stepping: acknowledge what it finished meanwhile

    def _send_acks(self) -> None:
        entry_ids: list = []
        while True:
            try:
                entry_ids.extend(self._acks.get_nowait())
            except queue.Empty:
                break
        try:
            self.consumer.acknowledge_now(entry_ids)
        except BaseException:
            self._acks.put(tuple(entry_ids))  # sent again by the next thread, or by stop()
            raise
        # An acknowledged entry never comes back as pending: no need to remember having read it.
        self._read_before.difference_update(entry_ids)
