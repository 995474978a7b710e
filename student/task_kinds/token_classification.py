"""Token classification: one tag per word (its spec: cluster/task_specs/token_classification.py).

Work batches carry each word's tag on its first sub-token; the student learns the tagger teacher's
class probabilities at every token and those tags, as a classifier learns per sample, and is scored
per word (each word's prediction from its first sub-token) with macro precision/recall/F1 over the
tags beside the accuracy.
"""

from __future__ import annotations

import numpy as np

from polydistill.cluster.config import JobConfig
from polydistill.cluster.task_specs.token_classification import SPEC
from polydistill.storage.job_data import TokenizedSplit, pad_labels, pad_rows
from polydistill.student.objectives import Objective, classification_labels, classification_loss, classifier_forward
from polydistill.student.scoring import tagging_quality
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest, TaskKind, WorkTokens, scored_on_rows


def tagged_tokens(config: JobConfig, tokenizer, pad_id: int) -> WorkTokens:
    """The texts' token ids, with each word's tag on its first sub-token (-100 on the others)."""

    def tokens(rows: TokenizedSplit, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in indices], pad_id)
        return input_ids, attention_mask, pad_labels([rows.token_labels[i] for i in indices], input_ids.shape[1])

    return tokens


def score_tagger(held_out: HeldOut, tested: ModelUnderTest, rows: TokenizedSplit, pad_id: int,
                 reference: dict | None) -> dict:
    return tagging_quality(tested.model, rows, pad_id, held_out.label_names)


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=classification_labels, forward=classifier_forward, loss=classification_loss),
    evaluate=scored_on_rows(score_tagger),
    metric="word tagging accuracy",  # macro precision/recall/F1 over the tags beside it
    work_tokens=tagged_tokens,
)
