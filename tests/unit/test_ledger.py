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


# -- early stopping: a shortened plan ----------------------------------------------------------------
def test_ending_early_keeps_whole_epochs_only_and_speaks_of_them_alone():
    ledger = EpochLedger(batches_per_epoch=2, epochs=4)
    for epoch, batch in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)]:
        ledger.record(epoch, batch, 10)
    # Dev stopped improving after epoch 1, but a batch of epoch 2 was applied already: epoch 2 is finished.
    assert ledger.end_after(1) == 2
    assert ledger.epochs_kept == 3 and ledger.is_past_end(3) and not ledger.is_past_end(2)
    assert not ledger.complete and ledger.missing() == [(2, 0)]
    with pytest.raises(LedgerError, match="past the end of the shortened plan"):
        ledger.record(3, 0, 10)
    ledger.record(2, 0, 10)
    assert ledger.complete and ledger.missing() == [] and ledger.samples_applied == 60


def test_the_plan_only_shortens_and_survives_a_checkpoint():
    ledger = EpochLedger(batches_per_epoch=2, epochs=5)
    ledger.record(0, 0, 3)
    assert ledger.end_after(2) == 2
    assert ledger.end_after(3) == 2  # a later decision never lengthens it
    assert ledger.end_after(0) == 0
    ledger.count_past_end()
    again = EpochLedger.from_dict(ledger.to_dict())
    assert again == ledger and again.last_epoch == 0 and again.past_end_dropped == 1
    with pytest.raises(LedgerError, match="epochs 0 to 4"):
        ledger.end_after(5)
    # A checkpoint written before early stopping existed reads as the whole plan.
    old = {key: value for key, value in EpochLedger(2, 3).to_dict().items() if key not in ("last_epoch", "past_end_dropped")}
    assert EpochLedger.from_dict(old).epochs_kept == 3
