"""Sequence classification: one class per text (its spec: cluster/task_specs/sequence_classification.py).

The student learns the teacher's class probabilities (one teacher's, or several teachers' mixed) and
the gold labels, with the teacher's confident predictions where a sample has none
(distill.pseudo_label_threshold), and any features the contract asks for; it is scored by accuracy
and macro precision/recall/F1 per language.
"""

from __future__ import annotations

from polydistill.cluster.task_specs.sequence_classification import SPEC
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.objectives import Objective, classification_labels, classification_loss, classifier_forward
from polydistill.student.scoring import quality
from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest, TaskKind, scored_on_rows


def score_classifier(held_out: HeldOut, tested: ModelUnderTest, rows: TokenizedSplit, pad_id: int,
                     reference: dict | None) -> dict:
    return quality(tested.model, rows, pad_id, len(held_out.label_names))


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=classification_labels, forward=classifier_forward, loss=classification_loss),
    evaluate=scored_on_rows(score_classifier),
    metric="accuracy",
)
