"""The student as it trains: its model, knowledge contract and feature projections (a ``TaskHead``),
and a multi-task job's extra heads, each tied to the student's one encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from polydistill.cluster.config import JobConfig
from polydistill.student.build import model_class, task_folder
from polydistill.student.contract import (
    TEACHER_CONFIG_FILE,
    Contract,
    ContractError,
    load_teacher_config,
    resolve_contract,
    wants_features,
)
from polydistill.student.objectives import TaskHead, build_projections


def student_contract(init_dir: Path, config: JobConfig) -> Contract:
    """The knowledge contract of the student in ``init_dir``, from the teacher's config saved beside it."""
    teacher_config = load_teacher_config(init_dir)
    if teacher_config is None and wants_features(config.distill):
        raise ContractError(
            f"distill asks for hidden states, attention or embeddings, but {init_dir} has no "
            f"{TEACHER_CONFIG_FILE} (the driver's prepare_student writes it): prepare the student again"
        )
    return resolve_contract(config.distill, teacher_config, AutoConfig.from_pretrained(init_dir))


def main_head(config: JobConfig, init_dir: Path, device: torch.device) -> tuple[TaskHead, dict]:
    """The student to train as the job's main task sees it, and the model config values set for training
    only (to restore before saving the student)."""
    contract = student_contract(init_dir, config)
    student_config = AutoConfig.from_pretrained(init_dir)
    overrides: dict = {}
    if contract.student_needs_attentions:
        # Compared attention maps must be distributions: eager attention materialises them, and attention
        # dropout would zero entries of the student's (HF returns the maps after dropout).
        overrides["attn_implementation"] = "eager"
        if hasattr(student_config, "attention_probs_dropout_prob"):
            overrides["attention_probs_dropout_prob"] = 0.0
    training_only = {key: getattr(student_config, key) for key in overrides if key != "attn_implementation"}
    model = model_class(config.task).from_pretrained(init_dir, **overrides).to(device)
    if config.student.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    projections = build_projections(contract).to(device)
    return TaskHead(config, model, contract, projections, config.task_weight), training_only


def tie_task_heads(main: TaskHead, init_dir: Path, device: torch.device) -> dict[str, TaskHead]:
    """A multi-task job's extra heads, each on the main model's encoder (one set of encoder weights).
    Their parameters live in the main head's projections (under ``task_<name>``), so checkpoints hold them."""
    heads: dict[str, TaskHead] = {}
    encoder = main.model.base_model
    for section in main.config.extra_tasks:
        folder = task_folder(init_dir, section.name)
        seen_as = main.config.for_task(section.name)
        if section.task == "sentence-embedding":
            model = encoder  # the embedding is the encoder's own mean-pooled output
        else:
            model = model_class(section.task).from_pretrained(folder).to(device)
            setattr(model, model.base_model_prefix, encoder)
        contract = student_contract(folder, seen_as)
        projections = build_projections(contract).to(device)
        main.projections[f"task_{section.name}"] = nn.ModuleDict({"model": model, "projections": projections})
        heads[section.name] = TaskHead(seen_as, model, contract, projections, section.weight)
    return heads
