"""The knowledge contract: what the student asks the teachers for, resolved and checked up front.

``distill.*`` says which knowledge the student learns from. ``resolve_contract`` turns that into
concrete layer pairs, the attention loss to use and the projections to learn, and into the
``KnowledgeRequest`` that tells a teacher exactly what to compute and ship (nothing more: hidden
states and attention maps dominate the bytes on the wire). Teacher replicas and the student each
resolve it from the same config and the same two model configs, so they agree without talking.

``check_contract`` runs in the driver before any actor starts and refuses a contract the two
models cannot honour, with a message naming the config field and the numbers.

Layer numbering follows HF ``hidden_states``: 0 is the embedding output and i the output of
transformer layer i (a model with N layers has N + 1 entries). Attention layers count from 1:
attention layer i is the self-attention inside transformer layer i (HF ``attentions[i - 1]``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoConfig, PretrainedConfig

from polydistill.cluster.config import DistillConfig, JobConfig
from polydistill.student.architecture import ModelSetupError, student_model_config
from polydistill.student.losses import uniform_layer_map, validate_layer_map

# Beside the student's initial weights: the teacher's architecture, which the student needs to size
# its projections and resolve 'uniform' layer maps (it never sees the teacher's directory).
TEACHER_CONFIG_FILE = "teacher_config.json"

AttentionMode = Literal["kl", "relation"]


class ContractError(ModelSetupError):
    """The knowledge the config asks for does not fit the two models; the message names the field."""


@dataclass(frozen=True)
class KnowledgeRequest:
    """What a teacher computes and ships per batch; layer numbering as in the module docstring."""

    soft: bool = True
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    embeddings: bool = False

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_layers) or self.embeddings

    @property
    def needs_attentions(self) -> bool:
        return bool(self.attention_layers)


@dataclass(frozen=True)
class Contract:
    request: KnowledgeRequest
    hidden_pairs: tuple[tuple[int, int], ...] = ()
    attention_pairs: tuple[tuple[int, int], ...] = ()
    attention_mode: AttentionMode | None = None
    relation_heads: int | None = None
    # name -> (student width, teacher width), only where the widths differ; names are valid ModuleDict keys.
    projections: dict[str, tuple[int, int]] = field(default_factory=dict)
    # distill.align_language: the student's pooled last layer meets the work batch's alignment targets.
    align: bool = False

    @property
    def student_needs_hidden_states(self) -> bool:
        return bool(self.hidden_pairs) or self.attention_mode == "relation" or self.request.embeddings or self.align

    @property
    def student_needs_attentions(self) -> bool:
        return self.attention_mode == "kl"


def hidden_projection_name(student_layer: int, teacher_layer: int) -> str:
    return f"hidden_{student_layer}_{teacher_layer}"


EMBEDDING_PROJECTION = "embedding"
ALIGNMENT_PROJECTION = "alignment"


def resolve_contract(
    distill: DistillConfig, teacher: PretrainedConfig | None, student: PretrainedConfig | None
) -> Contract:
    """The concrete contract; the model configs may be None only when no features are asked for."""
    soft = distill.soft_weight > 0 or distill.pseudo_label_threshold is not None
    if not wants_features(distill):
        return Contract(request=KnowledgeRequest(soft=soft))
    if teacher is None or student is None:
        raise ContractError("distill asks for hidden states, attention or embeddings, which needs the teacher's "
                            "and the student's model configs")
    n_teacher, n_student = teacher.num_hidden_layers, student.num_hidden_layers
    t_width, s_width = teacher.hidden_size, student.hidden_size

    hidden_pairs: list[tuple[int, int]] = []
    if distill.hidden_weight > 0:
        hidden_pairs = _pairs(distill.hidden_layers, n_student, n_teacher, "distill.hidden_layers", first=0)

    attention_pairs: list[tuple[int, int]] = []
    mode: AttentionMode | None = None
    relation_heads = None
    if distill.attention_weight > 0:
        attention_pairs = _pairs(distill.attention_layers, n_student, n_teacher, "distill.attention_layers", first=1)
        t_heads, s_heads = teacher.num_attention_heads, student.num_attention_heads
        if distill.relation_heads is None and t_heads == s_heads:
            mode = "kl"
        else:
            mode = "relation"
            relation_heads = distill.relation_heads or math.gcd(t_heads, s_heads)
            for who, width in (("student", s_width), ("teacher", t_width)):
                if width % relation_heads:
                    raise ContractError(
                        f"distill.relation_heads is {relation_heads}, but the {who}'s hidden size {width} is not "
                        f"divisible by it (student {s_width}, teacher {t_width}): pick a common divisor of both"
                    )

    projections: dict[str, tuple[int, int]] = {}
    if s_width != t_width:
        projections.update({hidden_projection_name(s, t): (s_width, t_width) for s, t in hidden_pairs})
        if distill.embedding_weight > 0:
            projections[EMBEDDING_PROJECTION] = (s_width, t_width)
        if distill.align_weight > 0:
            projections[ALIGNMENT_PROJECTION] = (s_width, t_width)

    # Relations are computed from the layers' output states, so those travel as hidden states.
    teacher_hidden = {t for _, t in hidden_pairs}
    teacher_attention: set[int] = set()
    if mode == "relation":
        teacher_hidden |= {t for _, t in attention_pairs}
    elif mode == "kl":
        teacher_attention = {t for _, t in attention_pairs}
    request = KnowledgeRequest(
        soft=soft,
        hidden_layers=tuple(sorted(teacher_hidden)),
        attention_layers=tuple(sorted(teacher_attention)),
        embeddings=distill.embedding_weight > 0,
    )
    return Contract(request=request, hidden_pairs=tuple(hidden_pairs), attention_pairs=tuple(attention_pairs),
                    attention_mode=mode, relation_heads=relation_heads, projections=projections,
                    align=distill.align_weight > 0)


def _pairs(setting, n_student: int, n_teacher: int, field_name: str, *, first: int) -> list[tuple[int, int]]:
    if setting == "uniform":
        if n_student > n_teacher:
            raise ContractError(
                f"{field_name} is 'uniform', which maps each student layer to a teacher layer, but the student has "
                f"{n_student} layers and the teacher only {n_teacher}: list the pairs explicitly"
            )
        return [pair for pair in uniform_layer_map(n_student, n_teacher) if pair[0] >= first]
    pairs = [tuple(pair) for pair in setting]
    for s, t in pairs:
        if first and (s < first or t < first):
            raise ContractError(
                f"student layer {s} maps to teacher layer {t}, but layer 0 is the embeddings, which have no "
                f"attention: attention layers count from 1 ({field_name})"
            )
    try:
        validate_layer_map(pairs, n_student=n_student, n_teacher=n_teacher, setting=field_name)
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    return pairs


def check_contract(config: JobConfig, teacher_config: PretrainedConfig, student_config: PretrainedConfig) -> None:
    """Refuses, before any actor starts, knowledge the two models cannot exchange (ContractError)."""
    if config.task in ("causal-lm", "masked-lm", "seq2seq"):
        return _check_lm_vocabularies(config.task, teacher_config, student_config)
    distill = config.distill
    contract = resolve_contract(distill, teacher_config, student_config)
    if contract.request.soft and teacher_config.num_labels != student_config.num_labels:
        field_name = "distill.soft_weight" if distill.soft_weight > 0 else "distill.pseudo_label_threshold"
        raise ContractError(
            f"the teacher predicts {teacher_config.num_labels} classes but the student {student_config.num_labels}: "
            f"soft labels need the same classes in the same order ({field_name}; student.model)"
        )
    # Every message carries the teacher tokenizer's ids, which the student reads (through its vocabulary
    # map when trimmed), and token-level features line up position by position: one tokenizer for both.
    # A student with its own tokenizer (student.tokenizer) reads its own ids instead: the driver checks those.
    own_ids = config.student.trim_vocabulary or config.student.tokenizer is not None
    if not own_ids and teacher_config.vocab_size != student_config.vocab_size:
        raise ContractError(
            f"the student's vocabulary has {student_config.vocab_size} pieces but the teacher's "
            f"{teacher_config.vocab_size}: the student reads the teacher's token ids, so both need the teacher's "
            "tokenizer (student.model; or student.trim_vocabulary to shrink it safely)"
        )


def _check_lm_vocabularies(task: str, teacher_config: PretrainedConfig, student_config: PretrainedConfig) -> None:
    """A causal-LM student predicts the teacher's next tokens id for id, on the teacher's token ids: one
    vocabulary for both (there are no classes to compare, and no features: the config refuses them)."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ContractError(
            f"task {task}: the student's vocabulary has {student_config.vocab_size} pieces but the teacher's "
            f"{teacher_config.vocab_size}: the student reads the teacher's token ids and learns its token "
            "distribution over the same vocabulary, so both need the teacher's tokenizer (student.model must be a "
            "checkpoint with the teacher's tokenizer; or leave student.model out to build the student from the "
            "teacher's architecture)"
        )


def wants_features(distill: DistillConfig) -> bool:
    """Whether the contract needs the model configs: teacher features, or a pooled student state to align."""
    return (distill.hidden_weight > 0 or distill.attention_weight > 0 or distill.embedding_weight > 0
            or distill.align_weight > 0)


def teacher_contract(config: JobConfig, teacher_dir: str | Path) -> KnowledgeRequest:
    """What a teacher replica ships, resolved from the job config and its own model directory: the
    union of what every student of the job asks for (each student takes the layers it maps)."""
    if not wants_features(config.distill):
        return resolve_contract(config.distill, None, None).request
    teacher = AutoConfig.from_pretrained(teacher_dir)
    requests = [
        resolve_contract(config.distill, teacher, student_model_config(config.for_student(name), teacher_dir)).request
        for name in config.student_names
    ]
    return KnowledgeRequest(
        soft=any(request.soft for request in requests),
        hidden_layers=tuple(sorted({layer for request in requests for layer in request.hidden_layers})),
        attention_layers=tuple(sorted({layer for request in requests for layer in request.attention_layers})),
        embeddings=any(request.embeddings for request in requests),
    )


def save_teacher_config(student_init_dir: str | Path, teacher_dir: str | Path) -> None:
    AutoConfig.from_pretrained(teacher_dir).to_json_file(Path(student_init_dir) / TEACHER_CONFIG_FILE, use_diff=False)


def load_teacher_config(student_init_dir: str | Path) -> PretrainedConfig | None:
    path = Path(student_init_dir) / TEACHER_CONFIG_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    return AutoConfig.for_model(raw.pop("model_type"), **raw)
