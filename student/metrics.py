"""Evaluation metrics as pure functions on numpy arrays or lists.

Results are plain Python floats/ints so they can go straight into report.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise numerator / denominator with 0 where the denominator is 0."""
    numerator = numerator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_labels: int) -> np.ndarray:
    """Counts ``[true_label, predicted_label]`` as an int64 ``[num_labels, num_labels]`` array."""
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    for name, labels in (("y_true", true), ("y_pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(
                f"{name} holds labels in [{labels.min()}, {labels.max()}], outside "
                f"0..{num_labels - 1} (num_labels={num_labels})"
            )
    flat = np.bincount(true * num_labels + pred, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike, num_labels: int) -> dict:
    """Accuracy and macro precision / recall / F1.

    Macro averages run over the labels that occur in `y_true` or `y_pred`, not over all
    `num_labels`: a per-language split often lacks some labels, and counting those as 0
    would punish the language for what its test set does not contain. Per-label scores with
    a zero denominator are 0 (a label predicted but never present gets precision 0).
    Macro F1 is the mean of per-label F1s, not the F1 of macro P and R.
    """
    confusion = confusion_matrix(y_true, y_pred, num_labels)
    n = int(confusion.sum())
    if n == 0:
        scores = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
        return {**dict.fromkeys(scores, 0.0), "n": 0}
    true_positive = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = _safe_ratio(true_positive, predicted)
    recall = _safe_ratio(true_positive, actual)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    present = (predicted + actual) > 0
    return {
        "accuracy": float(true_positive.sum() / n),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "n": n,
    }


def per_language_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, languages: Sequence[str], num_labels: int
) -> dict[str, dict]:
    """`classification_metrics` for each language, keyed by language in sorted order."""
    true = np.asarray(y_true).reshape(-1)
    pred = np.asarray(y_pred).reshape(-1)
    langs = np.asarray(languages, dtype=object).reshape(-1)
    if not true.size == pred.size == langs.size:
        raise ValueError(
            f"y_true ({true.size}), y_pred ({pred.size}) and languages ({langs.size}) "
            "must have the same length"
        )
    return {
        lang: classification_metrics(true[langs == lang], pred[langs == lang], num_labels)
        for lang in sorted(set(langs.tolist()))
    }


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood in nats); inf when that overflows."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


def retrieval_accuracy(src_emb: ArrayLike, tgt_emb: ArrayLike) -> float:
    """Fraction of rows i whose nearest target by cosine similarity is target i.

    Bitext retrieval: row i of `src_emb` and row i of `tgt_emb` embed translations of
    each other. Ties resolve to the lowest index.
    """
    src = np.asarray(src_emb, dtype=np.float64)
    tgt = np.asarray(tgt_emb, dtype=np.float64)
    if src.ndim != 2 or src.shape != tgt.shape:
        raise ValueError(
            f"src and tgt embeddings must both be [n, d] with equal shapes, got "
            f"{src.shape} and {tgt.shape}"
        )
    if src.shape[0] == 0:
        return 0.0
    # The tiny floor keeps an all-zero embedding from producing NaN similarities.
    src = src / np.maximum(np.linalg.norm(src, axis=1, keepdims=True), 1e-12)
    tgt = tgt / np.maximum(np.linalg.norm(tgt, axis=1, keepdims=True), 1e-12)
    nearest = (src @ tgt.T).argmax(axis=1)
    return float((nearest == np.arange(src.shape[0])).mean())


def retention(student: float, teacher: float) -> float | None:
    """Student score as a fraction of the teacher's; None when the teacher scored 0.

    None rather than inf/NaN: it stays valid JSON and the report prints it as a dash.
    """
    if teacher == 0:
        return None
    return float(student / teacher)
