"""storage/balancing.py: hand-computed probabilities and counts, resampling, stratified splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from polydistill.storage.balancing import (
    balance_languages,
    balanced_epoch_draws,
    balanced_sample_counts,
    language_sampling_probabilities,
    stratified_split,
)
from polydistill.storage.datasets import CANONICAL_FEATURES


def make(counts: dict[str, int], labels: int = 1) -> Dataset:
    langs = [lang for lang, n in counts.items() for _ in range(n)]
    return Dataset.from_dict(
        {
            "sample_id": list(range(len(langs))),
            "text": [f"t{i}" for i in range(len(langs))],
            "label": [i % labels for i in range(len(langs))],
            "language": langs,
        },
        features=CANONICAL_FEATURES,
    )


# ---------------------------------------------------------------------------------------------
# Probabilities and counts
# ---------------------------------------------------------------------------------------------


def test_probabilities_hand_computed():
    # sqrt(100) = 10, sqrt(1) = 1 -> 10/11 and 1/11.
    p = language_sampling_probabilities({"a": 100, "b": 1}, alpha=0.5)
    assert p == pytest.approx({"a": 10 / 11, "b": 1 / 11})
    assert language_sampling_probabilities({"a": 300, "b": 100}, alpha=1.0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert language_sampling_probabilities({"a": 300, "b": 100, "c": 0}, alpha=0.0) == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_xlmr_alpha_flattens():
    counts = {"en": 1_000_000, "sw": 1_000}
    natural = language_sampling_probabilities(counts, 1.0)["sw"]
    flattened = language_sampling_probabilities(counts, 0.3)["sw"]
    # 1000^0.3 / (10^6^0.3 + 1000^0.3) = 10^0.9 / (10^1.8 + 10^0.9) = 1 / (10^0.9 + 1)
    assert flattened == pytest.approx(1 / (10**0.9 + 1))
    assert flattened > 100 * natural


@pytest.mark.parametrize("bad", [{}, {"a": 0}, {"a": -1, "b": 3}])
def test_probabilities_reject_bad_counts(bad):
    with pytest.raises(ValueError):
        language_sampling_probabilities(bad, 0.3)


def test_probabilities_reject_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        language_sampling_probabilities({"a": 1}, -0.5)


def test_counts_largest_remainder_hand_computed():
    # alpha=0.5, total 101: a 1010/11 = 91.818..., b 101/11 = 9.181... -> floors 91 + 9 = 100, a has the larger remainder.
    assert balanced_sample_counts({"a": 100, "b": 1}, 0.5) == {"a": 92, "b": 9}
    # Three equal shares of 10: 3.33 each, one left over goes to the first listed on a tie.
    assert balanced_sample_counts({"x": 5, "y": 5, "z": 5}, 1.0, total=10) == {"x": 4, "y": 3, "z": 3}
    assert balanced_sample_counts({"a": 7, "b": 0}, 0.3, total=4) == {"a": 4, "b": 0}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("total", [0, 1, 17, 1000])
def test_counts_sum_to_total(alpha, total):
    counts = {"en": 5000, "fr": 700, "yo": 30, "am": 3}
    out = balanced_sample_counts(counts, alpha, total=total)
    assert sum(out.values()) == total
    p = language_sampling_probabilities(counts, alpha)
    assert all(abs(out[k] - p[k] * total) < 1 for k in counts)


# ---------------------------------------------------------------------------------------------
# balance_languages
# ---------------------------------------------------------------------------------------------


def language_counts(ds: Dataset) -> dict[str, int]:
    return dict(Counter(ds["language"][:]))


def test_upsample_keeps_every_row_and_ids():
    ds = make({"a": 5, "b": 2})
    out = balance_languages(ds, mode="upsample", seed=0)
    assert language_counts(out) == {"a": 5, "b": 5}
    b_ids = Counter(i for i, lang in zip(out["sample_id"][:], out["language"][:]) if lang == "b")
    # 5 from 2 rows: 2 full copies of each, plus one drawn -> counts {3, 2}; ids are the originals.
    assert set(b_ids) == {5, 6} and sorted(b_ids.values()) == [2, 3]
    assert Counter(i for i, lang in zip(out["sample_id"][:], out["language"][:]) if lang == "a") == Counter(range(5))
    # Every position carries its row's data unchanged.
    assert all(t == f"t{i}" for i, t in zip(out["sample_id"][:], out["text"][:]))


def test_downsample_draws_distinct_rows():
    ds = make({"a": 10, "b": 3, "c": 4})
    out = balance_languages(ds, mode="downsample", seed=1)
    assert language_counts(out) == {"a": 3, "b": 3, "c": 3}
    ids = out["sample_id"][:]
    assert len(set(ids)) == 9 and ids == sorted(ids)
    assert {10, 11, 12}.issubset(ids)  # all of the smallest language


def test_temperature_matches_counts_and_total():
    counts = {"a": 100, "b": 1}
    out = balance_languages(make(counts), alpha=0.5, mode="temperature", seed=3)
    assert language_counts(out) == {"a": 92, "b": 9}
    assert len(out) == 101
    assert set(out.filter(lambda r: r["language"] == "b")["sample_id"][:]) == {100}


def test_balance_is_deterministic_per_seed_and_independent_per_language():
    ds = make({"a": 50, "b": 7})
    one = balance_languages(ds, alpha=0.3, mode="temperature", seed=11)["sample_id"][:]
    assert balance_languages(ds, alpha=0.3, mode="temperature", seed=11)["sample_id"][:] == one
    assert balance_languages(ds, alpha=0.3, mode="temperature", seed=12)["sample_id"][:] != one
    # Adding a language does not change which rows of "a" are drawn when its target is unchanged.
    small = balance_languages(make({"a": 50, "b": 7}), mode="downsample", seed=5)
    more = balance_languages(make({"a": 50, "b": 7, "c": 9}), mode="downsample", seed=5)
    pick = lambda d: [i for i, lang in zip(d["sample_id"][:], d["language"][:]) if lang == "a"]  # noqa: E731
    assert pick(small) == pick(more)


def test_balance_errors():
    ds = make({"a": 3})
    with pytest.raises(ValueError, match="alpha"):
        balance_languages(ds, mode="temperature", seed=0)
    with pytest.raises(ValueError, match="mode"):
        balance_languages(ds, mode="uniform", seed=0)
    with pytest.raises(ValueError, match="'language' column"):
        balance_languages(Dataset.from_dict({"text": ["x"]}), mode="upsample", seed=0)


# ---------------------------------------------------------------------------------------------
# One balanced epoch
# ---------------------------------------------------------------------------------------------

# Rows 0-7 are language a, rows 8-9 language b.
EPOCH_LANGUAGES = ["a"] * 8 + ["b"] * 2


def test_an_epoch_draws_each_language_its_balanced_count_hand_computed():
    # alpha 0: both languages half of 10 draws. a: 5 distinct of its 8 rows; b: 5 draws from 2 rows is
    # each row twice and one of them a third time.
    draws = balanced_epoch_draws(EPOCH_LANGUAGES, 0.0, 10, seed=0, epoch=0)
    drawn = Counter(draws.tolist())
    assert sum(n for row, n in drawn.items() if row < 8) == 5 and all(drawn[row] == 1 for row in drawn if row < 8)
    assert sorted(drawn[row] for row in (8, 9)) == [2, 3]
    # alpha 0.5: sqrt(8) : sqrt(2) = 2 : 1, so 20/3 and 10/3 of 10 draws; floors 6 and 3, the draw left over to
    # a (remainder 2/3 against 1/3): 7 and 3.
    half = Counter(EPOCH_LANGUAGES[row] for row in balanced_epoch_draws(EPOCH_LANGUAGES, 0.5, 10, seed=0, epoch=0))
    assert half == {"a": 7, "b": 3}
    # alpha 1 keeps the proportions: every row exactly once.
    assert balanced_epoch_draws(EPOCH_LANGUAGES, 1.0, 10, seed=0, epoch=0).tolist() == list(range(10))
    # Twice the draws at alpha 1: every row exactly twice.
    assert balanced_epoch_draws(EPOCH_LANGUAGES, 1.0, 20, seed=0, epoch=0).tolist() == sorted(list(range(10)) * 2)


def test_epoch_draws_are_fixed_per_seed_and_epoch_and_change_between_epochs():
    first = balanced_epoch_draws(EPOCH_LANGUAGES, 0.0, 10, seed=3, epoch=0)
    assert np.array_equal(first, balanced_epoch_draws(EPOCH_LANGUAGES, 0.0, 10, seed=3, epoch=0))
    others = [balanced_epoch_draws(EPOCH_LANGUAGES, 0.0, 10, seed=3, epoch=epoch) for epoch in range(1, 6)]
    assert any(not np.array_equal(first, other) for other in others)
    # Every epoch draws the same number from each language.
    assert all(Counter(EPOCH_LANGUAGES[row] for row in other) == {"a": 5, "b": 5} for other in others)


# ---------------------------------------------------------------------------------------------
# stratified_split
# ---------------------------------------------------------------------------------------------


def test_stratified_split_proportions_per_stratum():
    ds = make({"en": 200, "fr": 100}, labels=4)  # strata of 50 and 25 rows
    train, dev = stratified_split(ds, dev_fraction=0.2, seed=0)
    assert len(train) + len(dev) == 300 and len(dev) == 60
    strata = Counter(zip(dev["language"][:], dev["label"][:]))
    assert strata == {**{("en", k): 10 for k in range(4)}, **{("fr", k): 5 for k in range(4)}}
    assert not set(train["sample_id"][:]) & set(dev["sample_id"][:])
    assert train["sample_id"][:] == sorted(train["sample_id"][:])


def test_stratified_split_deterministic_and_seed_dependent():
    ds = make({"en": 40, "fr": 30}, labels=3)
    a = stratified_split(ds, dev_fraction=0.25, seed=7)[1]["sample_id"][:]
    assert stratified_split(ds, dev_fraction=0.25, seed=7)[1]["sample_id"][:] == a
    assert stratified_split(ds, dev_fraction=0.25, seed=8)[1]["sample_id"][:] != a


def test_stratified_split_keeps_one_row_of_each_stratum_in_train():
    ds = Dataset.from_dict(
        {
            "text": list("abcdefg"),
            "label": [0, 1, 1, 2, 2, 2, 2],
            "language": ["en"] * 7,
        }
    )
    train, dev = stratified_split(ds, dev_fraction=0.9, seed=0)
    # Target round(6.3) = 6, but each stratum keeps one train row: at most 0 + 1 + 3 = 4 in dev.
    assert Counter(train["label"][:]) == {0: 1, 1: 1, 2: 1}
    assert len(dev) == 4


def test_stratified_split_remainders_hit_the_target():
    # Three strata of 5 rows, 10%: 0.5 each, target round(1.5) = 2 -> two strata give one row.
    ds = make({"a": 5, "b": 5, "c": 5})
    _, dev = stratified_split(ds, dev_fraction=0.1, seed=0, by=("language",))
    assert len(dev) == 2 and dev["language"][:] == ["a", "b"]


def test_stratified_split_errors():
    ds = make({"a": 4})
    with pytest.raises(ValueError, match="dev_fraction"):
        stratified_split(ds, dev_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="topic"):
        stratified_split(ds, dev_fraction=0.5, seed=0, by=("language", "topic"))


def test_the_ablation_draws_the_balanced_epochs_the_feeder_sends(tmp_path):
    """The hard-label baseline learns from the same balanced draws as the distilled student."""
    from polydistill.cluster.config import load_config
    from polydistill.student.evaluate import balanced_draws

    tiny = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
    languages = ["eng_Latn"] * 90 + ["yor_Latn"] * 10
    plain = load_config(tiny, output_dir=str(tmp_path))
    assert balanced_draws(plain, languages) is None
    config = load_config(tiny, ["data.balance={alpha: 0.3}"], output_dir=str(tmp_path))
    draws = balanced_draws(config, languages)
    assert list(draws(1)) == list(balanced_epoch_draws(languages, 0.3, 100, seed=config.training.seed, epoch=1))
    assert (np.asarray(draws(0)) >= 90).sum() > 10  # Yoruba drawn more often than its share of rows
