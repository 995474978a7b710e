"""Teacher-labelled views of parallel training rows: the first half of a sentence in one language and the
second half of the same sentence in another.

A distilled student can learn from inputs nobody labelled, because the teacher labels them: that is
where a teacher adds what gold labels cannot ("a good teacher is patient and consistent", Beyer et al.
2022; TinyBERT's task-specific augmentation). On parallel data (rows tied by ``index_id``) a cheap
source of new inputs keeps the meaning of a sentence while changing its surface: splice the start of
one translation onto the end of another (a code-switched view). A view carries no gold label
(label -1): the student learns it from the teacher's soft labels only, and fine-tuning and the
hard-label ablation, which read the split itself, never see it. Views share their sentence's
``index_id``, so alignment targets (storage/alignment.py) reach them too.

Everything here is a pure function of (rows, views per row, seed): every process builds the same
views with the same sample ids.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from datasets import Dataset

from polydistill.storage.datasets import INDEX_ID, UNLABELLED


class AugmentationDataError(ValueError):
    """The data cannot give the views asked for; the message says what to change."""


def halves(text: str) -> tuple[str, str]:
    """A text cut in two at its middle word; a text written without spaces (Chinese, Japanese, Thai) at its
    middle character. The first half takes the extra word or character."""
    words = text.split()
    if len(words) >= 2:
        middle = math.ceil(len(words) / 2)
        return " ".join(words[:middle]), " ".join(words[middle:])
    middle = math.ceil(len(text) / 2)
    return text[:middle], text[middle:]


def splice(first: str, second: str) -> str:
    """The first half of ``first`` followed by the second half of ``second``."""
    head, _ = halves(first)
    _, tail = halves(second)
    if not tail:
        return head
    # No space between two halves written without spaces; otherwise the words stay apart.
    joiner = "" if (" " not in first.strip() and " " not in second.strip()) else " "
    return head + joiner + tail


def translation_swaps(dataset: Dataset, views_per_row: float, seed: int) -> Dataset:
    """``dataset`` followed by ``round(views_per_row * rows)`` spliced views, unlabelled.

    View k starts from row ``k % rows`` (every row starts as many views as the rate gives, the first rows
    one more) and takes its second half from a translation of the same sentence in another language,
    drawn by a generator seeded with (seed, k). Rows whose sentence has no translation start no view.
    A view's sample id follows the largest id of the split; its language is that of its first half.
    """
    if views_per_row <= 0:
        return dataset
    columns = dataset.with_format(None).to_dict()
    if INDEX_ID not in columns:
        raise AugmentationDataError(
            f"data.augment.translation_swaps needs an {INDEX_ID} column (the same sentence's id in every language, "
            f"as SIB-200 and FLORES give it): add it to the data, or drop data.augment")
    rows = len(columns["text"])
    by_sentence: dict = defaultdict(list)
    for position, index_id in enumerate(columns[INDEX_ID]):
        by_sentence[index_id].append(position)
    starts = [r for r in range(rows) if len(by_sentence[columns[INDEX_ID][r]]) > 1]
    if not starts:
        raise AugmentationDataError(
            f"data.augment.translation_swaps found no sentence in two languages (every {INDEX_ID} appears once): "
            "it needs parallel rows; drop data.augment")
    wanted = round(views_per_row * rows)
    next_id = int(max(columns["sample_id"])) + 1
    views: dict[str, list] = {name: [] for name in columns}
    for k in range(wanted):
        first = starts[k % len(starts)]
        others = [p for p in by_sentence[columns[INDEX_ID][first]] if columns["language"][p] != columns["language"][first]]
        if not others:
            continue
        second = others[int(np.random.default_rng([seed, k]).integers(len(others)))]
        for name in columns:
            views[name].append(columns[name][first])
        views["text"][-1] = splice(columns["text"][first], columns["text"][second])
        views["label"][-1] = UNLABELLED
        views["sample_id"][-1] = next_id + k
    merged = {name: columns[name] + views[name] for name in columns}
    return Dataset.from_dict(merged, features=dataset.features)
