"""What one model scores and costs on held-out rows, per language.

A classifier's quality (accuracy, macro precision/recall/F1) and a tagger's (per word), and a model's
size and CPU latency on a fixed sample of rows spread over the languages. The task kinds' evaluations
(student/task_kinds/) are built from these, and so are the compression report and the dev scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from polydistill.storage.job_data import JobSplit, TokenizedSplit, pad_rows
from polydistill.storage.token_tags import token_predictions_to_words
from polydistill.student.efficiency import (
    TimedWork,
    count_parameters,
    disk_bytes,
    forward_work,
    mean_tokens_per_language,
    spread_over_languages,
)
from polydistill.student.metrics import classification_metrics, per_language_metrics
from polydistill.student.token_metrics import tagging_metrics
from polydistill.student.devices import model_device

EVAL_BATCH = 64
# Latency is measured on this many held-out rows spread evenly over the languages, drawn with this
# seed (the same rows on every run): batch-32 latency on all of them at once, batch-1 latency on
# each of them alone.
LATENCY_ROWS = 32
LATENCY_SEED = 0
LATENCY_BATCH = 32
# The latencies a model's costs report, each the time of one unit of its work (``latency_work``).
LATENCY_FIGURES = ("latency_ms_batch1", "latency_ms_batch32")
# Rounds of timing, each running every model's work once (efficiency.interleaved_latency_ms): the median
# over them is each latency. The compression stages' rows use this (all stages in the same rounds); the
# evaluation of teacher and students takes evaluation.latency_rounds (cluster/config.py, default the same 5).
LATENCY_ROUNDS = 5


@torch.inference_mode()
def predict(model, rows: TokenizedSplit, pad_id: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Predicted label per row; rows are batched by length so padding costs little."""
    model.eval()
    device = model_device(model)  # a GPU (a student scored mid-training, a stage given one); onnxruntime: the CPU
    order = np.argsort(rows.lengths, kind="stable")
    predictions = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        logits = model(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)).to(device),
            attention_mask=torch.from_numpy(attention_mask.astype(np.int64)).to(device),
        ).logits
        predictions[index] = logits.argmax(-1).cpu().numpy()
    return predictions


def quality(model, rows: TokenizedSplit, pad_id: int, num_labels: int) -> dict:
    """Scores per language and overall; ``row_correct``, 1 or 0 per row, is what the confidence intervals
    resample (it stays out of the report)."""
    predicted = predict(model, rows, pad_id)
    return {
        "overall": classification_metrics(rows.labels, predicted, num_labels),
        "per_language": per_language_metrics(rows.labels, predicted, rows.languages, num_labels),
        "row_correct": (predicted == rows.labels).astype(np.int64),
    }


@torch.inference_mode()
def tagging_quality(model, rows: TokenizedSplit, pad_id: int, label_names: list[str],
                    batch_size: int = EVAL_BATCH) -> dict:
    """A tagger scored per word (each word's prediction from its first sub-token), per language."""
    model.eval()
    device = model_device(model)
    order = np.argsort(rows.lengths, kind="stable")
    predicted: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(rows)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        logits = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)).to(device),
                       attention_mask=torch.from_numpy(attention_mask.astype(np.int64)).to(device)).logits
        best = logits.argmax(-1).cpu().numpy()
        for row, i in enumerate(index):
            word_ids = [None if w < 0 else int(w) for w in rows.word_ids[i]]
            predicted[i] = token_predictions_to_words(word_ids, best[row, : len(word_ids)], len(rows.word_tags[i]))
    scores = tagging_metrics(rows.word_tags, predicted, rows.languages, label_names)

    def in_report_terms(entry: dict) -> dict:  # the keys the side-by-side report reads
        return {"accuracy": entry["accuracy"], "macro_precision": entry["precision"],
                "macro_recall": entry["recall"], "macro_f1": entry["f1"], "n": entry["words"]}

    # Per row, the words tagged right and the words scored: what the confidence intervals resample.
    return {"overall": {**in_report_terms(scores["overall"]), "per_tag": scores["per_tag"]},
            "per_language": {language: in_report_terms(entry) for language, entry in scores["per_language"].items()},
            "row_correct": np.asarray([int(((p == g) & (g >= 0)).sum()) for p, g in zip(predicted, rows.word_tags)]),
            "row_units": np.asarray([int((g >= 0).sum()) for g in rows.word_tags])}


def latency_sample(languages: list[str]) -> list[int]:
    """The held-out rows latency is measured on: LATENCY_ROWS of them, spread evenly over the languages."""
    return spread_over_languages(languages, LATENCY_ROWS, seed=LATENCY_SEED)


def describe_latency_sample(split: JobSplit) -> dict:
    """Which rows the latencies were measured on, for the report's efficiency section."""
    columns = split.dataset.with_format(None)
    languages, sample_ids = columns["language"][:], columns["sample_id"][:]
    sample = latency_sample(languages)
    return {
        "rows": len(sample),
        "seed": LATENCY_SEED,
        "rows_per_language": dict(sorted(Counter(languages[i] for i in sample).items())),
        "sample_ids": [int(sample_ids[i]) for i in sample],
    }


def _model_inputs(token_ids: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_rows(token_ids, pad_id)
    return {
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
    }


def batch_of_sample(sample: list[int]) -> list[int]:
    """The rows of the batch-32 latency: the sample, cycled to fill the batch when it is shorter (a small
    held-out split)."""
    return [sample[i % len(sample)] for i in range(LATENCY_BATCH)]


def latency_work(model, rows: TokenizedSplit, pad_id: int, sample: list[int] | None = None) -> dict[str, TimedWork]:
    """The two latencies the report gives, as work to time: each row of `latency_sample` alone (batch 1, a
    unit a row) and all of them as one batch (batch 32). ``sample``: those rows, when drawn already."""
    sample = latency_sample(rows.languages) if sample is None else sample
    if not sample:
        raise ValueError("latency needs at least one held-out row: the evaluation split is empty")
    return {
        "latency_ms_batch1": forward_work(model, [_model_inputs([rows.token_ids[i]], pad_id) for i in sample]),
        "latency_ms_batch32": forward_work(
            model, [_model_inputs([rows.token_ids[i] for i in batch_of_sample(sample)], pad_id)]),
    }


def latency_figures(latency_ms: Mapping[str, float]) -> dict:
    """The report's latency entries of one model from its timed `latency_work`."""
    return {**{figure: round(latency_ms[figure], 3) for figure in LATENCY_FIGURES},
            "samples_per_s_batch32": round(LATENCY_BATCH * 1e3 / latency_ms["latency_ms_batch32"], 1)}


def sizes(model, model_dir: Path, rows: TokenizedSplit) -> dict:
    """Parameters, size on disk, and the model's tokens per row: in each language and on the latency sample."""
    sample = latency_sample(rows.languages)
    return {
        **count_parameters(model),
        "disk_bytes": disk_bytes(model_dir),
        "latency_sample_mean_tokens": round(float(np.mean([len(rows.token_ids[i]) for i in sample])), 2),
        "mean_tokens_per_row": mean_tokens_per_language(rows.lengths, rows.languages),
    }
