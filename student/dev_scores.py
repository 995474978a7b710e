"""Accuracy on the dev split, per language: the teacher's while it fine-tunes and before it is
distilled, and the gate's baselines (the majority class of train, a short hard-label student run)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
from transformers import PreTrainedModel

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import JobSplit, TokenizedSplit, pad_token_id, tokenize_split
from polydistill.storage.teacher_splits import TeacherSplits
from polydistill.student.scoring import quality, tagging_quality
from polydistill.student.precision import use_bf16
from polydistill.student.supervised import DevScorer, train_supervised
from polydistill.student.teacher_gate import DevScores
from polydistill.student.devices import model_device

CLASSIFICATION_TASKS = ("sequence-classification", "token-classification")

# The gate's hard-label student: a quarter of an epoch, at most this many steps, shows what the
# student's architecture learns from the labels alone at little cost before anything starts (the
# full ablation trains beside distillation, for the report).
BASELINE_EPOCHS = 0.25
BASELINE_MAX_STEPS = 200


def accuracy_by_language(task: str, model: PreTrainedModel, rows: TokenizedSplit, pad_id: int,
                         label_names: list[str]) -> DevScores:
    """A classifier scored per row, a tagger per word, as evaluation scores them."""
    if task == "token-classification":
        result = tagging_quality(model, rows, pad_id, label_names)
    else:
        result = quality(model, rows, pad_id, len(label_names))
    return DevScores(float(result["overall"]["accuracy"]),
                     {language: float(entry["accuracy"]) for language, entry in sorted(result["per_language"].items())})


def dev_scorer(task: str, rows: TokenizedSplit, pad_id: int, label_names: list[str]) -> DevScorer:
    """What early stopping calls at each evaluation."""

    def score(model: PreTrainedModel) -> tuple[float, dict[str, float]]:
        scores = accuracy_by_language(task, model, rows, pad_id, label_names)
        return scores.overall, dict(scores.per_language)

    return score


def _targets(split: JobSplit) -> tuple[list[np.ndarray], list[str]]:
    """What a classifier is scored on in each row (its label, or each word's tag) and the row's language."""
    columns = split.dataset.with_format(None)
    if "tags" in columns.column_names:
        targets = [np.asarray(row, dtype=np.int64) for row in columns["tags"][:]]
    else:
        targets = [np.asarray([label], dtype=np.int64) for label in columns["label"][:]]
    return targets, columns["language"][:]


def majority_baseline(train: JobSplit, dev: JobSplit) -> tuple[str, DevScores]:
    """The training split's most frequent label (or tag), predicted for every dev row (or word)."""
    train_targets, _ = _targets(train)
    counts = Counter(int(value) for row in train_targets for value in row if value >= 0)
    if not counts:
        raise ValueError("the training split has no labelled rows to find the majority class of")
    majority = max(counts, key=lambda label: (counts[label], -label))  # a tie goes to the first label
    right: dict[str, int] = defaultdict(int)
    scored: dict[str, int] = defaultdict(int)
    for targets, language in zip(*_targets(dev)):
        targets = targets[targets >= 0]
        right[language] += int((targets == majority).sum())
        scored[language] += len(targets)
    per_language = {language: right[language] / scored[language] for language in sorted(scored) if scored[language]}
    overall = sum(right.values()) / max(1, sum(scored.values()))
    return train.label_names[majority], DevScores(overall, per_language)


def hard_label_baseline(config: JobConfig, student: PreTrainedModel, tokenizer, splits: TeacherSplits,
                        show_progress: bool = True) -> DevScores:
    """The student's architecture and initialisation trained briefly on the labels alone (as the
    ablation trains it, for BASELINE_EPOCHS), scored on the dev rows."""
    if config.student.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    training = config.training
    rows = tokenize_split(splits.train.dataset, tokenizer, config.data.max_length)
    batches_per_epoch = math.ceil(len(rows) / training.batch_size)
    pad_id = pad_token_id(tokenizer)
    train_supervised(
        student, rows, pad_id,
        epochs=min(BASELINE_EPOCHS, BASELINE_MAX_STEPS / batches_per_epoch), batch_size=training.batch_size,
        lr=training.lr, weight_decay=training.weight_decay, seed=training.seed, warmup_ratio=training.warmup_ratio,
        description="teacher gate: short hard-label student", show_progress=show_progress,
        bf16=use_bf16(training.precision == "bfloat16", model_device(student).type, "training.precision"),
    )
    dev_rows = tokenize_split(splits.dev.dataset, tokenizer, config.data.max_length)
    return accuracy_by_language(config.task, student, dev_rows, pad_id, splits.train.label_names)
