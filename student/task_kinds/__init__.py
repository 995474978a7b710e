"""The task kinds, found by the config's ``task`` name: one module each (docs/DESIGN.md, point 11).

A kind's module names, in one ``TaskKind``, its objective (labels, forward pass, loss), what its
teacher computes on a work batch, how the feeder builds a work batch's tokens, and its evaluation
(quality and the report's metric); its spec (config checks, model class) is its namesake in
``cluster/task_specs/``, which says why a kind has the two. The trainer, the teacher replica, the
feeder and the evaluation ask ``task_kind`` and never branch on the name.

Adding a task kind: a module here and a line in ``TASK_KINDS``, its spec module and a line in
``TASK_SPECS``, and its name in the ``task`` Literal of ``cluster/config.py``.
"""

from __future__ import annotations

from polydistill.cluster.task_specs.spec import named_entry
from polydistill.student.task_kinds import (
    causal_lm,
    masked_lm,
    sentence_embedding,
    seq2seq,
    sequence_classification,
    token_classification,
)
from polydistill.student.task_kinds.base import TaskKind

TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (
    sequence_classification.KIND,
    token_classification.KIND,
    sentence_embedding.KIND,
    causal_lm.KIND,
    masked_lm.KIND,
    seq2seq.KIND,
)}


def task_kind(name: str) -> TaskKind:
    return named_entry(TASK_KINDS, name)
