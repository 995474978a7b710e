"""Language balancing and stratified splitting for a canonical dataset (storage/datasets.py).

Temperature sampling (XLM-R, Conneau et al. 2020): language i is drawn with probability
p_i = n_i^alpha / sum_j n_j^alpha. alpha = 1 keeps the natural proportions, alpha = 0 gives every
language the same share, XLM-R's alpha = 0.3 sits between (flattens towards low-resource languages).

Repeated rows keep their `sample_id`. The student's exactly-once accounting is per *position* in
the balanced dataset, not per sample id: a row that upsampling repeats is meant to be trained on
twice, so its two positions are counted as two samples on purpose. Anything that deduplicates by
`sample_id` downstream would undo the balancing.

All functions are deterministic for a given seed; each language (or stratum) draws from its own
generator seeded from (seed, crc32 of its name), so adding or removing one language does not
change what is drawn for the others. Outputs keep the input's row order (repeats adjacent);
shuffling for training is the feeder's job.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
from datasets import Dataset

__all__ = [
    "balance_languages",
    "balanced_epoch_draws",
    "balanced_sample_counts",
    "language_sampling_probabilities",
    "stratified_split",
]

BalanceMode = Literal["temperature", "upsample", "downsample"]


def language_sampling_probabilities(counts: Mapping[str, int], alpha: float) -> dict[str, float]:
    """p_i proportional to n_i ** alpha, normalised; a language with no rows gets 0."""
    _check_counts(counts)
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    weights = {lang: (float(n) ** alpha if n > 0 else 0.0) for lang, n in counts.items()}
    total = sum(weights.values())
    return {lang: w / total for lang, w in weights.items()}


def balanced_sample_counts(counts: Mapping[str, int], alpha: float, total: int | None = None) -> dict[str, int]:
    """Rows per language under temperature sampling, summing exactly to `total` (default: all rows).

    Largest-remainder rounding: every language gets floor(p_i * total), and the rows left over go
    one each to the largest fractional parts (ties to the language listed first).
    """
    probs = language_sampling_probabilities(counts, alpha)
    if total is None:
        total = sum(counts.values())
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    return _largest_remainder({lang: p * total for lang, p in probs.items()}, total)


def balanced_epoch_draws(languages: Sequence[str], alpha: float, total: int, *, seed: int, epoch: int) -> np.ndarray:
    """The rows one epoch draws under temperature sampling: ``total`` row indices (sorted, with repeats).

    Language l gets ``balanced_sample_counts(counts, alpha, total)[l]`` draws; t draws from its n rows
    take every row t // n times and t % n distinct rows once more, picked by a generator seeded with
    (seed, epoch, the language), so an epoch's draws are the same in any process and differ from
    epoch to epoch. Each draw is one sample of the epoch: a row drawn twice is trained on twice.
    """
    by_language = _group_rows(list(languages))
    counts = {lang: len(rows) for lang, rows in by_language.items()}
    targets = balanced_sample_counts(counts, alpha, total)
    drawn: list[int] = []
    for lang, rows in by_language.items():
        rng = np.random.default_rng([seed, epoch, zlib.crc32(str(lang).encode("utf-8"))])
        drawn.extend(_resample(rows, targets[lang], rng))
    return np.sort(np.asarray(drawn, dtype=np.int64))


def balance_languages(
    ds: Dataset,
    *,
    alpha: float | None = None,
    mode: BalanceMode,
    seed: int,
) -> Dataset:
    """Resample rows so that languages are balanced.

    - "upsample": every language grows to the largest language's row count.
    - "downsample": every language shrinks to the smallest language's row count (no repeats).
    - "temperature": languages get `balanced_sample_counts(counts, alpha)` rows, same total.
    `alpha` is used only by "temperature" (and required there).

    Growing a language to t rows from n keeps every row: t // n full copies plus (t % n) distinct
    rows drawn without replacement, so no row is repeated more than once beyond any other (lower
    variance than drawing all t rows with replacement). Shrinking draws t distinct rows.
    """
    if "language" not in ds.column_names:
        raise ValueError(f"balance_languages needs a 'language' column; columns: {', '.join(ds.column_names)}")
    by_language = _group_rows(ds.with_format(None)["language"][:])
    counts = {lang: len(rows) for lang, rows in by_language.items()}
    if not counts:
        return ds
    if mode == "upsample":
        targets = {lang: max(counts.values()) for lang in counts}
    elif mode == "downsample":
        targets = {lang: min(counts.values()) for lang in counts}
    elif mode == "temperature":
        if alpha is None:
            raise ValueError("mode 'temperature' needs alpha (e.g. 0.3 as in XLM-R)")
        targets = balanced_sample_counts(counts, alpha)
    else:
        raise ValueError(f"mode must be 'temperature', 'upsample' or 'downsample', got {mode!r}")

    chosen: list[int] = []
    for lang, rows in by_language.items():
        chosen.extend(_resample(rows, targets[lang], _rng(seed, lang)))
    chosen.sort()
    return ds.select(chosen)


def stratified_split(
    ds: Dataset,
    *,
    dev_fraction: float,
    seed: int,
    by: Sequence[str] = ("language", "label"),
) -> tuple[Dataset, Dataset]:
    """Split into (train, dev) with each stratum (one value of the `by` columns) split alike.

    The dev total is round(len(ds) * dev_fraction), shared among strata by largest remainder,
    except that each stratum keeps at least one row in train (so a stratum of one row is all
    train, and the dev total can fall short of the target when strata are tiny).
    Both parts keep the input's row order.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    by = list(by)
    missing = [c for c in by if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"stratified_split: column(s) {', '.join(missing)} not in dataset; columns: {', '.join(ds.column_names)}"
        )
    plain = ds.with_format(None)
    columns = [plain[c][:] for c in by]
    strata = _group_rows(list(zip(*columns)) if columns else [()] * len(ds))

    quotas = _largest_remainder(
        {key: len(rows) * dev_fraction for key, rows in strata.items()},
        math.floor(len(ds) * dev_fraction + 0.5),
        caps={key: len(rows) - 1 for key, rows in strata.items()},
    )
    dev: list[int] = []
    for key, rows in strata.items():
        n_dev = quotas[key]
        if n_dev:
            picked = _rng(seed, repr(key)).choice(len(rows), size=n_dev, replace=False)
            dev.extend(rows[i] for i in picked)
    dev.sort()
    dev_set = set(dev)
    train = [i for i in range(len(ds)) if i not in dev_set]
    return ds.select(train), ds.select(dev)


# --------------------------------------------------------------------------------------------


def _check_counts(counts: Mapping[str, int]) -> None:
    if not counts:
        raise ValueError("counts is empty; need at least one language")
    negative = {k: n for k, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"counts must be >= 0, got {negative}")
    if sum(counts.values()) == 0:
        raise ValueError(f"every language has 0 rows: {dict(counts)}")


def _group_rows(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Row indices per key, keys in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(str(name).encode("utf-8"))])


def _resample(rows: list[int], target: int, rng: np.random.Generator) -> list[int]:
    n = len(rows)
    if target <= n:
        return [rows[i] for i in rng.choice(n, size=target, replace=False)]
    copies, rest = divmod(target, n)
    return rows * copies + [rows[i] for i in rng.choice(n, size=rest, replace=False)]


def _largest_remainder(
    quotas: Mapping[Hashable, float], total: int, caps: Mapping[Hashable, int] | None = None
) -> dict[Hashable, int]:
    """Integers near `quotas` summing to `total` (or as close as `caps` allow).

    Floors first, then one more each to the largest fractional parts, ties to the key listed first.
    """
    out = {k: math.floor(q) for k, q in quotas.items()}
    if caps is not None:
        out = {k: min(v, caps[k]) for k, v in out.items()}
    order = sorted(quotas, key=lambda k: -(quotas[k] - math.floor(quotas[k])))  # stable: ties keep input order
    left = total - sum(out.values())
    while left > 0:
        progressed = False
        for k in order:
            if left == 0:
                break
            if caps is not None and out[k] >= caps[k]:
                continue
            out[k] += 1
            left -= 1
            progressed = True
        if not progressed:
            break
    return out
