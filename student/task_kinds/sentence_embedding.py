"""Sentence embedding from parallel sentences (its spec: cluster/task_specs/sentence_embedding.py).

The teacher embeds each English sentence (mean-pooled last layer); the student learns to map the
sentence *and* its translation onto that point (Reimers & Gurevych 2020), and is scored by bitext
retrieval in both directions (student/retrieval.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig

from polydistill.cluster.config import JobConfig
from polydistill.cluster.task_specs.sentence_embedding import SPEC
from polydistill.storage import wire
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.contract import EMBEDDING_PROJECTION, ContractError
from polydistill.student.losses import combine_losses, embedding_loss, mean_pool
from polydistill.student.objectives import (
    Objective,
    StudentRunner,
    TaskHead,
    float_tensor,
    missing_knowledge,
    no_labels,
)
from polydistill.student.retrieval import retrieval_quality
from polydistill.student.sentence_transformers_files import write_sentence_transformers_files
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest, TaskKind, scored_on_rows


def pair_forward(run: StudentRunner, head: TaskHead, knowledge: wire.Knowledge,
                 labels: np.ndarray | None) -> tuple[Tensor, Tensor]:
    """The mean-pooled last layer of each sentence and of its translation."""
    work = knowledge.work
    if knowledge.embeddings is None or work.pair_input_ids is None:
        raise ContractError(missing_knowledge(knowledge, "embeddings of parallel sentences",
                                              "task: sentence-embedding"))
    pooled = []
    for ids, mask in ((work.input_ids, work.attention_mask), (work.pair_input_ids, work.pair_attention_mask)):
        states = run(head.model, ids, mask, output_hidden_states=False, output_attentions=False).last_hidden_state
        pooled.append(mean_pool(states.float(), torch.from_numpy(mask.astype(np.bool_)).to(run.device)))
    return pooled[0], pooled[1]


def sentence_embedding_loss(pooled: tuple[Tensor, Tensor], knowledge: wire.Knowledge, labels: None,
                            head: TaskHead) -> tuple[Tensor, dict[str, float]]:
    """Parallel data (Reimers & Gurevych 2020): the student maps the English sentence *and* its
    translation onto the teacher's embedding of the English sentence."""
    distill, projections = head.config.distill, head.projections
    target = float_tensor(knowledge.embeddings, pooled[0].device)
    projection = projections[EMBEDDING_PROJECTION] if EMBEDDING_PROJECTION in projections else None
    terms = {term: embedding_loss(sentences, target, kind=distill.embedding_loss, projection=projection)
             for term, sentences in zip(("embedding", "translation"), pooled)}
    return combine_losses(terms, {"embedding": distill.embedding_weight, "translation": distill.embedding_weight})


def score_retrieval(held_out: HeldOut, tested: ModelUnderTest, rows: TokenizedSplit, pad_id: int,
                    reference: dict | None) -> dict:
    return retrieval_quality(tested.model, rows, pad_id)


def sentence_transformers_files(folder: Path, config: JobConfig) -> None:
    """``SentenceTransformer(folder)`` embeds as retrieval was scored: mean pooling, then L2 normalisation."""
    hidden_size = AutoConfig.from_pretrained(folder).hidden_size  # DistilBERT-style configs call it `dim`
    write_sentence_transformers_files(folder, hidden_size, config.data.max_length)


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=no_labels, forward=pair_forward, loss=sentence_embedding_loss),
    evaluate=scored_on_rows(score_retrieval),
    metric="bitext retrieval accuracy",
    portable_files=sentence_transformers_files,
)
