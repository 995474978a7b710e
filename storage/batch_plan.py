"""Which rows each batch of an epoch holds: a pure function of (lengths, batch size, seed, epoch).

Any process can recompute which samples batch 17 of epoch 2 holds; that is what lets a job
re-enqueue exactly the batches a student has not applied after Redis lost its data. The feeder
plans its work batches with it, and the in-process supervised training its batches.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

# Sorting by length inside windows of this many batches keeps padding low while the batch
# order stays random: a window is small enough that every epoch still mixes languages.
LENGTH_WINDOW_BATCHES = 50


def plan_epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool,
    draws: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row indices of each batch of one epoch, deterministic per (seed, epoch): every row exactly once,
    or with ``draws`` (the rows a balanced epoch drew, storage/balancing.py) every draw exactly once.

    A row drawn more than once never shares a batch with itself where the plan can avoid it: the
    rows of a batch are told apart by their sample ids (a batch's knowledge travels in chunks that
    are gathered by them)."""
    rng = np.random.default_rng([seed, epoch])
    positions = np.arange(len(lengths)) if draws is None else np.asarray(draws, dtype=np.int64)
    order = rng.permutation(len(positions))
    if group_by_length:
        window = batch_size * LENGTH_WINDOW_BATCHES
        order = np.concatenate(
            [chunk[np.argsort(lengths[positions[chunk]], kind="stable")]
             for chunk in np.array_split(order, max(1, -(-len(order) // window)))]
        ) if len(order) else order
    batches = [positions[order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    if draws is not None:
        batches = _without_repeats_in_a_batch(batches)
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _without_repeats_in_a_batch(batches: list[np.ndarray]) -> list[np.ndarray]:
    """Swaps each second copy of a row in a batch with a row of the next batch (in turn) that holds
    neither it nor that row. Batch sizes stay, and so does every draw; a row drawn more often than
    there are batches keeps a repeat."""
    batches = [batch.copy() for batch in batches]
    held = [Counter(batch.tolist()) for batch in batches]
    for i, batch in enumerate(batches):
        for slot, row in enumerate(batch.tolist()):
            if held[i][row] < 2:
                continue
            for j in (*range(i + 1, len(batches)), *range(i)):
                if row in held[j]:
                    continue
                partner = next((k for k, other in enumerate(batches[j].tolist()) if other not in held[i]), None)
                if partner is None:
                    continue
                other = int(batches[j][partner])
                batch[slot], batches[j][partner] = other, row
                held[i][row] -= 1
                held[i][other] += 1
                held[j][other] -= 1
                if not held[j][other]:
                    del held[j][other]
                held[j][row] += 1
                break
    return batches
