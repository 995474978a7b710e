"""Which rows each batch of an epoch holds: a pure function of (lengths, batch size, seed, epoch).

Any process can recompute which samples batch 17 of epoch 2 holds; that is what lets a job
re-enqueue exactly the batches a student has not applied after Redis lost its data. The feeder
plans its work batches with it, and the in-process supervised training its batches.
"""

from __future__ import annotations

import numpy as np

# Sorting by length inside windows of this many batches keeps padding low while the batch
# order stays random: a window is small enough that every epoch still mixes languages.
LENGTH_WINDOW_BATCHES = 50


def plan_epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[np.ndarray]:
    """Row indices of each batch of one epoch: every row exactly once, deterministic per (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = batch_size * LENGTH_WINDOW_BATCHES
        order = np.concatenate(
            [chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.array_split(order, max(1, -(-len(order) // window)))]
        ) if len(order) else order
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
