"""Evaluation metrics as pure functions on numpy arrays or lists.

Results are plain Python floats/ints so they can go straight into report.json.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence

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


# Paired bootstrap over the test rows: enough resamples that the 2.5th and 97.5th percentiles move by
# well under a point from one seed to another; the seed is fixed so a report is reproducible.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95
_BOOTSTRAP_BLOCK_VALUES = 1_000_000


def bootstrap_intervals(
    correct: Mapping[str, ArrayLike],
    languages: Sequence[str],
    *,
    units: ArrayLike | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CONFIDENCE_LEVEL,
) -> dict:
    """Confidence intervals of the student's accuracy against the ablation's (student - ablation) and the
    teacher's (retention, student / teacher), per language and for the average over languages.

    ``correct[model][i]`` is what the model got right on test row i: 1 or 0 for a sentence, the number
    of words tagged right for a tagger's sentence, whose scored words are ``units[i]`` (default 1 each).
    Models are compared as ``comparisons_of`` pairs them (the student with "ablation" and "teacher", an
    extra student X with "ablation:X" and "teacher"); a comparison whose models are missing is left out.
    Each language's rows are resampled with replacement ``resamples`` times, the same draw for every model (a paired bootstrap: what the models share, the difficulty of the rows
    drawn, cancels), by a generator seeded with ``seed`` and the language, so a language's interval
    does not depend on which others are evaluated. An interval is the percentile interval holding
    ``level`` of the resampled statistics, beside the statistic on the rows themselves ("estimate").
    The language average draws every language's rows at once and averages the languages' accuracies
    (retention: the student's average over the teacher's). Returns {"per_language": {language:
    {comparison: {"estimate", "low", "high"}}}, "language_average": {comparison: ...}}; what is undefined
    (a retention whose teacher scores 0, an accuracy over no scored word) is None, and a resample where
    it is undefined is left out of the interval.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    languages = np.asarray(languages, dtype=object).reshape(-1)
    correct = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in correct.items()}
    units = np.ones(languages.size) if units is None else np.asarray(units, dtype=np.float64).reshape(-1)
    wrong_sizes = {name: values.size for name, values in {**correct, "units": units}.items() if values.size != languages.size}
    if wrong_sizes:
        raise ValueError(f"every model needs one value per test row ({languages.size} languages given), got {wrong_sizes}")
    if (units < 0).any():
        raise ValueError("a test row cannot hold fewer than 0 units (sentences, or scored words of a tagged sentence)")

    comparisons = comparisons_of(list(correct))

    def accuracies(rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each model's accuracy on the rows (the last axis), for every resample at once."""
        return {name: _ratio_or_nan(values[rows].sum(-1), units[rows].sum(-1)) for name, values in correct.items()}

    per_language, point, resampled = {}, {}, {}
    for language in sorted(set(languages.tolist())):
        rows = np.flatnonzero(languages == language)
        rng = np.random.default_rng([seed, zlib.crc32(str(language).encode("utf-8"))])
        point[language] = accuracies(rows)
        # In blocks of resamples, so that a language of many test rows never holds them all at once.
        block = max(1, _BOOTSTRAP_BLOCK_VALUES // rows.size)
        blocks = [accuracies(rows[rng.integers(0, rows.size, size=(min(block, resamples - start), rows.size))])
                  for start in range(0, resamples, block)]
        resampled[language] = {name: np.concatenate([part[name] for part in blocks]) for name in correct}
        per_language[language] = {name: _interval(statistic(point[language]), statistic(resampled[language]), level)
                                  for name, statistic in comparisons.items()}

    def averaged(by_language: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.mean([accuracy[name] for accuracy in by_language.values()], axis=0) for name in correct}

    language_average = {name: _interval(statistic(averaged(point)), statistic(averaged(resampled)), level)
                        for name, statistic in comparisons.items()}
    return {"per_language": per_language, "language_average": language_average}


def ablation_name(student: str) -> str:
    """The hard-label ablation of a student: "ablation" for the main student, "ablation:X" for extra student X."""
    return "ablation" if student == "student" else f"ablation:{student}"


def comparison_names(student: str) -> tuple[str, str]:
    """The interval keys of a student's lead over its ablation and of its retention."""
    if student == "student":
        return "student_minus_ablation", "retention"
    return f"{student}_minus_ablation", f"{student}_retention"


def is_distilled_student(name: str) -> bool:
    """A model of the evaluation that a teacher distilled (not the teacher, another teacher or an ablation)."""
    return name != "teacher" and not name.startswith(("teacher:", "ablation"))


def comparisons_of(models: Sequence[str]) -> dict[str, Callable[[dict], np.ndarray]]:
    """{interval key: statistic of the models' accuracies} for every distilled student among ``models``."""
    comparisons = {}
    for student in filter(is_distilled_student, models):
        minus, kept = comparison_names(student)
        ablation = ablation_name(student)
        if ablation in models:
            comparisons[minus] = lambda acc, s=student, a=ablation: acc[s] - acc[a]
        if "teacher" in models:
            comparisons[kept] = lambda acc, s=student: _ratio_or_nan(acc[s], acc["teacher"])
    return comparisons


def _ratio_or_nan(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _interval(estimate: np.ndarray, resampled: np.ndarray, level: float) -> dict:
    """The statistic and the central ``level`` of its resampled values; None where it is undefined."""
    finite = resampled[np.isfinite(resampled)]
    tail = 100 * (1 - level) / 2
    low, high = (np.percentile(finite, [tail, 100 - tail]) if finite.size else (None, None))
    return {"estimate": float(estimate) if np.isfinite(estimate) else None,
            "low": None if low is None else float(low), "high": None if high is None else float(high)}
