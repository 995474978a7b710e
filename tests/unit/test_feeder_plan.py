import numpy as np

from polydistill.storage.batch_plan import plan_epoch_batches
from polydistill.storage.job_data import pad_rows


def flat(batches):
    return np.concatenate(batches)


def test_every_row_exactly_once_per_epoch():
    lengths = np.random.default_rng(1).integers(3, 60, size=1001)
    for group in (True, False):
        batches = plan_epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=group)
        assert sorted(flat(batches).tolist()) == list(range(1001))
        assert [len(b) for b in batches].count(32) == 31 and len(batches) == 32


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    lengths = np.arange(500) % 37
    a = plan_epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)
    b = plan_epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)
    c = plan_epoch_batches(lengths, 16, seed=3, epoch=2, group_by_length=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_grouping_by_length_reduces_padding():
    lengths = np.random.default_rng(0).integers(5, 120, size=4000)

    def padded_tokens(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    grouped = plan_epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=True)
    plain = plan_epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=False)
    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)


def test_empty_split_gives_no_batches():
    assert plan_epoch_batches(np.array([], dtype=np.int64), 8, 0, 0, True) == []


def test_pad_rows():
    ids, mask = pad_rows([np.array([5, 6, 7]), np.array([8])], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
