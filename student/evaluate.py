"""Teacher and student measured side by side on the same held-out data, per language.

Quality (accuracy, macro precision/recall/F1) and efficiency (parameters, size on disk, CPU
latency) go into one report section each, with the student's retention of the teacher's score.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import JobSplit, TokenizedSplit, load_job_split, pad_rows, pad_token_id, tokenize_split
from polydistill.storage.masking import mask_tokens
from polydistill.storage.token_tags import token_predictions_to_words
from polydistill.student.build import model_class
from polydistill.student.precision import use_bf16
from polydistill.student.efficiency import (
    count_parameters,
    disk_bytes,
    mean_tokens_per_language,
    measure_latency,
    measure_latency_per_row,
    spread_over_languages,
)
from polydistill.student.lm_eval import lm_quality
from polydistill.student.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE_LEVEL,
    bootstrap_intervals,
    classification_metrics,
    per_language_metrics,
    retention,
)
from polydistill.student.retrieval import retrieval_quality
from polydistill.student.token_metrics import tagging_metrics
from polydistill.student.translation_eval import translate, translation_scores
from polydistill.student.supervised import train_supervised
from polydistill.student.teacher_gate import read_teacher_record

EVAL_BATCH = 64
# Latency is measured on this many held-out rows spread evenly over the languages, drawn with this
# seed (the same rows on every run): batch-32 latency on all of them at once, batch-1 latency on
# each of them alone.
LATENCY_ROWS = 32
LATENCY_SEED = 0


@torch.inference_mode()
def predict(model, rows: TokenizedSplit, pad_id: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Predicted label per row; rows are batched by length so padding costs little."""
    model.eval()
    order = np.argsort(rows.lengths, kind="stable")
    predictions = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        logits = model(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
        ).logits
        predictions[index] = logits.argmax(-1).numpy()
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
    order = np.argsort(rows.lengths, kind="stable")
    predicted: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(rows)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        logits = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(attention_mask.astype(np.int64))).logits
        best = logits.argmax(-1).numpy()
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


def translation_quality(config: JobConfig, model, tokenizer, split: JobSplit, model_dir: Path) -> tuple[dict, dict]:
    """The model translates the held-out sources; BLEU and chrF per language against the references
    (sacrebleu, on its 0-100 scale). Also its size and the time to translate one sentence and 32."""
    columns = split.dataset.with_format(None)
    sources, references, languages = columns["text"][:], columns["pair"][:], columns["language"][:]
    settings = {"num_beams": config.evaluation.num_beams, "max_new_tokens": config.data.max_length,
                "max_length": config.data.max_length}
    started = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, **settings)
    seconds = time.perf_counter() - started
    scores = translation_scores(hypotheses, references, languages)
    quality = {"overall": {**scores["overall"], "sentences_per_s": round(len(sources) / seconds, 2)},
               "per_language": scores["per_language"],
               "examples": [{"language": languages[i], "source": sources[i], "reference": references[i],
                             "translation": hypotheses[i]} for i in range(min(3, len(sources)))]}
    sample = latency_sample(languages)

    def milliseconds_to_translate(texts: list[str]) -> float:
        started = time.perf_counter()
        translate(model, tokenizer, texts, **settings)
        return 1000 * (time.perf_counter() - started)

    encoded = tokenizer(sources, truncation=True, max_length=config.data.max_length)["input_ids"]
    source_lengths = [len(ids) for ids in encoded]
    costs = {
        **count_parameters(model),
        "disk_bytes": disk_bytes(model_dir),
        "latency_ms_batch1": round(float(np.mean([milliseconds_to_translate([sources[i]]) for i in sample])), 3),
        "latency_ms_batch32": round(milliseconds_to_translate([sources[i] for i in sample]), 3),
        "latency_sample_mean_tokens": round(float(np.mean([source_lengths[i] for i in sample])), 2),
        "mean_tokens_per_row": mean_tokens_per_language(source_lengths, languages),
    }
    return quality, costs


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


def efficiency(model, model_dir: Path, rows: TokenizedSplit, pad_id: int) -> dict:
    """Size, latency on the rows of `latency_sample`, and the model's tokens per row in each language."""
    sample = latency_sample(rows.languages)
    batch1 = measure_latency_per_row(model, [_model_inputs([rows.token_ids[i]], pad_id) for i in sample],
                                     repeats=3, warmup=3)
    batch32 = measure_latency(model, _model_inputs([rows.token_ids[i] for i in sample], pad_id),
                              batch_size=32, repeats=5, warmup=1)
    return {
        **count_parameters(model),
        "disk_bytes": disk_bytes(model_dir),
        "latency_ms_batch1": round(batch1["latency_ms"], 3),
        "latency_ms_batch32": round(batch32["latency_ms"], 3),
        "samples_per_s_batch32": round(batch32["samples_per_s"], 1),
        "latency_sample_mean_tokens": round(float(np.mean([len(rows.token_ids[i]) for i in sample])), 2),
        "mean_tokens_per_row": mean_tokens_per_language(rows.lengths, rows.languages),
    }


def side_by_side(results: dict[str, dict], primary: str = "accuracy") -> dict:
    """{name: quality} for teacher, student (and others) → the report's per_language / overall sections;
    retention is the student's ``primary`` score over the teacher's."""
    teacher = results["teacher"]
    languages = sorted(teacher["per_language"])
    per_language = {}
    for language in languages:
        row = {name: result["per_language"][language] for name, result in results.items()}
        row["retention"] = retention(row["student"][primary], row["teacher"][primary])
        per_language[language] = row
    overall = {name: result["overall"] for name, result in results.items()}
    overall["retention"] = retention(overall["student"][primary], overall["teacher"][primary])
    # The mean of per-language scores weighs every language equally, however many test rows it has.
    overall["language_average"] = {
        name: float(np.mean([per_language[lang][name][primary] for lang in languages])) for name in results
    }
    overall["retention_min_language"] = min(
        (row["retention"] for row in per_language.values() if row["retention"] is not None), default=None
    )
    return {"per_language": per_language, "overall": overall}


def add_confidence_intervals(report: dict, results: dict[str, dict], languages: list[str]) -> None:
    """Paired bootstrap intervals (student/metrics.py) of student - ablation and of retention, into each
    language's entry and, for the average over languages, into the overall section."""
    intervals = bootstrap_intervals({name: result["row_correct"] for name, result in results.items()}, languages,
                                    units=results["teacher"].get("row_units"))
    for language, entry in intervals["per_language"].items():
        report["per_language"][language]["intervals"] = entry
    report["overall"]["intervals"] = {
        "language_average": intervals["language_average"],
        "method": "paired bootstrap over each language's test rows (percentile intervals)",
        "level": CONFIDENCE_LEVEL, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
    }


def evaluate_job(config: JobConfig, teacher_dir: Path, student_dir: Path, label_names: list[str],
                 extra_models: dict[str, Path] | None = None) -> dict:
    """Every model scored on the same held-out rows, each read through its own tokenizer
    (a student with a trimmed vocabulary has its own)."""
    torch.set_num_threads(os.cpu_count() or 1)
    split = load_job_split(config.data, config.data.eval_split, label_names=label_names)
    models = {"teacher": teacher_dir, "student": student_dir, **(extra_models or {})}
    results, costs = {}, {}
    for name, model_dir in models.items():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = model_class(config.task).from_pretrained(model_dir)
        if config.task == "seq2seq":  # translations generated from the texts and scored with BLEU and chrF
            results[name], costs_of = translation_quality(config, model, tokenizer, split, model_dir)
            if name in ("teacher", "student") and config.evaluation.latency:
                costs[name] = costs_of
            continue
        pad_id = pad_token_id(tokenizer)
        rows = tokenize_split(split.dataset, tokenizer, config.data.max_length)
        if config.task == "sentence-embedding":
            results[name] = retrieval_quality(model, rows, pad_id)
        elif config.task == "causal-lm":  # the teacher comes first; the others are scored against it too
            results[name] = lm_quality(model, rows, pad_id, reference=results.get("teacher"))
        elif config.task == "masked-lm":
            results[name] = lm_quality(model, rows, pad_id, reference=results.get("teacher"),
                                       masking=eval_masking(config, tokenizer, rows))
        elif config.task == "token-classification":
            results[name] = tagging_quality(model, rows, pad_id, label_names)
        else:
            results[name] = quality(model, rows, pad_id, len(label_names))
        if name in ("teacher", "student") and config.evaluation.latency:
            costs[name] = efficiency(model, model_dir, rows, pad_id)
    report = side_by_side(results, primary="chrf" if config.task == "seq2seq" else "accuracy")
    if all("row_correct" in result for result in results.values()):  # classifiers and taggers
        add_confidence_intervals(report, results, split.dataset.with_format(None)["language"][:])
    if costs:
        costs["latency_sample"] = describe_latency_sample(split)
        costs["speedup_batch1"] = round(costs["teacher"]["latency_ms_batch1"] / costs["student"]["latency_ms_batch1"], 3)
        costs["speedup_batch32"] = round(
            costs["teacher"]["latency_ms_batch32"] / costs["student"]["latency_ms_batch32"], 3
        )
        costs["param_ratio"] = round(costs["student"]["params"] / costs["teacher"]["params"], 4)
        costs["disk_ratio"] = round(costs["student"]["disk_bytes"] / costs["teacher"]["disk_bytes"], 4)
    report["efficiency"] = costs
    report["eval_samples"] = len(split.dataset)
    report["metric"] = "bitext retrieval accuracy" if config.task == "sentence-embedding" else "accuracy"
    if config.task == "causal-lm":
        report["metric"] = "next-token accuracy"  # per language beside perplexity and agreement (student/lm_eval.py)
    if config.task == "masked-lm":
        report["metric"] = "masked-token accuracy"
    if config.task == "token-classification":
        report["metric"] = "word tagging accuracy"  # macro precision/recall/F1 over the tags beside it
    if config.task == "seq2seq":
        report["metric"] = "chrF"  # BLEU beside it
    # How the teacher was fine-tuned and how it fared against the baselines on dev, when this job prepared it.
    teacher_record = read_teacher_record(Path(config.output_dir).resolve(), teacher_dir)
    if teacher_record is not None:
        report["teacher_finetune"] = teacher_record
    return report


# Held-out text is masked with this epoch number: one fixed draw, never one of training's epochs.
EVAL_MASKING_EPOCH = 2**31 - 1


def eval_masking(config: JobConfig, tokenizer, rows: TokenizedSplit):
    """Row i of the held-out split as every model sees it: masked the same way for all of them."""
    special = frozenset(tokenizer.all_special_ids)

    def masked(i: int):
        return mask_tokens(rows.token_ids[i], seed=config.training.seed, epoch=EVAL_MASKING_EPOCH,
                           sample_id=int(rows.sample_ids[i]), mask_id=tokenizer.mask_token_id,
                           vocab_size=len(tokenizer), special_ids=special, rate=config.distill.mask_rate)
    return masked


def train_ablation(config: JobConfig, student_init_dir: Path, out_dir: Path, train: JobSplit,
                   show_progress: bool = True, threads: int | None = None) -> Path:
    """The student's architecture and initialisation trained on hard labels alone, same data and
    schedule as the distilled student: the report's baseline for what the teacher added."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(student_init_dir)
    model = model_class(config.task).from_pretrained(student_init_dir)
    if config.student.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    rows = tokenize_split(train.dataset, tokenizer, config.data.max_length)
    training = config.training
    train_supervised(
        model, rows, pad_token_id(tokenizer),
        epochs=training.epochs, batch_size=training.batch_size, lr=training.lr,
        weight_decay=training.weight_decay, seed=training.seed, warmup_ratio=training.warmup_ratio,
        description="ablation: hard labels only", show_progress=show_progress,
        bf16=use_bf16(config.training.precision == "bfloat16", "cpu", "training.precision"),
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
