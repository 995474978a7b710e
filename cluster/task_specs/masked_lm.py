"""Masked language modelling's spec: an encoder's distributions over the vocabulary at masked positions
(top-k). Its behaviour: student/task_kinds/masked_lm.py."""

from __future__ import annotations

from polydistill.cluster.task_specs.language_model import check_language_model
from polydistill.cluster.task_specs.spec import TaskSpec

SPEC = TaskSpec(name="masked-lm", auto_class="AutoModelForMaskedLM", check=check_language_model)
