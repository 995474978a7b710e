"""The rows a teacher is fine-tuned and checked on: a training split and a dev split, never the test split.

The dev split is the one every setting is chosen on (``data.dev_split``): with ``data.dev_from_train``
the rows carved from the training split, else the data's own split of that name, else (the data has
none) rows carved from the training split here, for the teacher only: it then fine-tunes without
them, while the student still distils on the whole training split (it never selects on these rows).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from polydistill.cluster.config import DataConfig
from polydistill.storage.datasets import DataSourceError
from polydistill.storage.job_data import JobSplit, carve_dev_rows, has_own_split, load_job_split


@dataclass(frozen=True)
class TeacherSplits:
    train: JobSplit  # what the teacher (and the gate's baselines) train on: no dev row in it
    dev: JobSplit
    dev_source: Literal["data", "train"]  # the data's own dev split, or rows carved from train
    dev_split_name: str  # data.dev_split

    def describe(self) -> dict:
        """The dev split as the report names it."""
        languages = Counter(self.dev.dataset.with_format(None)["language"][:])
        return {"split": self.dev_split_name, "source": self.dev_source, "rows": len(self.dev.dataset),
                "rows_per_language": dict(sorted(languages.items()))}


def teacher_splits(data: DataConfig, train: JobSplit) -> TeacherSplits:
    """``train`` is the job's training split as ``load_job_split(data, data.train_split)`` gives it
    (an extra teacher's: filtered to its languages, with ``data.languages`` saying so)."""
    # dev_split may equal eval_split: a job evaluated on its dev split on purpose (a tune trial) reads
    # no test split at all. Choosing the teacher on the rows it trains on would choose nothing.
    if not data.dev_from_train and data.dev_split == data.train_split:
        raise DataSourceError(
            f"data.dev_split and data.train_split are both {data.dev_split!r}: the teacher is fine-tuned and checked "
            "on the dev split, which must not be the rows it trains on; give data.dev_split another split, or set "
            "data.dev_from_train: true to carve one from the training split"
        )
    if data.dev_from_train:  # ``train`` already comes without the carved rows
        dev, source = load_job_split(data, data.dev_split, label_names=train.label_names), "train"
    elif has_own_split(data, data.dev_split):
        dev, source = load_job_split(data, data.dev_split, label_names=train.label_names), "data"
    else:
        carved = carve_dev_rows(train.dataset, fraction=data.dev_fraction, seed=data.dev_seed)
        kept = np.setdiff1d(np.arange(len(train.dataset)), carved)
        dev = dataclasses.replace(train, dataset=train.dataset.select(carved))
        train = dataclasses.replace(train, dataset=train.dataset.select(kept))
        source = "train"
    if len(dev.dataset) == 0:
        raise DataSourceError(
            f"the dev split {data.dev_split!r} has no rows, so the teacher cannot be fine-tuned or checked on it: "
            "give the data a dev split with rows of every language, or raise data.dev_fraction"
        )
    return TeacherSplits(train=train, dev=dev, dev_source=source, dev_split_name=data.dev_split)
