"""Delivery rules for messages that keep coming back, with no I/O.

Redis counts how often a pending entry was handed out (XREADGROUP, XAUTOCLAIM). An entry
that every consumer takes and none acknowledges is "poison": the consumers die or hang on it
(a batch that runs a teacher out of memory, say). Retrying it forever would stall the job
without saying why, so past ``max_deliveries`` it goes to the dead-letter stream with the
reason, and the report counts it. The Redis adapter fetches the counts; this module decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

Entry = TypeVar("Entry", bound=tuple)


def over_delivered_reason(deliveries: int, max_deliveries: int) -> str | None:
    """Why an entry delivered ``deliveries`` times must be dead-lettered; None while it may be retried."""
    if max_deliveries < 1:
        raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries} (transport.max_deliveries)")
    if deliveries <= max_deliveries:
        return None
    return (
        f"delivered {deliveries} times, more than transport.max_deliveries={max_deliveries}: every consumer "
        "that took it died or hung before acknowledging it"
    )


def split_over_delivered(
    entries: Sequence[Entry], deliveries: Mapping[str, int], max_deliveries: int
) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """(entries to process, (entry, reason) pairs to dead-letter); entries are (entry id, payload).

    An entry with no count is no longer pending (someone acknowledged it meanwhile): it is
    kept, and acknowledging it again is a no-op.
    """
    keep: list[Entry] = []
    dead: list[tuple[Entry, str]] = []
    for entry in entries:
        reason = over_delivered_reason(deliveries.get(entry[0], 0), max_deliveries)
        if reason is None:
            keep.append(entry)
        else:
            dead.append((entry, reason))
    return keep, dead


# -- after handling a message raised --------------------------------------------------------------
@dataclass(frozen=True)
class Retry:
    """Hand the message out again (its delivery count goes up): the error may have been passing."""


@dataclass(frozen=True)
class DeadLetter:
    """The message is at fault: record it on the dead-letter stream with ``reason``, and acknowledge it."""

    reason: str


@dataclass(frozen=True)
class WorkerFault:
    """Not attributable to the message: the worker is broken, and is restarted like one that died."""

    reason: str


FailureVerdict = Retry | DeadLetter | WorkerFault


def after_failure(errors: Sequence[str], deliveries: int, max_deliveries: int, *,
                  message_at_fault: bool) -> FailureVerdict:
    """What to do with a message whose handling just raised.

    ``errors``: what each attempt of this worker on this message raised, the last one just now;
    ``deliveries``: Redis' delivery count of the entry (other workers' attempts included);
    ``message_at_fault``: the error says the message itself is invalid (a wire or validation error),
    which no retry can mend. An unexpected error is retried until the entry has been delivered
    ``max_deliveries`` times; the same error on every attempt then blames the message, while
    attempts that failed differently blame the worker.
    """
    if not errors:
        raise ValueError("after_failure needs the error that was just raised")
    if deliveries < 1 or max_deliveries < 1:
        raise ValueError(f"deliveries ({deliveries}) and max_deliveries ({max_deliveries}, transport.max_deliveries) "
                         "are at least 1 for a message that was handled")
    last = errors[-1]
    if message_at_fault:
        return DeadLetter(last)
    if deliveries < max_deliveries:
        return Retry()
    if len(set(errors)) == 1:
        return DeadLetter(f"raised the same error on each of its {deliveries} deliveries "
                          f"(transport.max_deliveries={max_deliveries}): {last}")
    seen = "; ".join(dict.fromkeys(errors))
    return WorkerFault(f"a message delivered {deliveries} times raised different errors ({seen}): the worker, "
                       "not the message, is failing")
