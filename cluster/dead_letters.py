"""A job that dead-lettered messages: which planned batches it gave up, their samples by reason, and
how it ended. Pure functions over what the dead-letter stream and the students' ledgers say.

A batch is dead-lettered rather than lost when the dead-letter stream names it (teachers and students
record the epoch, batch id and samples of a message that decoded far enough) and no student applied
it: a copy dead-lettered while another copy was learnt counts for nothing. The accounting then reads
"samples distilled + samples dead-lettered = samples expected", and the job ends
``completed_with_dead_letters`` (exit status ``EXIT_DEAD_LETTERS``), with ``samples_dead_lettered``
by reason in report.json. A dead letter that named no batch (a payload that did not decode) is
counted in ``dead_letters`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

BatchKey = tuple[int, int]  # (epoch, batch id)

COMPLETED_WITH_DEAD_LETTERS = "completed_with_dead_letters"


def dead_lettered_batches(records: Iterable) -> dict[BatchKey, tuple[str, int]]:
    """(epoch, batch) -> (reason, samples) of every dead letter that names a batch (``DeadLetterRecord``s,
    storage/streams.py); the first reason recorded for a batch is kept."""
    batches: dict[BatchKey, tuple[str, int]] = {}
    for record in records:
        if record.batch is not None:
            batches.setdefault(tuple(record.batch), (record.reason, record.samples))
    return batches


@dataclass
class DeadLetterBook:
    """What the driver knows of the job's dead letters, kept across Redis data losses (no I/O: the
    supervisor feeds it what it reads). A dead letter that names a batch explains that batch alone; one
    that names none, or one lost with Redis before it was read, might explain any missing batch."""

    named: dict[BatchKey, tuple[str, int]] = field(default_factory=dict)
    lost: int = 0  # records that went with Redis's data
    unnamed_lost: int = 0  # of which might have named any batch: read and naming none, or never read
    read: int = 0  # records of the current dead-letter stream read so far
    unnamed_read: int = 0  # of which name no batch

    def read_stream(self, records: Sequence) -> None:
        """The whole current dead-letter stream, as just read (``DeadLetterRecord``s)."""
        self.read = len(records)
        self.unnamed_read = sum(1 for record in records if record.batch is None)
        self.named.update(dead_lettered_batches(records))

    def stream_lost(self, seen: int) -> None:
        """Redis lost its data, with the ``seen`` records its dead-letter stream last held."""
        self.lost += seen
        self.unnamed_lost += self.unnamed_read + max(0, seen - self.read)
        self.read = self.unnamed_read = 0

    @property
    def unnamed(self) -> int:
        """Dead letters that might be any missing batch."""
        return self.unnamed_lost + self.unnamed_read


def samples_dead_lettered(dead: Mapping[BatchKey, tuple[str, int]], missing: Iterable[Sequence[int]]) -> dict[str, int]:
    """Samples of the ``missing`` batches (never applied) that were dead-lettered, by reason."""
    by_reason: dict[str, int] = {}
    for pair in missing:
        entry = dead.get((int(pair[0]), int(pair[1])))
        if entry is not None:
            reason, samples = entry
            by_reason[reason] = by_reason.get(reason, 0) + samples
    return dict(sorted(by_reason.items()))


def outcome_with_dead_letters(outcome: str, report: Mapping, missing_batches: Mapping[str, Sequence[Sequence[int]]],
                              dead: Mapping[BatchKey, tuple[str, int]]) -> str:
    """The job's status once dead letters are taken into account.

    ``outcome``: what the exact accounting alone says (cluster/stopping.py ``job_outcome``). A completed job
    that dead-lettered anything says so; a job short only of batches that were dead-lettered, every sample
    of them counted, completed with dead letters instead of failing; a stopped job stays stopped."""
    if outcome == "completed":
        return COMPLETED_WITH_DEAD_LETTERS if report.get("dead_letters") else outcome
    if outcome != "failed" or not missing_batches:
        return outcome
    expected = report["samples_expected"]
    distilled = {"student": (report["samples_distilled"], expected),
                 **{name: (extra["samples_distilled"], extra.get("samples_expected", expected))
                    for name, extra in report.get("extra_students", {}).items()}}
    for name, (samples, wanted) in distilled.items():
        missing = [(int(epoch), int(batch)) for epoch, batch in missing_batches.get(name, ())]
        if any(pair not in dead for pair in missing):
            return outcome  # a batch lost without a dead letter: the accounting is not exact
        if samples + sum(samples_dead_lettered(dead, missing).values()) != wanted:
            return outcome
    return COMPLETED_WITH_DEAD_LETTERS
