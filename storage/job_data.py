"""A job's view of its data: load a split as configured, clean it, and tokenize it once."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from polydistill.cluster.config import DataConfig
from polydistill.storage.cleaning import clean_dataset, clean_text
from polydistill.storage.datasets import DataSourceError, has_split, load_parallel, load_split, parallel_languages
from polydistill.storage.token_tags import IGNORE_INDEX, word_tags_to_token_labels


@dataclass(frozen=True)
class JobSplit:
    dataset: Dataset  # columns: sample_id, text, label, language
    label_names: list[str]
    cleaning: dict  # per-language counts of what cleaning dropped and why


def load_job_split(data: DataConfig, split: str, label_names: list[str] | None = None) -> JobSplit:
    """The rows of ``split`` as the job config describes them, cleaned. With ``data.dev_from_train``,
    ``data.dev_split`` is the rows carved out of the training split and the training split is the rest."""
    if data.dev_from_train and split in (data.dev_split, data.train_split):
        train = _load_configured_split(data, data.train_split, label_names)
        dev_rows = carve_dev_rows(train.dataset, fraction=data.dev_fraction, seed=data.dev_seed)
        rows = dev_rows if split == data.dev_split else np.setdiff1d(np.arange(len(train.dataset)), dev_rows)
        return JobSplit(dataset=train.dataset.select(rows), label_names=train.label_names, cleaning=train.cleaning)
    return _load_configured_split(data, split, label_names)


def has_own_split(data: DataConfig, split: str) -> bool:
    """Whether the data itself holds ``split`` (parallel data holds only what job_data carves from it)."""
    if data.parallel:
        return False
    return has_split(data.path, split, languages=data.languages, language_column=data.language_column)


def carve_dev_rows(dataset: Dataset, *, fraction: float, seed: int) -> np.ndarray:
    """Positions of the rows set aside as a dev split, stratified by language and label, sorted.

    Each (language, label) group gives ``round(fraction * size)`` rows, at least one and never all of
    them (a group of one row stays in training), drawn by a generator seeded with ``seed`` and the
    group, so the same data and seed carve the same rows in any process. Unlabelled rows (label -1,
    word tags too) are stratified by language alone.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the dev fraction must lie between 0 and 1, got {fraction} (data.dev_fraction)")
    columns = dataset.with_format(None)
    groups: dict[tuple[str, int], list[int]] = {}
    for position, (language, label) in enumerate(zip(columns["language"][:], columns["label"][:])):
        groups.setdefault((language, int(label)), []).append(position)
    carved: list[int] = []
    for (language, label), positions in groups.items():
        if len(positions) < 2:
            continue
        size = min(len(positions) - 1, max(1, round(fraction * len(positions))))
        # crc32, not hash(): Python salts string hashes per process, and every trial must carve alike.
        rng = np.random.default_rng([seed, zlib.crc32(language.encode("utf-8")), label + 1])
        carved.extend(positions[i] for i in rng.choice(len(positions), size=size, replace=False))
    return np.asarray(sorted(carved), dtype=np.int64)


def _load_configured_split(data: DataConfig, split: str, label_names: list[str] | None) -> JobSplit:
    if data.parallel:
        return _parallel_split(data, split)
    loaded = load_split(
        data.path,
        split,
        languages=data.languages,
        text_column=data.text_column,
        label_column=data.label_column,
        language_column=data.language_column,
        label_names=label_names,
        limit_per_language=data.limit_per_language,
        word_tags=data.word_tags,
    )
    cleaned, report = clean_dataset(loaded.dataset, normalization=data.normalization)
    return JobSplit(dataset=cleaned, label_names=list(loaded.label_names), cleaning=report.to_dict())


def _parallel_split(data: DataConfig, split: str) -> JobSplit:
    """Parallel sentences: ``text`` is the English side (the teacher's input), ``pair`` its translation.

    The last ``data.parallel_test_rows`` rows of each language (at most half of them) are the
    held-out split (bitext retrieval), the rest the training split; ``limit_per_language`` caps
    the training rows.
    """
    if split not in (data.train_split, data.eval_split):
        raise DataSourceError(f"parallel data has two splits, data.train_split ({data.train_split!r}) and "
                              f"data.eval_split ({data.eval_split!r}); {split!r} is neither")
    columns: dict[str, list] = {"sample_id": [], "text": [], "pair": [], "label": [], "language": []}
    for language in data.languages or parallel_languages(data.path):
        rows = load_parallel(data.path, language)
        if len(rows) < 4:
            raise DataSourceError(f"{language}: only {len(rows)} parallel rows in {data.path}; retrieval needs more")
        # A short language (Tatoeba's Amharic has 168 pairs) keeps half of its rows for training.
        keep = len(rows) - min(data.parallel_test_rows, len(rows) // 2)
        if split == data.train_split:
            rows = rows.select(range(min(keep, data.limit_per_language or keep)))
        else:
            rows = rows.select(range(keep, len(rows)))
        start = len(columns["sample_id"])
        columns["sample_id"].extend(range(start, start + len(rows)))
        prefix = "" if data.source_prefix is None else data.source_prefix.replace("{language}", language)
        columns["text"].extend(prefix + english for english in rows["english"])
        columns["pair"].extend(clean_text(text, normalization=data.normalization) for text in rows["text"])
        columns["label"].extend([-1] * len(rows))
        columns["language"].extend([language] * len(rows))
    cleaned, report = clean_dataset(Dataset.from_dict(columns), normalization=data.normalization)
    return JobSplit(dataset=cleaned, label_names=[], cleaning=report.to_dict())


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids without padding (padding happens per batch, to the batch's longest row)."""

    sample_ids: np.ndarray  # int64 [n]
    token_ids: list[np.ndarray]  # int32 [len_i] each
    labels: np.ndarray  # int64 [n]; -1 where unlabelled
    languages: list[str]
    pair_token_ids: list[np.ndarray] | None = None  # parallel data: the translations, int32 [len_i] each
    # Word tags (token classification): per row, the tag of each word on its first sub-token and -100
    # elsewhere (int64 [len_i]); the word each token came from (int32 [len_i], -1 for specials); the
    # words' own tags (int64 [words_i]), which evaluation scores.
    token_labels: list[np.ndarray] | None = None
    word_ids: list[np.ndarray] | None = None
    word_tags: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.token_ids), dtype=np.int64, count=len(self.token_ids))


def tokenize_split(dataset: Dataset, tokenizer, max_length: int) -> TokenizedSplit:
    columns = dataset.with_format(None).to_dict()
    if "tags" in columns:
        return _tokenize_words(columns, tokenizer, max_length)
    encoded = tokenizer(columns["text"], truncation=True, max_length=max_length)
    pairs = None
    if "pair" in columns:
        pairs = [np.asarray(ids, dtype=np.int32)
                 for ids in tokenizer(columns["pair"], truncation=True, max_length=max_length)["input_ids"]]
    return TokenizedSplit(
        sample_ids=np.asarray(columns["sample_id"], dtype=np.int64),
        token_ids=[np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]],
        labels=np.asarray(columns["label"], dtype=np.int64),
        languages=columns["language"],
        pair_token_ids=pairs,
    )


def _tokenize_words(columns: dict, tokenizer, max_length: int) -> TokenizedSplit:
    """Tagged text: each word tokenised on its own (``is_split_into_words``), so every token knows its word."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataSourceError(f"token classification needs a fast tokenizer (it maps tokens to words); "
                              f"{type(tokenizer).__name__} is not one")
    words = [text.split() for text in columns["text"]]
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = [np.asarray([-1 if w is None else w for w in encoded.word_ids(i)], dtype=np.int32)
                for i in range(len(words))]
    tags = [np.asarray(row, dtype=np.int64) for row in columns["tags"]]
    return TokenizedSplit(
        sample_ids=np.asarray(columns["sample_id"], dtype=np.int64),
        token_ids=[np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]],
        labels=np.asarray(columns["label"], dtype=np.int64),
        languages=columns["language"],
        token_labels=[word_tags_to_token_labels([None if w < 0 else int(w) for w in ids], row)
                      for ids, row in zip(word_ids, tags)],
        word_ids=word_ids,
        word_tags=tags,
    )


def pad_labels(rows: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Per-token labels right-padded with IGNORE_INDEX (-100) to the longest row (or ``width``)."""
    width = width or max(len(row) for row in rows)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = row
    return labels


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with; 0 for tokenizers that define no pad token (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_rows(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads rows to the longest one; returns (input_ids int32, attention_mask uint8)."""
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), width), dtype=np.uint8)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask
