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


# -- balanced epochs (data.balance): the plan holds the epoch's draws -----------------------------------


def test_every_draw_exactly_once_and_a_repeated_row_never_twice_in_a_batch():
    lengths = np.random.default_rng(2).integers(3, 60, size=300)
    # Rows 0-49 drawn three times each, 50-299 once: 400 draws.
    draws = np.sort(np.concatenate([np.repeat(np.arange(50), 3), np.arange(50, 300)]))
    for group in (True, False):
        batches = plan_epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=group, draws=draws)
        assert sorted(flat(batches).tolist()) == draws.tolist()
        assert [len(b) for b in batches] == [16] * 25
        assert all(len(set(b.tolist())) == len(b) for b in batches)
        again = plan_epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=group, draws=draws)
        assert all(np.array_equal(x, y) for x, y in zip(batches, again))


def test_a_row_drawn_more_often_than_there_are_batches_keeps_a_repeat():
    # One row drawn five times into two batches of four: every draw is still planned once.
    draws = np.array([0, 0, 0, 0, 0, 1, 2, 3])
    batches = plan_epoch_batches(np.ones(4, dtype=np.int64), 4, seed=0, epoch=0, group_by_length=False, draws=draws)
    assert sorted(flat(batches).tolist()) == draws.tolist()
    assert sorted(b.tolist().count(0) for b in batches) == [2, 3]


def test_draws_of_every_row_once_plan_as_the_rows_do():
    lengths = np.arange(100) % 13
    plain = plan_epoch_batches(lengths, 8, seed=1, epoch=2, group_by_length=True)
    drawn = plan_epoch_batches(lengths, 8, seed=1, epoch=2, group_by_length=True, draws=np.arange(100))
    assert all(np.array_equal(x, y) for x, y in zip(plain, drawn))
