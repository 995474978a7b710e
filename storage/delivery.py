"""Delivery rules for messages that keep coming back, with no I/O.

Redis counts how often a pending entry was handed out (XREADGROUP, XAUTOCLAIM). An entry
that every consumer takes and none acknowledges is "poison": the consumers die or hang on it
(a batch that runs a teacher out of memory, say). Retrying it forever would stall the job
without saying why, so past ``max_deliveries`` it goes to the dead-letter stream with the
reason, and the report counts it. The Redis adapter fetches the counts; this module decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
