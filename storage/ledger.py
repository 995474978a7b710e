"""Which batches the student has applied: exactly-once bookkeeping with no I/O.

Redis delivers at least once (a reclaimed or re-enqueued batch can arrive twice), so the
student decides from this ledger whether a knowledge message is new. The ledger is plain data,
saved with every student checkpoint, so it survives the loss of Redis itself.
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

    def is_applied(self, epoch: int, batch_id: int) -> bool:
        return batch_id in self.applied.get(epoch, ())

    def record(self, epoch: int, batch_id: int, n_samples: int) -> bool:
        """Marks a batch applied; returns False (and counts a duplicate) when it already was."""
        if not (0 <= epoch < self.epochs and 0 <= batch_id < self.batches_per_epoch):
            raise LedgerError(
                f"batch {batch_id} of epoch {epoch} is outside the plan "
                f"({self.epochs} epochs x {self.batches_per_epoch} batches)"
            )
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
        return self.batches_applied == self.epochs * self.batches_per_epoch

    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) not yet applied: what must be re-enqueued after Redis lost its data."""
        return [
            (epoch, batch_id)
            for epoch in range(self.epochs)
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
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EpochLedger":
        return cls(
            batches_per_epoch=int(data["batches_per_epoch"]),
            epochs=int(data["epochs"]),
            applied={int(epoch): set(done) for epoch, done in data["applied"].items()},
            samples={int(epoch): int(n) for epoch, n in data["samples"].items()},
            duplicates_dropped=int(data["duplicates_dropped"]),
        )
