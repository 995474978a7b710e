import numpy as np
import pytest

from polydistill.storage.masking import IGNORE, mask_tokens

SPECIAL = frozenset({0, 1, 2})  # pad, cls, sep


def sample(n: int = 40) -> np.ndarray:
    return np.array([1, *range(10, 10 + n), 2], dtype=np.int32)


def test_masking_hides_the_rate_of_ordinary_tokens_and_labels_only_them():
    ids = sample(40)
    corrupted, labels = mask_tokens(ids, seed=0, epoch=0, sample_id=7, mask_id=3, vocab_size=100,
                                    special_ids=SPECIAL)
    chosen = np.flatnonzero(labels != IGNORE)
    assert len(chosen) == 6  # 15 % of 40
    assert labels[chosen].tolist() == ids[chosen].tolist()
    assert corrupted[0] == 1 and corrupted[-1] == 2  # specials are never chosen
    unchosen = np.setdiff1d(np.arange(len(ids)), chosen)
    assert (corrupted[unchosen] == ids[unchosen]).all()
    assert (corrupted[chosen] == 3).sum() >= 3  # about 80 % become the mask token


def test_masking_is_a_function_of_seed_epoch_and_sample():
    ids = sample()
    first = mask_tokens(ids, seed=1, epoch=2, sample_id=3, mask_id=3, vocab_size=100, special_ids=SPECIAL)
    again = mask_tokens(ids, seed=1, epoch=2, sample_id=3, mask_id=3, vocab_size=100, special_ids=SPECIAL)
    other_epoch = mask_tokens(ids, seed=1, epoch=3, sample_id=3, mask_id=3, vocab_size=100, special_ids=SPECIAL)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other_epoch[1])


def test_a_short_sample_still_gets_one_position_and_a_bad_rate_is_refused():
    corrupted, labels = mask_tokens(np.array([1, 50, 2]), seed=0, epoch=0, sample_id=0, mask_id=3,
                                    vocab_size=100, special_ids=SPECIAL)
    assert labels.tolist() == [IGNORE, 50, IGNORE]
    with pytest.raises(ValueError, match="masking rate"):
        mask_tokens(sample(), seed=0, epoch=0, sample_id=0, mask_id=3, vocab_size=100, special_ids=SPECIAL, rate=0)
