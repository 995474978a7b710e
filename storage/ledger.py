"""Which batches the student has applied: exactly-once bookkeeping with no I/O.

Redis delivers at least once (a reclaimed or re-enqueued batch can arrive twice), so the
student decides from this ledger whether a knowledge message is new. The ledger is plain data,
saved with every student checkpoint, so it survives the loss of Redis itself.

Early stopping shortens the plan (``end_after``): the epochs after the last one kept are not learnt,
their messages are dropped as past the end, and "complete" and "missing" speak of the kept epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LedgerError(RuntimeError):
    """An impossible state: a batch outside the plan. A bug or a message from another job."""


@dataclass
class EpochLedger:
    batches_per_epoch: int
    epochs: int
    applied: dict[int, set[int]] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    # Early stopping: the last epoch of the plan that is learnt (None: every planned epoch).
    last_epoch: int | None = None
    past_end_dropped: int = 0

    @property
    def epochs_kept(self) -> int:
        return self.epochs if self.last_epoch is None else self.last_epoch + 1

    def is_past_end(self, epoch: int) -> bool:
        return epoch >= self.epochs_kept

    def end_after(self, epoch: int) -> int:
        """Keeps epochs up to ``epoch`` and any later one a batch of which was applied already (an epoch
        is learnt whole or not at all); returns the last epoch kept. The plan only ever shortens."""
        if not 0 <= epoch < self.epochs:
            raise LedgerError(f"cannot end after epoch {epoch}: the plan has epochs 0 to {self.epochs - 1}")
        last = max([epoch, *(e for e, done in self.applied.items() if done)])
        self.last_epoch = min(last, self.epochs_kept - 1)
        return self.last_epoch

    def count_past_end(self) -> None:
        self.past_end_dropped += 1

    def is_applied(self, epoch: int, batch_id: int) -> bool:
        return batch_id in self.applied.get(epoch, ())

    def record(self, epoch: int, batch_id: int, n_samples: int) -> bool:
        """Marks a batch applied; returns False (and counts a duplicate) when it already was."""
        if not (0 <= epoch < self.epochs and 0 <= batch_id < self.batches_per_epoch):
            raise LedgerError(
                f"batch {batch_id} of epoch {epoch} is outside the plan "
                f"({self.epochs} epochs x {self.batches_per_epoch} batches)"
            )
        if self.is_past_end(epoch):
            raise LedgerError(f"batch {batch_id} of epoch {epoch} is past the end of the shortened plan "
                              f"(training stopped early after epoch {self.last_epoch})")
        done = self.applied.setdefault(epoch, set())
        if batch_id in done:
            self.duplicates_dropped += 1
            return False
        done.add(batch_id)
        self.samples[epoch] = self.samples.get(epoch, 0) + n_samples
        return True

    def count_duplicate(self) -> None:
        self.duplicates_dropped += 1

    @property
    def batches_applied(self) -> int:
        return sum(len(done) for done in self.applied.values())

    @property
    def samples_applied(self) -> int:
        return sum(self.samples.values())

    @property
    def complete(self) -> bool:
        kept = sum(len(self.applied.get(epoch, ())) for epoch in range(self.epochs_kept))
        return kept == self.epochs_kept * self.batches_per_epoch

    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) not yet applied: what must be re-enqueued after Redis lost its data."""
        return [
            (epoch, batch_id)
            for epoch in range(self.epochs_kept)
            for batch_id in range(self.batches_per_epoch)
            if not self.is_applied(epoch, batch_id)
        ]

    def to_dict(self) -> dict:
        return {
            "batches_per_epoch": self.batches_per_epoch,
            "epochs": self.epochs,
            "applied": {str(epoch): sorted(done) for epoch, done in self.applied.items()},
            "samples": {str(epoch): n for epoch, n in self.samples.items()},
            "duplicates_dropped": self.duplicates_dropped,
            "last_epoch": self.last_epoch,
            "past_end_dropped": self.past_end_dropped,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EpochLedger":
        return cls(
            batches_per_epoch=int(data["batches_per_epoch"]),
            epochs=int(data["epochs"]),
            applied={int(epoch): set(done) for epoch, done in data["applied"].items()},
            samples={int(epoch): int(n) for epoch, n in data["samples"].items()},
            duplicates_dropped=int(data["duplicates_dropped"]),
            last_epoch=None if data.get("last_epoch") is None else int(data["last_epoch"]),
            past_end_dropped=int(data.get("past_end_dropped", 0)),
        )
