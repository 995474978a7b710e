"""What the student learns from a knowledge message: the ``Objective`` of a task kind, and the parts
that more than one kind's objective is built from.

An objective is three functions: the labels the task learns from (gold labels and pseudo-labels
of a classifier, the masked positions' tokens of a masked LM, the target tokens of a translation),
the student's forward pass the task needs, and its loss: the contract's terms, weighted, built from
the pure tensor functions of ``student/losses.py`` and ``student/lm_losses.py``. Each takes the head
it works with (``TaskHead``: the job as that task sees it, the model, its knowledge contract and
feature projections) as an argument, so a multi-task student runs every batch through its own task's
head and nothing is swapped in and out of the trainer. Each task kind's module (student/task_kinds/)
names its objective; a part only one kind uses lives in that kind's module, the shared ones here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polydistill.cluster.config import DistillConfig, JobConfig
from polydistill.storage import wire
from polydistill.student.contract import (
    ALIGNMENT_PROJECTION,
    EMBEDDING_PROJECTION,
    Contract,
    ContractError,
    hidden_projection_name,
    resolve_contract,
)
from polydistill.student.losses import (
    HiddenProjection,
    attention_kl,
    combine_losses,
    embedding_loss,
    ensemble_log_probs,
    hard_label_ce,
    hidden_state_loss,
    mean_pool,
    minilm_relation_loss,
    soft_label_kl,
    soft_label_kl_topk,
)
from polydistill.student.token_inputs import student_inputs

# Per language, counts such as {"passed": 3, "total": 4} (pseudo-labels) or per teacher {language: samples}.
Counts = dict[str, dict[str, int]]


@dataclass
class TaskHead:
    """The student as one task sees it: the job for that task, its model (a head on the shared encoder in a
    multi-task job), its knowledge contract and feature projections, and its weight among the tasks."""

    config: JobConfig
    model: nn.Module
    contract: Contract
    projections: nn.ModuleDict
    weight: float


@dataclass
class StudentOutputs:
    """What the student's forward pass produced; HF conventions (hidden_states[0] = embeddings)."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class StudentRunner:
    """Runs a student model on a batch's arrays: on its device, under bfloat16 autocast when training in
    bfloat16, reading the teacher's token ids through a trimmed vocabulary's table when it has one."""

    device: torch.device
    bf16: bool = False
    id_map: np.ndarray | None = None

    def __call__(self, model: nn.Module, token_ids: np.ndarray, mask: np.ndarray, **options: Any) -> Any:
        token_ids = token_ids if self.id_map is None else self.id_map[token_ids]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return model(input_ids=id_tensor(token_ids, self.device), attention_mask=id_tensor(mask, self.device),
                         **options)


def build_projections(contract: Contract) -> nn.ModuleDict:
    return nn.ModuleDict({name: HiddenProjection(s, t) for name, (s, t) in contract.projections.items()})


def task_head(knowledge: wire.Knowledge, main: TaskHead, heads: Mapping[str, TaskHead]) -> tuple[str | None, TaskHead]:
    """The batch's task and the head that learns it: (None, main) in a single-task job."""
    task = knowledge.work.task
    if not heads and task is None:
        return None, main
    task = task or "main"
    head = heads.get(task)
    if head is None and task != "main":
        raise ContractError(f"a batch of task {task!r}, which this student has no head for (extra_tasks: "
                            f"{sorted(heads)}); run the student with the job's own config")
    return task, head or main


def task_loss(task: str | None, head: TaskHead, loss: Tensor,
              terms: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """A multi-task job's loss of one batch: scaled by its task's weight, its terms named after the task."""
    if task is None:
        return loss, terms
    return loss * head.weight, {f"{task}.{name}": value for name, value in terms.items()}


# -- the objective of a task kind ----------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """The labels a batch is learnt from (and their per-language counts), the student's forward pass over
    it, and the loss of that pass: the three steps of ``StudentTrainer.loss``."""

    labels: Callable[[wire.Knowledge, JobConfig], tuple[np.ndarray | None, Counts]]
    forward: Callable[[StudentRunner, TaskHead, wire.Knowledge, np.ndarray | None], Any]
    loss: Callable[[Any, wire.Knowledge, np.ndarray | None, TaskHead], tuple[Tensor, dict[str, float]]]


# -- labels --------------------------------------------------------------------------------------------

def student_labels(work: wire.WorkBatch, config: JobConfig) -> np.ndarray | None:
    """The gold labels the student may learn from: none when withheld; -1 marks an unlabelled sample."""
    if config.data.withhold_labels:
        return None
    if config.data.word_tags:  # per token: the word's tag on its first sub-token
        return None if work.token_labels is None else np.where(work.token_labels < 0, -1, work.token_labels)
    return work.labels


def teacher_weights(config: JobConfig) -> dict[str, float]:
    return {name: config.teacher_section(name).weight for name in config.teacher_names}


def ensemble_soft_labels(knowledge: wire.Knowledge, weights: dict[str, float], temperature: float) -> wire.SoftLabels:
    """The teachers' weighted mixture at ``temperature`` as logits ``T * log p``: at the same T,
    ``soft_label_kl`` (and at T = 1 the pseudo-labels) then see exactly the mixture p."""
    votes = knowledge.ensemble
    unknown = [vote.teacher for vote in votes if vote.teacher not in weights]
    if unknown:
        raise ContractError(f"knowledge from teacher(s) {unknown} that this job does not list (teachers: "
                            f"{sorted(weights)}); run the student with the job's own config")
    log_p = ensemble_log_probs([torch.from_numpy(np.asarray(v.logits)) for v in votes],
                               [torch.from_numpy(np.asarray(v.served)) for v in votes],
                               [weights[v.teacher] for v in votes], temperature=temperature)
    return wire.SoftLabels.full((temperature * log_p).to(torch.float32).numpy())


def served_counts(knowledge: wire.Knowledge) -> Counts:
    """Per teacher of a several-teacher job, how many samples of each language it labelled in this batch."""
    counts: Counts = {}
    languages = knowledge.work.languages
    for vote in knowledge.ensemble:
        per_language = counts.setdefault(vote.teacher, {})
        for row in np.flatnonzero(vote.served):
            per_language[languages[row]] = per_language.get(languages[row], 0) + 1
    return counts


def teacher_predictions(soft: wire.SoftLabels) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's most likely class per sample and its probability (at temperature 1)."""
    if soft.per_token:
        raise ValueError("pseudo-labels are per sample; these soft labels are per token")
    if soft.kind == wire.SOFT_FULL:
        logits = soft.logits.astype(np.float64)
        predicted = logits.argmax(-1)
        top = np.take_along_axis(logits, predicted[:, None], -1)[:, 0]
        log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return predicted.astype(np.int64), np.exp(top - log_norm)
    # Top-k arrives sorted with the full logsumexp, so the first entry is exact.
    top = soft.topk_values[:, 0].astype(np.float64)
    return soft.topk_indices[:, 0].astype(np.int64), np.exp(top - soft.topk_logsumexp.astype(np.float64))


def pseudo_label(
    work: wire.WorkBatch,
    soft: wire.SoftLabels,
    threshold: float,
    labels: np.ndarray | None,
    withheld: np.ndarray | None = None,
) -> tuple[np.ndarray, Counts]:
    """``labels`` (or all -1) with the teacher's prediction filled in where the student has no label and
    the teacher's probability reaches ``threshold``; and per language, of the samples without a label,
    how many passed (``passed``/``total``). Given the ``withheld`` gold labels, also how many of those
    that passed were right (``correct``): they score the pseudo-labels and never train the student.
    """
    filled = np.full(work.n_samples, -1, dtype=np.int64) if labels is None else labels.astype(np.int64)
    unlabelled = filled < 0
    predicted, probability = teacher_predictions(soft)
    passed = unlabelled & (probability >= threshold)
    filled[passed] = predicted[passed]
    counts: Counts = {}
    for i in np.flatnonzero(unlabelled):
        entry = counts.setdefault(work.languages[i], {"passed": 0, "total": 0})
        entry["total"] += 1
        entry["passed"] += int(passed[i])
        if withheld is not None:
            entry["correct"] = entry.get("correct", 0) + int(passed[i] and predicted[i] == withheld[i])
    return filled, counts


def classification_labels(knowledge: wire.Knowledge, config: JobConfig) -> tuple[np.ndarray | None, Counts]:
    """The batch's hard labels, with pseudo-labels where configured, and their per-language counts."""
    work, threshold = knowledge.work, config.distill.pseudo_label_threshold
    labels = student_labels(work, config)
    if threshold is None:
        return labels, {}
    soft = ensemble_soft_labels(knowledge, teacher_weights(config), 1.0) if knowledge.ensemble else knowledge.soft
    if soft is None:
        return labels, {}
    withheld = work.labels if config.data.withhold_labels else None
    return pseudo_label(work, soft, threshold, labels, withheld)


def no_labels(knowledge: wire.Knowledge, config: JobConfig) -> tuple[None, Counts]:
    """Tasks whose targets are the teacher's alone, or the text itself (next tokens)."""
    return None, {}


# -- forward passes ------------------------------------------------------------------------------------

def classifier_forward(run: StudentRunner, head: TaskHead, knowledge: wire.Knowledge,
                       labels: np.ndarray | None) -> StudentOutputs:
    """Logits, and the hidden states and attention maps the contract compares."""
    work = knowledge.work
    # A student whose tokenizer is not the teacher's reads its own ids of the same texts where it can.
    ids, mask = student_inputs(work, head.config)
    output = run(head.model, ids, mask, output_hidden_states=head.contract.student_needs_hidden_states,
                 output_attentions=head.contract.student_needs_attentions)
    return StudentOutputs(logits=output.logits, hidden_states=output.hidden_states, attentions=output.attentions)


def lm_forward(run: StudentRunner, head: TaskHead, knowledge: wire.Knowledge, labels: np.ndarray | None) -> Tensor:
    work = knowledge.work
    return run(head.model, work.input_ids, work.attention_mask, output_hidden_states=False,
               output_attentions=False).logits


# -- losses --------------------------------------------------------------------------------------------

def distillation_losses(
    student: StudentOutputs | Tensor,
    knowledge: wire.Knowledge,
    config: JobConfig,
    contract: Contract | None = None,
    projections: nn.ModuleDict | dict[str, nn.Module] | None = None,
    labels: np.ndarray | None | str = "from_work",
) -> tuple[Tensor, dict[str, float]]:
    """Every loss term the contract asks for, weighted and summed; also each term's value for the log.

    ``student`` may be just the logits when only labels are distilled. ``labels`` are the hard labels
    the student learns from (-1: none for that sample); by default those of the work batch unless
    withheld. Terms: soft, hard, hidden (mean over layer pairs), attention (KL, or MiniLM relations
    when head counts differ; mean over pairs), embedding (mean-pooled last layer).
    """
    distill = config.distill
    outputs = student if isinstance(student, StudentOutputs) else StudentOutputs(logits=student)
    contract = contract if contract is not None else resolve_contract(distill, None, None)
    projections = dict(projections.items()) if projections is not None else {}
    if isinstance(labels, str):
        labels = student_labels(knowledge.work, config)
    logits, device = outputs.logits, outputs.logits.device
    terms: dict[str, Tensor] = {}
    soft = knowledge.soft
    if knowledge.ensemble:
        soft = ensemble_soft_labels(knowledge, teacher_weights(config), distill.temperature)
    mask = torch.from_numpy(knowledge.work.attention_mask.astype(np.bool_)).to(device)
    terms.update(label_terms(logits, soft, labels, distill, mask))

    if contract.hidden_pairs:
        terms["hidden"] = _mean([
            hidden_state_loss(
                _student_layer(outputs.hidden_states, s), _teacher_layer(knowledge, "hidden_states", t, device),
                mask=mask, kind=distill.hidden_loss, projection=projections.get(hidden_projection_name(s, t)),
            )
            for s, t in contract.hidden_pairs
        ])
    if contract.attention_mode == "kl":
        terms["attention"] = _mean([
            attention_kl(_student_layer(outputs.attentions, s - 1), _teacher_layer(knowledge, "attentions", t, device),
                         mask=mask)
            for s, t in contract.attention_pairs
        ])
    elif contract.attention_mode == "relation":
        terms["attention"] = _mean([
            minilm_relation_loss(
                _student_layer(outputs.hidden_states, s), _teacher_layer(knowledge, "hidden_states", t, device),
                mask=mask, num_relation_heads=contract.relation_heads,
            )
            for s, t in contract.attention_pairs
        ])
    if contract.request.embeddings:
        if knowledge.embeddings is None:
            raise ContractError(missing_knowledge(knowledge, "embeddings", "distill.embedding_weight"))
        # Pooled over the tokens the student read, which are its own when it reads its own ids.
        read_mask = torch.from_numpy(student_inputs(knowledge.work, config)[1].astype(np.bool_)).to(device)
        pooled = mean_pool(_student_layer(outputs.hidden_states, -1), read_mask)
        terms["embedding"] = embedding_loss(pooled, float_tensor(knowledge.embeddings, device),
                                            kind=distill.embedding_loss,
                                            projection=projections.get(EMBEDDING_PROJECTION))
    if contract.align:
        terms["align"] = alignment_term(outputs, knowledge.work, config, projections.get(ALIGNMENT_PROJECTION))
    if not terms:
        # Nothing in this batch to learn from (no label, and no pseudo-label reached the threshold). A zero loss
        # still makes it a step, so that steps and the ledger's batches stay equal (what a resume checks).
        return logits.sum() * 0.0, {"total": 0.0}
    return combine_losses(terms, loss_weights(distill))


def alignment_term(outputs: StudentOutputs, work: wire.WorkBatch, config: JobConfig,
                   projection: nn.Module | None) -> Tensor:
    """1 - cosine between the student's pooled last layer of each sample (over the tokens it read) and the
    teacher's embedding of the same sentence in distill.align_language; samples without one are skipped."""
    if work.align_targets is None:
        raise ContractError(
            f"batch {work.batch_id} of epoch {work.epoch} carries no align_targets, which distill.align_language "
            "asks for: do the feeder and the student run the same job config?")
    device = outputs.logits.device
    read_mask = torch.from_numpy(student_inputs(work, config)[1].astype(np.bool_)).to(device)
    pooled = mean_pool(_student_layer(outputs.hidden_states, -1), read_mask)
    found = torch.from_numpy(work.align_found.astype(np.bool_)).to(device)
    if not bool(found.any()):
        return pooled.sum() * 0.0
    return embedding_loss(pooled[found], float_tensor(work.align_targets, device)[found], kind="cosine",
                          projection=projection)


def label_terms(logits: Tensor, soft: wire.SoftLabels | None, labels: np.ndarray | None, distill: DistillConfig,
                mask: Tensor | None = None) -> dict[str, Tensor]:
    """The terms on the student's logits: the teacher's soft labels (full or top-k) and the hard labels
    (-1: none for that sample). One definition for distillation and for compression's recovery, so
    the same knowledge and weights give the same loss in both."""
    terms: dict[str, Tensor] = {}
    device = logits.device
    if soft is not None and distill.soft_weight > 0:
        if soft.kind == wire.SOFT_FULL:
            # Per-token soft labels (a tagger) count every real token of the batch.
            terms["soft"] = soft_label_kl(logits, float_tensor(soft.logits, device), temperature=distill.temperature,
                                          mask=mask if soft.per_token else None)
        else:
            terms["soft"] = soft_label_kl_topk(
                logits,
                float_tensor(soft.topk_values, device),
                torch.from_numpy(soft.topk_indices.astype(np.int64)).to(device),
                float_tensor(soft.topk_logsumexp, device),
                temperature=distill.temperature,
            )
    if labels is not None and distill.hard_weight > 0 and (labels >= 0).any():
        terms["hard"] = hard_label_ce(logits, torch.tensor(labels, dtype=torch.int64, device=device), ignore_index=-1)
    return terms


def loss_weights(distill: DistillConfig) -> dict[str, float]:
    return {"soft": distill.soft_weight, "hard": distill.hard_weight, "hidden": distill.hidden_weight,
            "attention": distill.attention_weight, "embedding": distill.embedding_weight,
            "align": distill.align_weight}


def classification_loss(outputs: StudentOutputs, knowledge: wire.Knowledge, labels: np.ndarray | None,
                        head: TaskHead) -> tuple[Tensor, dict[str, float]]:
    """Sequence and token classification (one teacher or several, with pseudo-labels in ``labels``)."""
    return distillation_losses(outputs, knowledge, head.config, head.contract, head.projections, labels)


# -- helpers -------------------------------------------------------------------------------------------

def token_top_k(knowledge: wire.Knowledge, device: torch.device, task: str) -> tuple[Tensor, Tensor, Tensor]:
    """A language model's per-token soft labels as (top-k values, indices, log-sum-exp); top_k at or above the
    vocabulary ships the whole distribution, used as a top-V."""
    soft = knowledge.soft
    if soft is None or not soft.per_token:
        raise ContractError(missing_knowledge(knowledge, "per-token soft labels",
                                              f"task {task}'s distill.soft_weight"))
    if soft.kind == wire.SOFT_FULL:
        full = float_tensor(soft.logits, device)
        return full, torch.arange(full.shape[-1], device=device).expand(full.shape), torch.logsumexp(full, dim=-1)
    return (float_tensor(soft.topk_values, device), id_tensor(soft.topk_indices, device),
            float_tensor(soft.topk_logsumexp, device))


def lm_loss_settings(distill: DistillConfig) -> dict:
    return {"kind": distill.lm_loss, "temperature": distill.temperature, "beta": distill.gjs_beta}


def float_tensor(array: np.ndarray, device: torch.device) -> Tensor:
    # astype copies: wire arrays are read-only views of the message, and features travel as float16.
    return torch.from_numpy(array.astype(np.float32)).to(device)


def id_tensor(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array.astype(np.int64)).to(device)


def _mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()


def _student_layer(layers: tuple[Tensor, ...] | None, index: int) -> Tensor:
    if layers is None:
        raise ValueError("the student's forward pass returned no hidden states or attentions, which the "
                         "knowledge contract needs (run it with output_hidden_states / output_attentions)")
    # Autocast may leave bf16 features; the losses and the float32 projections work in float32.
    return layers[index].float()


def _teacher_layer(knowledge: wire.Knowledge, kind: str, layer: int, device: torch.device) -> Tensor:
    layers = getattr(knowledge, kind)
    if layer not in layers:
        field_name = "distill.hidden_layers" if kind == "hidden_states" else "distill.attention_layers"
        raise ContractError(missing_knowledge(knowledge, f"{kind} of teacher layer {layer}", field_name))
    return float_tensor(layers[layer], device)


def missing_knowledge(knowledge: wire.Knowledge, what: str, field_name: str) -> str:
    return (f"knowledge from {knowledge.teacher_id} carries no {what}, which {field_name} asks for: do the teacher "
            "replicas run the same job config as the student?")
