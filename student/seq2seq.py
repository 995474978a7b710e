"""Sequence-to-sequence targets: what a translation student's decoder learns to write.

Hugging Face encoder-decoders take ``labels`` (the target tokens, -100 where nothing is to be
predicted) and build the decoder's inputs themselves by shifting the labels right behind
``decoder_start_token_id``. Word-level distillation (Kim & Rush 2016) runs the teacher under
teacher forcing on such a target and ships its top-k at every target position; sequence-level
distillation makes the teacher's own beam-search output the target. Both give the student one
``labels`` array; these pure functions build it from token ids.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def reference_targets(pair_ids: np.ndarray, pair_mask: np.ndarray, decoder_start_id: int) -> np.ndarray:
    """Labels from the tokenised reference: its real tokens, less a leading ``decoder_start_id`` (a
    BERT-style tokenizer's [CLS], which the model puts in front by itself), -100 elsewhere."""
    labels = np.where(pair_mask.astype(bool), pair_ids, IGNORE).astype(np.int64)
    if labels.shape[1] and (labels[:, 0] == decoder_start_id).all():
        labels = labels[:, 1:]
    return _trim(labels)


def generated_targets(generated: np.ndarray, decoder_start_id: int, eos_id: int | None, pad_id: int | None) -> np.ndarray:
    """Labels from ``model.generate`` output: without the leading decoder start, up to and including the
    first end-of-sequence token, -100 after it (and on padding of sequences that ended early)."""
    labels = generated.astype(np.int64)
    if labels.shape[1] and (labels[:, 0] == decoder_start_id).all():
        labels = labels[:, 1:]
    labels = labels.copy()
    for row in labels:
        ends = np.flatnonzero(row == eos_id) if eos_id is not None else np.empty(0, dtype=np.int64)
        if ends.size:
            row[ends[0] + 1:] = IGNORE
        elif pad_id is not None:
            row[row == pad_id] = IGNORE
    return _trim(labels)


def _trim(labels: np.ndarray) -> np.ndarray:
    """Drops trailing columns where every row is -100 (keeps at least one column)."""
    real = np.flatnonzero((labels != IGNORE).any(axis=0))
    width = int(real[-1]) + 1 if real.size else 1
    return np.ascontiguousarray(labels[:, :width])
