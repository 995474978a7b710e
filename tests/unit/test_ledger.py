import pytest

from polydistill.storage.ledger import EpochLedger, LedgerError


def test_records_each_batch_once_and_counts_duplicates():
    ledger = EpochLedger(batches_per_epoch=3, epochs=2)
    assert ledger.record(0, 1, 32)
    assert not ledger.record(0, 1, 32)
    assert ledger.duplicates_dropped == 1
    assert ledger.samples_applied == 32
    assert ledger.is_applied(0, 1) and not ledger.is_applied(1, 1)


def test_complete_and_missing():
    ledger = EpochLedger(batches_per_epoch=2, epochs=2)
    for epoch, batch in [(0, 0), (1, 1), (0, 1)]:
        ledger.record(epoch, batch, 10)
    assert not ledger.complete
    assert ledger.missing() == [(1, 0)]
    ledger.record(1, 0, 5)
    assert ledger.complete and ledger.missing() == []
    assert ledger.samples == {0: 20, 1: 15}


def test_batch_outside_the_plan_is_a_bug_not_a_duplicate():
    ledger = EpochLedger(batches_per_epoch=2, epochs=1)
    with pytest.raises(LedgerError, match="outside the plan"):
        ledger.record(0, 2, 1)
    with pytest.raises(LedgerError):
        ledger.record(1, 0, 1)


def test_round_trips_through_plain_data():
    ledger = EpochLedger(batches_per_epoch=4, epochs=2)
    ledger.record(0, 3, 7)
    ledger.record(1, 0, 8)
    ledger.record(1, 0, 8)
    again = EpochLedger.from_dict(ledger.to_dict())
    assert again == ledger
