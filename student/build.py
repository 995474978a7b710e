"""Building the job's models: the teacher checkpoint every replica loads, and the student.

A teacher built from a bare config is saved once by the driver so that every replica loads
identical weights; the student starts from the teacher's architecture with overrides, or from a
checkpoint, or from a subset of the teacher's layers (DistilBERT's initialisation). The student's
architecture itself (a model config, no weights) comes from student/architecture.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from polydistill.cluster.config import StudentConfig, TeacherConfig
from polydistill.cluster.task_specs import task_spec
from polydistill.storage.model_sources import resolve_model_source
from polydistill.storage.vocab import train_wordpiece_tokenizer
from polydistill.student.architecture import ModelSetupError, student_config


def label_maps(label_names: Sequence[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": {i: name for i, name in enumerate(label_names)},
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


# A multi-task student keeps each extra task's model (its head on the shared encoder) here, under its folder.
TASKS_FOLDER = "tasks"


def task_folder(student_dir: Path, task: str) -> Path:
    return Path(student_dir) / TASKS_FOLDER / task


def model_class(task: str) -> type:
    """The HF auto class of a task's teachers and students, as the task kind's spec names it."""
    return getattr(transformers, task_spec(task).auto_class)


def materialize_random_teacher(
    teacher: TeacherConfig, label_names: Sequence[str], train_texts: Sequence[str], out_dir: Path, seed: int,
    task: str = "sequence-classification",
) -> Path:
    """Builds a random-weight model from ``teacher.config`` (plus a tokenizer) and saves it."""
    if "model_type" not in teacher.config:
        raise ModelSetupError("teacher.model is 'random', so teacher.config must name a model_type (e.g. bert)")
    if teacher.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(teacher.tokenizer))
        tokenizer.save_pretrained(out_dir)
    else:
        tokenizer = train_wordpiece_tokenizer(train_texts, teacher.vocab_size, out_dir)
    fields = dict(teacher.config)
    model_type = fields.pop("model_type")
    fields.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if label_names:
        fields.update(label_maps(label_names))
    for key, value in task_spec(task).random_model_fields(tokenizer).items():  # a decoder's start and end markers
        fields.setdefault(key, value)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as exc:
        raise ModelSetupError(f"teacher.config: {exc}") from exc
    torch.manual_seed(seed)
    model = model_class(task).from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def check_classifier_labels(config: PretrainedConfig, label_names: Sequence[str], where: str) -> None:
    """A checkpoint used as a classifier must predict exactly the data's labels, in the same order."""
    have = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    if have != list(label_names):
        raise ModelSetupError(
            f"{where} predicts {config.num_labels} labels {have[:8]}, but the data has {len(label_names)} "
            f"labels {list(label_names)[:8]}: fine-tune the teacher on this data first (teacher.finetune_epochs) "
            "or point teacher.model at a checkpoint trained on these labels"
        )


def build_student(student: StudentConfig, teacher_dir: Path, seed: int,
                  task: str = "sequence-classification") -> PreTrainedModel:
    auto = model_class(task)
    if student.model:
        source = resolve_model_source(student.model)
        model = auto.from_pretrained(source)
        if not task_spec(task).classes:
            return model
        teacher_config = AutoConfig.from_pretrained(teacher_dir)
        check_classifier_labels(model.config, [teacher_config.id2label[i] for i in range(teacher_config.num_labels)],
                                "student.model")
        return model
    config = student_config(student, teacher_dir)
    torch.manual_seed(seed)
    model = auto.from_config(config)
    if student.init_from_teacher_layers is not None:
        teacher = auto.from_pretrained(teacher_dir)
        copy_teacher_layers(teacher, model, student.init_from_teacher_layers)
    return model


def copy_teacher_layers(teacher: PreTrainedModel, student: PreTrainedModel, layers: Sequence[int]) -> None:
    """Initialises the student from the teacher's embeddings and the listed encoder layers."""
    t_cfg, s_cfg = teacher.config, student.config
    if len(layers) != s_cfg.num_hidden_layers:
        raise ModelSetupError(
            f"student.init_from_teacher_layers lists {len(layers)} layers but the student has "
            f"{s_cfg.num_hidden_layers} (student.config.num_hidden_layers)"
        )
    for index in layers:
        if not 0 <= index < t_cfg.num_hidden_layers:
            raise ModelSetupError(
                f"student.init_from_teacher_layers: teacher layer {index} does not exist; "
                f"the teacher has layers 0..{t_cfg.num_hidden_layers - 1}"
            )
    for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(t_cfg, key) != getattr(s_cfg, key):
            raise ModelSetupError(
                f"student.init_from_teacher_layers needs the student's {key} ({getattr(s_cfg, key)}) "
                f"to equal the teacher's ({getattr(t_cfg, key)}): drop student.config.{key} or the layer copy"
            )
    t_base, s_base = teacher.base_model, student.base_model
    s_base.embeddings.load_state_dict(t_base.embeddings.state_dict())
    for s_index, t_index in enumerate(layers):
        s_base.encoder.layer[s_index].load_state_dict(t_base.encoder.layer[t_index].state_dict())
    if getattr(t_base, "pooler", None) is not None and getattr(s_base, "pooler", None) is not None:
        s_base.pooler.load_state_dict(t_base.pooler.state_dict())
    if teacher.base_model is teacher:  # an encoder without a head (sentence embeddings)
        return
    # The classification head is task knowledge the student should inherit too when shapes match.
    t_head, s_head = _classifier_state(teacher), _classifier_state(student)
    if t_head.keys() == s_head.keys() and all(t_head[k].shape == s_head[k].shape for k in t_head):
        student.load_state_dict({**student.state_dict(), **t_head})


def _classifier_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    prefix = model.base_model_prefix + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
