"""The student's architecture as a model config, without any weights.

``build_student`` (student/build.py) makes the student from it, and the knowledge contract
(student/contract.py) sizes layer maps and projections from it before any student exists; both
read it here, so the contract does not depend on building models.
"""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from polydistill.cluster.config import JobConfig, StudentConfig
from polydistill.storage.model_sources import resolve_model_source


class ModelSetupError(ValueError):
    """A model cannot be built as configured; the message names the config key to change."""


def student_config(student: StudentConfig, teacher_dir: Path) -> PretrainedConfig:
    """The teacher's config with the student's overrides applied (layers, width, heads, FFN)."""
    config = copy.deepcopy(AutoConfig.from_pretrained(teacher_dir))
    for key, value in student.config.items():
        if not hasattr(config, key):
            raise ModelSetupError(
                f"student.config.{key}: the {config.model_type} config has no such field "
                f"(fields include num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)"
            )
        setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise ModelSetupError(
            f"student.config: hidden_size {config.hidden_size} is not divisible by "
            f"num_attention_heads {config.num_attention_heads}"
        )
    return config


def student_model_config(config: JobConfig, teacher_dir: str | Path) -> PretrainedConfig:
    """The student's architecture as ``student.build.build_student`` makes it, without building it."""
    if config.student.model:
        return AutoConfig.from_pretrained(resolve_model_source(config.student.model))
    return student_config(config.student, Path(teacher_dir))
