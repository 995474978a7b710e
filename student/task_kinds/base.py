"""``TaskKind``: what one task kind does above the config, and the defaults most kinds share.

Each field is a plain function, so a kind's module reads as the functions it defines and the one
``TaskKind`` that names them; callers find it by the config's ``task`` (``task_kind``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from polydistill.cluster.config import JobConfig
from polydistill.cluster.task_specs.spec import TaskSpec
from polydistill.storage import wire
from polydistill.storage.job_data import JobSplit, TokenizedSplit, pad_rows, pad_token_id, tokenize_split
from polydistill.student.contract import KnowledgeRequest
from polydistill.student.efficiency import TimedWork
from polydistill.student.objectives import Objective
from polydistill.student.scoring import latency_work, sizes
from polydistill.student.teacher_pass import compute_knowledge


@dataclass(frozen=True)
class HeldOut:
    """The held-out split every model of a job is scored on, and the job as its evaluation sees it."""

    config: JobConfig
    split: JobSplit
    label_names: list[str]


@dataclass(frozen=True)
class ModelUnderTest:
    """A teacher or a student being scored: the model, its own tokenizer and the folder it was loaded from."""

    model: PreTrainedModel
    tokenizer: Any
    directory: Path


# (rows, the batch's row indices, epoch) -> input ids, attention mask, per-token labels (or None).
WorkTokens = Callable[[TokenizedSplit, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
# (the job, the teacher's tokenizer, its pad id) -> how the feeder builds each work batch's tokens.
WorkTokensOf = Callable[[JobConfig, Any, int], WorkTokens]


@dataclass(frozen=True)
class Costs:
    """What a model costs: its sizes, measured when it is scored, and the work its latencies are the time of,
    which evaluate_job times in the same rounds as the other models' (efficiency.interleaved_latency_ms)."""

    sizes: dict
    latency_work: dict[str, TimedWork]


# (held-out split, model, the teacher's quality or None, measure costs?) -> quality, costs (None when not measured).
Evaluation = Callable[[HeldOut, ModelUnderTest, dict | None, bool], tuple[dict, Costs | None]]
# (held-out split, model, its tokenized rows, pad id, the teacher's quality or None) -> quality.
RowScore = Callable[[HeldOut, ModelUnderTest, TokenizedSplit, int, dict | None], dict]


def padded_tokens(config: JobConfig, tokenizer: Any, pad_id: int) -> WorkTokens:
    """The texts' token ids as they are, padded to the batch's longest."""

    def tokens(rows: TokenizedSplit, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, None]:
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in indices], pad_id)
        return input_ids, attention_mask, None

    return tokens


def forward_pass_knowledge(model: PreTrainedModel, work: wire.WorkBatch, config: JobConfig, request: KnowledgeRequest,
                           *, teacher_id: str, autocast_bf16: bool) -> wire.Knowledge:
    """One forward pass of the teacher, keeping what the contract asks for (student/teacher_pass.py)."""
    return compute_knowledge(model, work, request, teacher_id=teacher_id, top_k=config.distill.top_k,
                             autocast_bf16=autocast_bf16)


def scored_on_rows(score: RowScore) -> Evaluation:
    """An evaluation that reads the held-out texts through the model's own tokenizer: ``score`` gives the
    quality, and the costs are measured on the same rows."""

    def evaluate(held_out: HeldOut, tested: ModelUnderTest, reference: dict | None,
                 with_costs: bool) -> tuple[dict, Costs | None]:
        pad_id = pad_token_id(tested.tokenizer)
        rows = tokenize_split(held_out.split.dataset, tested.tokenizer, held_out.config.data.max_length)
        quality = score(held_out, tested, rows, pad_id, reference)
        if not with_costs:
            return quality, None
        return quality, Costs(sizes(tested.model, tested.directory, rows), latency_work(tested.model, rows, pad_id))

    return evaluate


@dataclass(frozen=True)
class TaskKind:
    spec: TaskSpec  # the config checks and model class (cluster/task_specs/)
    objective: Objective  # what the student learns from a knowledge message
    # Scores a teacher or a student on the held-out split. The teacher is scored first; every later model
    # gets the teacher's quality as its reference (a language model's agreement with the teacher).
    evaluate: Evaluation
    metric: str  # the report's `metric`: what its `accuracy` (or primary score) column means
    primary_score: str = "accuracy"  # the score a student's retention of the teacher's is taken on
    # What the teacher computes on a work batch: (model, work batch, job, knowledge request, *, teacher_id,
    # autocast_bf16) -> knowledge.
    teacher_knowledge: Callable[..., wire.Knowledge] = forward_pass_knowledge
    work_tokens: WorkTokensOf = padded_tokens  # how the feeder builds a work batch's tokens
    # Files a saved student of this kind needs beyond the HF checkpoint, for stock libraries to load it as
    # the report measured it: (the student's folder, the job) -> None.
    portable_files: Callable[[Path, JobConfig], None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name
