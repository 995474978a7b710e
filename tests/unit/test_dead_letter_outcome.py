"""How a job with dead letters ends and what it counts (cluster/dead_letters.py), and what the driver's
probe decides when batches are missing (cluster/recovery.py ``judge_probe``): pure, no Ray, no Redis."""

from __future__ import annotations

import pytest

from polydistill.cluster.dead_letters import (
    DeadLetterBook,
    COMPLETED_WITH_DEAD_LETTERS,
    dead_lettered_batches,
    outcome_with_dead_letters,
    samples_dead_lettered,
)
from polydistill.cluster.recovery import judge_probe
from polydistill.storage.streams import DeadLetterRecord

IDS = "WorkBatch.input_ids: token ids span [0, 7000], outside the teacher's vocabulary of 6000"
OOM = "raised the same error on each of its 5 deliveries (transport.max_deliveries=5): OutOfMemoryError"
RECORDS = [
    DeadLetterRecord(IDS, "work", (0, 3), 8),
    DeadLetterRecord("message.raw: not a msgpack message", "work", None, 0),  # named no batch
    DeadLetterRecord(OOM, "work", (1, 4), 8),
    DeadLetterRecord(OOM, "work", (1, 4), 8),  # the same batch again: counted once, first reason kept
    DeadLetterRecord(IDS, "work", (1, 9), 8),  # a copy dead-lettered while another copy was learnt
]
DEAD = dead_lettered_batches(RECORDS)


def report(distilled: int, dead_letters: int = 5, **extra) -> dict:
    return {"samples_expected": 400, "samples_distilled": distilled, "dead_letters": dead_letters, **extra}


def test_dead_lettered_batches_keep_those_that_name_a_batch():
    assert DEAD == {(0, 3): (IDS, 8), (1, 4): (OOM, 8), (1, 9): (IDS, 8)}


def test_samples_dead_lettered_count_only_batches_never_applied_by_reason():
    assert samples_dead_lettered(DEAD, [(0, 3), (1, 4)]) == {IDS: 8, OOM: 8}
    assert samples_dead_lettered(DEAD, [[0, 3]]) == {IDS: 8}  # pairs as JSON lists
    assert samples_dead_lettered(DEAD, []) == {}


# (outcome from the exact accounting, samples distilled, dead letters, missing batches by student) -> status
OUTCOMES = [
    ("completed", 400, 0, {}, "completed"),
    ("completed", 400, 2, {}, COMPLETED_WITH_DEAD_LETTERS),  # garbage beside the plan
    ("failed", 384, 5, {"student": [(0, 3), (1, 4)]}, COMPLETED_WITH_DEAD_LETTERS),
    ("failed", 384, 5, {"student": [(0, 3), (0, 5)]}, "failed"),  # (0, 5) lost with no dead letter
    ("failed", 380, 5, {"student": [(0, 3), (1, 4)]}, "failed"),  # the samples do not add up
    ("failed", 392, 5, {}, "failed"),  # short with nothing named missing
    ("stopped", 200, 5, {}, "stopped"),
]


@pytest.mark.parametrize("outcome, distilled, dead_letters, missing, status", OUTCOMES)
def test_outcome_with_dead_letters(outcome, distilled, dead_letters, missing, status):
    assert outcome_with_dead_letters(outcome, report(distilled, dead_letters), missing, DEAD) == status


def test_every_student_must_add_up():
    both = report(384, extra_students={"small": {"samples_distilled": 376}})
    missing = {"student": [(0, 3), (1, 4)], "small": [(0, 3), (1, 4)]}
    assert outcome_with_dead_letters("failed", both, missing, DEAD) == "failed"
    both["extra_students"]["small"]["samples_distilled"] = 384
    assert outcome_with_dead_letters("failed", both, missing, DEAD) == COMPLETED_WITH_DEAD_LETTERS


# (missing, dead letters that name no batch, missing batches that a dead letter names) -> the probe's action
PROBES = [
    (0, 3, 0, "wait"),
    (2, 0, 2, "finish"),
    (2, 3, 2, "finish"),  # every missing batch is accounted for, whatever else was dead-lettered
    (3, 0, 2, "recover"),  # one batch lost in flight besides: re-fed (dead-lettered ones are not)
    (1, 1, 0, "stop"),  # a dead letter that names no batch may be the missing one
    (4, 0, 0, "recover"),  # dead letters that name other batches (bad copies beside the plan) do not count
]


@pytest.mark.parametrize("missing, unnamed, named, action", PROBES)
def test_judge_probe(missing, unnamed, named, action):
    assert judge_probe(missing, unnamed, named).action == action


def test_the_dead_letter_book_keeps_what_names_a_batch_across_a_redis_data_loss():
    book = DeadLetterBook()
    book.read_stream([DeadLetterRecord(IDS, "knowledge", (1002, 33), 8), DeadLetterRecord(IDS, "knowledge", (2, 33), 8)])
    assert book.unnamed == 0 and set(book.named) == {(1002, 33), (2, 33)}
    # Redis loses its data: the two records read went with it (their batches stay known), and one written
    # since the last read, never read, might have named any batch.
    book.stream_lost(seen=3)
    assert book.lost == 3 and book.unnamed == 1 and set(book.named) == {(1002, 33), (2, 33)}
    # A missing batch lost in flight beside those is fed again only while no dead letter could be it.
    assert judge_probe(1, DeadLetterBook(named=dict(book.named)).unnamed, 0).action == "recover"
    assert judge_probe(1, book.unnamed, 0).action == "stop"
    book.read_stream([DeadLetterRecord("message.raw: not a msgpack message", "work", None, 0)])
    assert book.unnamed == 2
