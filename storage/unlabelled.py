"""Unlabelled text for the teacher to label: the transfer set a distilled student learns from beside
its labelled rows (XtremeDistil, Mukherjee & Awadallah 2020, distils over large unlabelled sets).

``data.unlabelled`` names the text; it joins the distilled student's training rows with label -1,
so the student learns it from the teacher's soft labels alone, while the teacher's fine-tuning and
the hard-label ablation, which read the training split itself, never see it.
"""

from __future__ import annotations

from datasets import Dataset

from polydistill.cluster.config import UnlabelledConfig
from polydistill.storage.cleaning import clean_dataset
from polydistill.storage.datasets import (
    INDEX_ID,
    UNLABELLED,
    DataSourceError,
    load_parallel,
    load_split,
    parallel_languages,
)


def load_unlabelled(settings: UnlabelledConfig, normalization: str) -> Dataset:
    """The configured text as (text, language) rows, cleaned like the training split."""
    if _is_tatoeba_folder(settings.path):
        texts: list[str] = []
        languages: list[str] = []
        for language in settings.languages or parallel_languages(settings.path):
            rows = load_parallel(settings.path, language, limit=settings.limit_per_language)
            texts.extend(rows["text"])
            languages.extend([language] * len(rows))
    else:
        loaded = load_split(settings.path, settings.split, languages=settings.languages,
                            text_column=settings.text_column, label_column=None,
                            language_column=settings.language_column,
                            limit_per_language=settings.limit_per_language).dataset.with_format(None)
        texts, languages = loaded["text"][:], loaded["language"][:]
    rows = Dataset.from_dict({"sample_id": list(range(len(texts))), "text": texts,
                              "label": [UNLABELLED] * len(texts), "language": languages})
    cleaned, _ = clean_dataset(rows, normalization=normalization)
    return cleaned


def append_unlabelled(train: Dataset, unlabelled: Dataset) -> Dataset:
    """``train`` followed by ``unlabelled``'s rows: label -1, sample ids after the largest of ``train``, and
    (when ``train`` has one) an index_id that matches no sentence (-1, or "" for string ids)."""
    columns = train.with_format(None).to_dict()
    extra = unlabelled.with_format(None)
    n = len(extra)
    start = int(max(columns["sample_id"], default=-1)) + 1
    added = {"sample_id": list(range(start, start + n)), "text": extra["text"][:],
             "label": [UNLABELLED] * n, "language": extra["language"][:]}
    if INDEX_ID in columns:
        no_sentence = "" if train.features[INDEX_ID].dtype == "string" else -1
        added[INDEX_ID] = [no_sentence] * n
    missing = sorted(set(columns) - set(added))
    if missing:
        raise ValueError(f"data.unlabelled joins plain text rows, but the training split has columns {missing} "
                         "that text has no value for: drop data.unlabelled for this data")
    return Dataset.from_dict({name: columns[name] + added[name] for name in columns}, features=train.features)


def _is_tatoeba_folder(path: str) -> bool:
    try:
        return bool(parallel_languages(path))
    except DataSourceError:  # not a folder: a file or a hub name, for load_split
        return False
