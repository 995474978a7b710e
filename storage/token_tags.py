"""Moving word-level tags to sub-word tokens and token predictions back to words.

A tagging dataset labels words; the model sees sub-word tokens. The usual convention, followed
here, scores each word once, on its FIRST sub-token: the later pieces of a word, special tokens
([CLS], [SEP]) and padding get ``ignore_index`` so the loss skips them, and at evaluation a word
takes the prediction of its first sub-token. That keeps the loss and the metrics per word, so a
word split into five pieces weighs no more than one kept whole.

``word_ids`` is what a Hugging Face fast tokenizer's ``BatchEncoding.word_ids(i)`` returns for
``is_split_into_words=True`` input: for each token position, the index of the word it came from,
or None for special tokens and padding. Words cut off by truncation simply have no positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["IGNORE_INDEX", "UNPREDICTED", "token_predictions_to_words", "word_tags_to_token_labels"]

IGNORE_INDEX = -100
UNPREDICTED = -1


def _first_subtoken_positions(word_ids: Sequence[int | None], n_words: int) -> dict[int, int]:
    """word index -> the first token position that belongs to it."""
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is None:
            continue
        if not 0 <= word < n_words:
            raise ValueError(f"token {position} points at word {word}, but there are only {n_words} words")
        # setdefault keeps the earliest position, so each word is scored exactly once.
        first.setdefault(word, position)
    return first


def word_tags_to_token_labels(
    word_ids: Sequence[int | None], word_labels: Sequence[int], ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Per-token labels (int64, len(word_ids)): the word's label on its first sub-token only."""
    labels = np.full(len(word_ids), ignore_index, dtype=np.int64)
    for word, position in _first_subtoken_positions(word_ids, len(word_labels)).items():
        labels[position] = word_labels[word]
    return labels


def token_predictions_to_words(
    word_ids: Sequence[int | None], token_predictions: Sequence[int] | np.ndarray, n_words: int
) -> np.ndarray:
    """Per-word predictions (int64, n_words) from each word's first sub-token.

    ``token_predictions`` holds one predicted label id per token position (the argmax of the
    logits), aligned with ``word_ids``. A word with no token left after truncation gets
    ``UNPREDICTED`` (-1), which the tagging metrics count as wrong.
    """
    predictions = np.asarray(token_predictions)
    if predictions.ndim != 1:
        raise ValueError(f"token_predictions must be 1-D label ids, got shape {predictions.shape}")
    if len(predictions) != len(word_ids):
        raise ValueError(f"{len(predictions)} token predictions for {len(word_ids)} word ids")
    words = np.full(n_words, UNPREDICTED, dtype=np.int64)
    for word, position in _first_subtoken_positions(word_ids, n_words).items():
        words[word] = predictions[position]
    return words
