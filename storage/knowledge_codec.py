"""Compact forms of a teacher's knowledge for wire schema version 2: pure numpy, no I/O.

Top-k soft labels. What a student needs from a teacher's top-k is a distribution over k + 1
buckets: its k kept classes and the rest (``student/losses.py``). Version 1 ships it as float32
logits, int32 class ids and the full log-sum-exp: 8 bytes a kept entry. Version 2 ships

- the class ids in the order of the values (descending), each in ``index_bits`` bits, the fewest
  that hold the largest id (18 for a 250k vocabulary), packed end to end;
- each kept class's log-probability ``lp = value - logsumexp`` as a *level*, ``y = -lp`` (>= 0)
  on a fixed scale, and the rest's log-mass as one more level per row. With 16 value bits the
  scale is uniform (``Y_MAX_16 / 65535`` nats a level) and levels travel as uint16. With 8 bits
  the scale is companded: fine where the probabilities are large, coarse where they are tiny,
  since an error of ``d`` nats on a class of probability ``p`` costs about ``p * d**2 / 2`` nats
  of KL (``COMPANDER_8``); and since a row's levels only grow, they travel as unary-coded
  differences, ``levels + k`` bits a row for its k entries.

The decoder renormalises the k + 1 rebuilt buckets, so what it returns is a distribution, and
hands back ``topk_values`` as log-probabilities with ``topk_logsumexp`` 0: every loss reads only
``topk_values - topk_logsumexp``, which is what was sent.

Features (hidden states, attention maps): float16 as today, or int8 with one float32 scale per
row of the last axis (``max |x| / 127``), which halves them again.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from polydistill.storage.schema import WireError, check_axes
from polydistill.storage.wire_codec import WireCodec

__all__ = ["WireCodec", "pack_topk", "unpack_topk", "quantise_rows", "dequantise_rows", "bucket_log_probs", "bucket_kl"]

# Log-probabilities below -Y_MAX_16 nats (p < 1e-21) travel as -Y_MAX_16.
Y_MAX_16 = 48.0
# (start in nats of -log p, nats per level) of each segment of the 8-bit scale. 0.1 nats near the top keeps
# the KL of the rebuilt buckets near 0.1**2 / 24 = 4e-4 nats; below p = e**-8 and e**-16 a class carries too
# little mass for its level to matter. 255 levels reach 175 nats.
COMPANDER_8 = ((0.0, 0.1), (8.0, 0.5), (16.0, 1.0))
MAX_LEVEL_8 = 255


# --------------------------------------------------------------------------- #
# Bits
# --------------------------------------------------------------------------- #


def pack_fixed_width(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers below 2**width in ``width`` bits each: one plane per whole byte (the lowest
    byte of every value, then the next byte of every value, ...), then the remaining high bits of every
    value end to end. Planes and a short bit stream keep both directions to whole-array numpy operations."""
    flat = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
    whole, rest = divmod(width, 8)
    parts = [(flat >> np.uint32(8 * plane)).astype(np.uint8) for plane in range(whole)]
    if rest:
        high = flat >> np.uint32(8 * whole)
        bits = np.empty((flat.size, rest), np.uint8)
        for column in range(rest):
            bits[:, column] = (high >> np.uint32(rest - 1 - column)) & 1
        parts.append(np.packbits(bits.reshape(-1)))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_fixed_width(packed: np.ndarray, width: int, count: int, where: str) -> np.ndarray:
    """The ``count`` integers ``pack_fixed_width`` wrote, as uint32."""
    whole, rest = divmod(width, 8)
    expected = count * whole + math.ceil(count * rest / 8)
    if packed.size != expected:
        raise WireError(f"{where}: {packed.size} bytes, but {count} values of {width} bits need {expected}")
    values = np.zeros(count, np.uint32)
    for plane in range(whole):
        values |= packed[plane * count: (plane + 1) * count].astype(np.uint32) << np.uint32(8 * plane)
    if rest:
        bits = np.unpackbits(packed[whole * count:], count=count * rest).reshape(count, rest)
        for column in range(rest):
            values |= bits[:, column].astype(np.uint32) << np.uint32(8 * whole + rest - 1 - column)
    return values


def pack_unary_rows(levels: np.ndarray) -> np.ndarray:
    """Rows of non-decreasing non-negative levels as unary differences: per entry, as many 0 bits as it
    rises over the one before (the first over 0), then a 1."""
    steps = np.diff(levels.astype(np.int64), axis=-1, prepend=0).reshape(-1)
    if steps.size and steps.min() < 0:
        raise ValueError("pack_unary_rows: levels must not decrease along a row")
    ones = np.cumsum(steps + 1) - 1
    bits = np.zeros(int(ones[-1]) + 1 if ones.size else 0, dtype=np.uint8)
    bits[ones] = 1
    return np.packbits(bits)


def unpack_unary_rows(packed: np.ndarray, rows: int, k: int, where: str) -> np.ndarray:
    """The [rows, k] levels ``pack_unary_rows`` wrote, as int64."""
    ones = np.flatnonzero(np.unpackbits(packed))
    if ones.size != rows * k or (ones.size and ones[-1] < packed.size * 8 - 8):
        raise WireError(f"{where}: expected {rows * k} unary codes in {packed.size} bytes, found {ones.size}")
    steps = np.diff(ones, prepend=-1) - 1
    return np.cumsum(steps.reshape(rows, k), axis=-1)


# --------------------------------------------------------------------------- #
# Levels of -log p
# --------------------------------------------------------------------------- #


def to_levels(nats: np.ndarray, value_bits: int) -> np.ndarray:
    """Levels of ``-log p`` (>= 0; NaN and +inf as the last level)."""
    # float32 is precise enough for 8-bit levels (a tenth of a nat), not for 16-bit ones.
    precision = np.float64 if value_bits == 16 else np.float32
    nats = np.nan_to_num(np.asarray(nats, dtype=precision), nan=np.inf, posinf=np.inf)
    nats = np.maximum(nats, precision(0))
    if value_bits == 16:
        return np.rint(np.minimum(nats, Y_MAX_16) * (65535 / Y_MAX_16)).astype(np.uint16)
    # The segments follow each other: a value's level is the levels it climbs through in each one.
    level = np.zeros(nats.shape, np.float32)
    ends = [start for start, _ in COMPANDER_8[1:]] + [np.inf]
    for (start, width), end in zip(COMPANDER_8, ends):
        level += np.clip(nats - np.float32(start), 0, np.float32(end - start)) / np.float32(width)
    return np.minimum(np.rint(level), MAX_LEVEL_8).astype(np.uint8)


@functools.cache
def _level_table(value_bits: int) -> np.ndarray:
    """The ``-log p`` of every level, float64: decoding is one lookup per value."""
    levels = np.arange(2**value_bits, dtype=np.float64)
    if value_bits == 16:
        return levels * (Y_MAX_16 / 65535)
    starts = np.array([start for start, _ in COMPANDER_8])
    widths = np.array([width for _, width in COMPANDER_8])
    first_levels = np.concatenate([[0.0], np.cumsum(np.diff(starts) / widths[:-1])])
    segment = np.searchsorted(first_levels, levels, side="right") - 1
    return starts[segment] + (levels - first_levels[segment]) * widths[segment]


def from_levels(levels: np.ndarray, value_bits: int) -> np.ndarray:
    """The ``-log p`` (nats, float64) each level stands for."""
    return _level_table(value_bits)[np.asarray(levels)]


# --------------------------------------------------------------------------- #
# Top-k soft labels
# --------------------------------------------------------------------------- #


def bucket_log_probs(values: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """[..., k + 1] log-probabilities of the k kept classes and of the rest, float64."""
    kept = np.asarray(values, np.float64) - np.asarray(logsumexp, np.float64)[..., None]
    kept_mass = np.exp(np.minimum(kept, 0.0)).sum(axis=-1)
    rest = np.log(np.clip(1.0 - kept_mass, 0.0, None), where=kept_mass < 1.0,
                  out=np.full(kept_mass.shape, -np.inf))
    return np.concatenate([kept, rest[..., None]], axis=-1)


def bucket_kl(values_p: np.ndarray, logsumexp_p: np.ndarray, values_q: np.ndarray,
              logsumexp_q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per row between the k + 1 buckets of two top-k forms of the same classes: how much
    a packed form lost against the exact one."""
    log_p, log_q = bucket_log_probs(values_p, logsumexp_p), bucket_log_probs(values_q, logsumexp_q)
    p = np.exp(log_p)
    return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def pack_topk(values: np.ndarray, indices: np.ndarray, logsumexp: np.ndarray, value_bits: int) -> dict:
    """The packed form of top-k soft labels (``value_bits`` 8 or 16): the arrays of the message's
    ``topk_packed`` variant. ``values`` must be descending along the last axis, as ``topk_soft_labels`` gives."""
    shape = list(values.shape)
    k = shape[-1]
    rows = math.prod(shape[:-1])
    if k < 1:
        raise WireError("SoftLabels: a top-k of k = 0 carries nothing to pack")
    if indices.size and int(indices.min()) < 0:
        raise WireError("SoftLabels.topk_indices: class ids must be non-negative")
    index_bits = max(1, int(indices.max()).bit_length()) if indices.size else 1
    buckets = bucket_log_probs(values, logsumexp)
    levels = to_levels(-buckets, value_bits)
    kept, rest = levels[..., :k], levels[..., k]
    if value_bits == 8:
        # Ties and rounding may leave a row's levels out of order only if the values were not descending.
        kept = np.maximum.accumulate(kept, axis=-1)
        kept_levels = pack_unary_rows(kept.reshape(rows, k))
    else:
        kept_levels = np.ascontiguousarray(kept)
    return {
        "shape": shape,
        "value_bits": value_bits,
        "index_bits": index_bits,
        "indices": pack_fixed_width(indices, index_bits),
        "levels": kept_levels,
        "rest": np.ascontiguousarray(rest),
    }


def unpack_topk(shape: list, value_bits: int, index_bits: int, indices: np.ndarray, levels: np.ndarray,
                rest: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topk_values as log-probabilities, topk_indices, topk_logsumexp of zeros) from the packed form."""
    if value_bits not in (8, 16):
        raise WireError(f"{where}.value_bits: expected 8 or 16, got {value_bits!r}")
    if not 1 <= index_bits <= 31:
        raise WireError(f"{where}.index_bits: expected 1 to 31, got {index_bits!r}")
    if len(shape) not in (2, 3) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise WireError(f"{where}.shape: expected [n, k] or [n, L, k], got {shape!r}")
    check_axes(shape, where)
    k, rows = shape[-1], math.prod(shape[:-1])
    if k < 1:
        raise WireError(f"{where}.shape: k must be at least 1, got {shape!r}")
    level_type = np.dtype(np.uint8 if value_bits == 8 else np.uint16)
    _require(indices, np.dtype(np.uint8), None, f"{where}.indices")
    _require(rest, level_type, rows, f"{where}.rest")
    class_ids = unpack_fixed_width(indices, index_bits, rows * k, f"{where}.indices")
    if value_bits == 8:
        _require(levels, level_type, None, f"{where}.levels")
        kept = unpack_unary_rows(levels, rows, k, f"{where}.levels")
        if kept.size and kept.max() > MAX_LEVEL_8:
            raise WireError(f"{where}.levels: a level above {MAX_LEVEL_8}")
    else:
        _require(levels, level_type, rows * k, f"{where}.levels")
        kept = levels.reshape(rows, k)
    log_probs = -from_levels(np.concatenate([kept, rest.reshape(rows, 1)], axis=-1), value_bits)
    # Renormalised: the rebuilt buckets are a distribution whatever the rounding did.
    peak = log_probs.max(axis=-1, keepdims=True)
    log_probs -= peak + np.log(np.exp(log_probs - peak).sum(axis=-1, keepdims=True))
    values = log_probs[:, :k].astype(np.float32).reshape(shape)
    return values, class_ids.astype(np.int32).reshape(shape), np.zeros(shape[:-1], np.float32)


def _require(array: np.ndarray, dtype: np.dtype, size: int | None, where: str) -> None:
    if array.dtype != dtype or (size is not None and array.size != size):
        wanted = f"{size} values" if size is not None else "values"
        raise WireError(f"{where}: expected {wanted} of {dtype.name}, got {array.size} of {array.dtype}")


# --------------------------------------------------------------------------- #
# Features
# --------------------------------------------------------------------------- #


def quantise_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row of the last axis) with ``array ≈ values * scale``."""
    work = np.asarray(array, np.float32)
    peak = np.abs(work).max(axis=-1, keepdims=True) if work.shape[-1] else np.zeros(work.shape[:-1] + (1,))
    scale = np.where(np.isfinite(peak) & (peak > 0), peak / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(np.nan_to_num(work / scale)), -127, 127).astype(np.int8)
    return values, scale[..., 0]


def dequantise_rows(values: np.ndarray, scale: np.ndarray, dtype: type = np.float16) -> np.ndarray:
    return (values.astype(np.float32) * scale[..., None]).astype(dtype)
