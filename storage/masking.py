"""Masked-LM inputs: which tokens a batch hides, as a pure function of (seed, epoch, sample).

BERT's recipe: ``rate`` of each sample's maskable tokens (not special, not padding) are chosen;
of those, 80 % become the mask token, 10 % a random piece, 10 % stay as they are. The teacher and
the student read the same corrupted ids (they travel in the work batch), and the original ids of
the chosen positions are the labels (-100 elsewhere, the HF convention). Deterministic per sample
and epoch, so that a re-fed batch is masked the same way and a cache of the teacher's knowledge
stays valid for that epoch's masking.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def mask_tokens(
    token_ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    sample_id: int,
    mask_id: int,
    vocab_size: int,
    special_ids: frozenset[int],
    rate: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted ids, labels) of one sample's unpadded ids; at least one position is chosen."""
    if not 0 < rate < 1:
        raise ValueError(f"the masking rate must lie in (0, 1), got {rate}")
    rng = np.random.default_rng([seed, epoch, sample_id])
    ids = np.asarray(token_ids, dtype=np.int32)
    maskable = np.flatnonzero(~np.isin(ids, list(special_ids)))
    labels = np.full(ids.shape, IGNORE, dtype=np.int64)
    if maskable.size == 0:
        return ids.copy(), labels
    count = max(1, int(round(rate * maskable.size)))
    chosen = rng.choice(maskable, size=count, replace=False)
    labels[chosen] = ids[chosen]
    corrupted = ids.copy()
    action = rng.random(count)
    corrupted[chosen[action < 0.8]] = mask_id
    randomised = chosen[(action >= 0.8) & (action < 0.9)]
    corrupted[randomised] = rng.integers(0, vocab_size, size=randomised.size)
    return corrupted, labels
