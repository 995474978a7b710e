"""How a student's optimiser steps come about: who steps on what, and how gradients are combined.

The training loop (``student/trainer.py``) is the same for every student: fetch → agree → forward →
loss → step → done → log → checkpoint. A step strategy fills in the parts that depend on how many
workers train the student: ``SingleWorker`` here, ``DataParallel`` in ``student/data_parallel.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from torch import nn

from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import Entry, GroupMissing
from polydistill.student.consumer import KnowledgeConsumer, Round, StallError
from polydistill.student.prefetch import Prefetcher


class StepStrategy(Protocol):
    # Whether this worker logs, checkpoints and saves the student (the only worker, or rank 0).
    leads: bool
    # Told to stop (and, with several workers, every worker agreed to).
    stopped: bool

    def fetch(self, should_stop: Callable[[], bool]) -> list[tuple[str | None, bytes | None]]:
        """The messages this worker handles next; (None, None) where a round runs without one."""

    def agree(self, entry_id: str | None, payload: bytes | None) -> Round:
        """Who learns what from one fetched message: the round's batches, duplicates and entries."""

    def combine_gradients(self, parameters: list[nn.Parameter]) -> int:
        """Makes this worker's gradients those of the whole step; returns how many batches it applies."""

    def wire_samples(self, ledger: EpochLedger) -> int:
        """The samples whose bytes this worker counted (for bytes per sample)."""

    def summary(self, optimizer_steps: int) -> dict:
        """What the end-of-training summary adds for this strategy."""

    def close(self) -> None:
        """Releases what the strategy runs beside the loop (a reading thread); called when training ends."""


class SingleWorker:
    """One worker: every new batch it reads is one optimiser step on its own gradients. With ``prefetch``
    > 0 the next messages are read and decoded ahead in a thread (``student/prefetch.py``)."""

    leads = True

    def __init__(self, consumer: KnowledgeConsumer, stall_timeout_s: float, prefetch: int = 0):
        self.consumer = consumer
        self.stall_timeout_s = stall_timeout_s
        self.prefetcher = Prefetcher(consumer, prefetch) if prefetch > 0 else None
        self.stopped = False
        self._last_message: float | None = None  # the stall clock starts with the first fetch

    def fetch(self, should_stop: Callable[[], bool]) -> list[Entry]:
        if should_stop():
            self.stopped = True
            self.close()
            return []
        try:
            entries = self.consumer.read() if self.prefetcher is None else self.prefetcher.next()
        except GroupMissing as exc:
            self.stopped = not self.consumer.wait_for_group(exc, should_stop)
            return []
        if entries or self._last_message is None:
            self._last_message = time.monotonic()
        elif time.monotonic() - self._last_message > self.stall_timeout_s:
            raise StallError(
                f"no knowledge for {self.stall_timeout_s:.0f} s with {len(self.consumer.missing())} batches still "
                "missing: are the teacher replicas running? (raise training.stall_timeout_s if teachers are just "
                "slow to start)"
            )
        return entries

    def agree(self, entry_id: str, payload: bytes) -> Round:
        decoded = None if self.prefetcher is None else self.prefetcher.take_decoded(entry_id)
        learn = self.consumer.receive(entry_id, payload, decoded)
        return Round() if learn is None else Round.of(learn)

    def close(self) -> None:
        """Stops reading ahead; what was read ahead and not handled stays pending for this consumer."""
        if self.prefetcher is not None:
            self.prefetcher.stop()

    def combine_gradients(self, parameters: list[nn.Parameter]) -> int:
        return 1

    def wire_samples(self, ledger: EpochLedger) -> int:
        return ledger.samples_applied

    def summary(self, optimizer_steps: int) -> dict:
        return {}

