"""The student scored on the dev split at the end of every epoch (``training.validate_each_epoch``), and
the weights of the best-scoring epoch kept as the student (``training.keep_best``). The ablation is
selected the same way (student/evaluate.py), so the two stay comparable.

An epoch ends for validation when the ledger holds every one of its batches. Batches of the next
epoch may already have been applied by then (several teacher replicas interleave at the boundary),
so a score is "after epoch e", give or take a few batches; it is reported with the step it was taken
at. An epoch with a dead-lettered batch never completes and is not scored."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import load_job_split, pad_token_id, tokenize_split
from polydistill.storage.ledger import EpochLedger
from polydistill.student.scoring import quality

NEVER_STOP = 10**9  # patience for after_dev_score: epochs are scored to choose one, not to stop early


def epochs_to_validate(ledger: EpochLedger, validated: Iterable[int]) -> list[int]:
    """Epochs whose every batch is applied and that have no score yet, in order."""
    done = set(validated)
    return [epoch for epoch in range(ledger.epochs)
            if epoch not in done and len(ledger.applied.get(epoch, ())) == ledger.batches_per_epoch]


def best_weights_file(epoch: int | str) -> str:
    """The file (in the checkpoint folder) of the best epoch's weights; ``"*"`` gives the pattern of all."""
    return f"best_weights.epoch{epoch}.pt"


def label_names_of(model: PreTrainedModel) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes (frozen embeddings stay out: they are the same in every epoch)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)


class DevValidation:
    """The dev rows, read through the student's own tokenizer; called with a model, it gives the
    model's dev accuracy and its accuracy per language (a ``supervised.DevScorer``)."""

    def __init__(self, config: JobConfig, tokenizer_dir: Path, label_names: list[str]):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        dev = load_job_split(config.data, config.data.dev_split, label_names=label_names)
        self.rows = tokenize_split(dev.dataset, tokenizer, config.data.max_length)
        self.pad_id = pad_token_id(tokenizer)
        self.num_labels = len(label_names)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[float, dict[str, float]]:
        was_training = model.training
        try:
            scores = quality(model, self.rows, self.pad_id, self.num_labels)
        finally:
            model.train(was_training)
        return (scores["overall"]["accuracy"],
                {language: metrics["accuracy"] for language, metrics in scores["per_language"].items()})
