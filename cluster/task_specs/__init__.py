"""The task kinds' specs, found by the config's ``task`` name; the checks every job config runs.

A task kind (docs/DESIGN.md, point 11) is two modules, one per layer it lives in:

- here, its spec (``TaskSpec``, schema layer, no torch): the config checks a job of the kind must
  pass, its Hugging Face auto class, and the facts other features' checks ask about;
- in ``student/task_kinds/``, its behaviour (work layer): the objective the student learns by, what
  the teacher computes, how the feeder builds its work batches, and its evaluation.

Why not one module: the config must refuse a bad combination wherever a config is validated
(``polydistill validate``, ``load_config``, a pydantic model built in a test or an actor), and the
config sits in the schema layer, which imports nothing above it. The behaviour needs torch, the losses
and the metrics, all higher up. A hook that the behaviour modules fill in when imported would leave the
checks unregistered wherever nothing imported them (``polydistill validate`` imports no torch, and would
then pass bad configs), or make every config load import torch (about 2 s). So the checks sit in a light
module per kind that the config imports directly, and the behaviour module names its spec.

Adding a task kind: its spec module here and a line in ``TASK_SPECS``, its behaviour module in
``student/task_kinds/`` and a line in ``TASK_KINDS``, and its name in the ``task`` Literal of
``cluster/config.py`` (tests/unit/test_task_kinds.py checks that the three agree).
"""

from __future__ import annotations

from collections.abc import Callable

from polydistill.cluster.task_specs import (
    causal_lm,
    masked_lm,
    sentence_embedding,
    seq2seq,
    sequence_classification,
    token_classification,
)
from polydistill.cluster.task_specs.spec import JobSettings, TaskSpec, named_entry

# In the order of the config's `task` Literal.
TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    sequence_classification.SPEC,
    token_classification.SPEC,
    sentence_embedding.SPEC,
    causal_lm.SPEC,
    masked_lm.SPEC,
    seq2seq.SPEC,
)}


def task_spec(name: str) -> TaskSpec:
    return named_entry(TASK_SPECS, name)


def check_task_settings(config: JobSettings) -> None:
    """Runs on every job config: the data layouts that only some kinds read, then the checks of the
    config's own kind."""
    spec = task_spec(config.task)
    data = config.data
    if spec.parallel_data != data.parallel:
        readers = " and ".join(_kinds_where(lambda kind: kind.parallel_data))
        raise ValueError(f"tasks {readers} learn from parallel sentences and only they do: task is {config.task} "
                         f"and data.parallel {data.parallel}; set both the task and data.parallel: true, or neither")
    if spec.word_tags != data.word_tags:
        taggers = " or ".join(_kinds_where(lambda kind: kind.word_tags))
        raise ValueError(f"task {taggers} learns one tag per word: set both task: {taggers} and data.word_tags: true "
                         "(label_column naming the tag column), or neither")
    if data.source_prefix is not None and not spec.translation:
        translators = " or ".join(_kinds_where(lambda kind: kind.translation))
        raise ValueError(f"data.source_prefix marks the target language of a translation: drop it, or set task: "
                         f"{translators}")
    spec.check(config)


def _kinds_where(has: Callable[[TaskSpec], bool]) -> list[str]:
    return [name for name, spec in TASK_SPECS.items() if has(spec)]
