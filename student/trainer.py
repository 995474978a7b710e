"""The student worker: consumes knowledge messages and trains the student on them.

The loop reads top to bottom: fetch a message, skip it if the ledger has it, forward, losses,
step, acknowledge, log, checkpoint. Acknowledging after the step means a student killed
mid-step leaves the message pending, to be delivered again; the ledger makes that second
delivery harmless. Given a checkpoint directory, the trainer saves weights, optimiser,
scheduler, RNG and ledger every ``training.checkpoint_every`` steps and at the end, and a new
trainer resumes from them: ``student/checkpoint.py`` explains why the ledger in the checkpoint,
not Redis' acknowledgements, decides what a restarted student still has to learn.

What the student learns from is the knowledge contract (``student/contract.py``): soft and hard
labels, hidden states, attention maps, pooled embeddings, each with its weight. Where widths differ,
learned projections map the student's features to the teacher's; they train with the student and
are checkpointed with it (under ``PROJECTIONS_PREFIX`` in the checkpoint's weights), but they are
not part of the saved student, which is the plain HF model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

from polydistill.cluster.config import DistillConfig, JobConfig
from polydistill.storage import wire
from polydistill.storage.keys import JobKeys
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import GroupMissing, JobStreams, connect_job
from polydistill.storage.chunking import ChunkGather, is_chunk
from polydistill.student.checkpoint import (
    CheckpointError,
    StudentCheckpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from polydistill.student.contract import (
    EMBEDDING_PROJECTION,
    TEACHER_CONFIG_FILE,
    Contract,
    ContractError,
    hidden_projection_name,
    load_teacher_config,
    resolve_contract,
    wants_features,
)
from polydistill.student.build import model_class, task_folder
from polydistill.student.precision import use_bf16
from polydistill.student.vocab_trim import VOCAB_MAP_FILE, VocabMap
from polydistill.student.lm_losses import lm_distillation_loss, masked_lm_ce, masked_lm_distillation_loss, next_token_ce
from polydistill.student.losses import (
    HiddenProjection,
    attention_kl,
    combine_losses,
    embedding_loss,
    ensemble_log_probs,
    hard_label_ce,
    hidden_state_loss,
    mean_pool,
    minilm_relation_loss,
    soft_label_kl,
    soft_label_kl_topk,
)

log = logging.getLogger(__name__)


class StallError(RuntimeError):
    """No knowledge arrived for too long: the teachers are gone or stuck."""


# Look this often (one cheap read) at messages delivered to this student but not acknowledged: after
# Redis restarted from a snapshot, acks made after the snapshot are undone and come back pending.
_OWN_PENDING_EVERY_S = 5.0

# Feature projections travel in the checkpoint's weights under this prefix, beside the student's own.
PROJECTIONS_PREFIX = "distill_projections."


@dataclass
class TrainingState:
    step: int = 0  # batches applied (a data-parallel round applies up to one per worker)
    optimizer_steps: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    last_loss: float = math.nan
    loss_history: list[dict] = field(default_factory=list)
    # Counted over applied messages only (not duplicates), so they add up like the ledger across a resume.
    wire_bytes: int = 0
    wire_bytes_by_part: dict[str, int] = field(default_factory=dict)
    pseudo_labels: dict[str, dict[str, int]] = field(default_factory=dict)
    # Several teachers: samples each teacher labelled, per language ({teacher: {language: count}}).
    teacher_samples: dict[str, dict[str, int]] = field(default_factory=dict)
    # Multi-task jobs: samples applied per task.
    task_samples: dict[str, int] = field(default_factory=dict)


@dataclass
class TaskHead:
    """One extra task of a multi-task student: the job as that task sees it, its model (the head on the
    shared encoder), its knowledge contract and projections, and its loss weight."""

    config: JobConfig
    model: nn.Module
    contract: Contract
    projections: nn.ModuleDict
    weight: float


@dataclass
class StudentOutputs:
    """What the student's forward pass produced; HF conventions (hidden_states[0] = embeddings)."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def student_labels(work: wire.WorkBatch, config: JobConfig) -> np.ndarray | None:
    """The gold labels the student may learn from: none when withheld; -1 marks an unlabelled sample."""
    if config.data.withhold_labels:
        return None
    if config.task == "token-classification":  # per token: the word's tag on its first sub-token
        return None if work.token_labels is None else np.where(work.token_labels < 0, -1, work.token_labels)
    return work.labels


def served_counts(knowledge: wire.Knowledge) -> dict[str, dict[str, int]]:
    """Per teacher of a several-teacher job, how many samples of each language it labelled in this batch."""
    counts: dict[str, dict[str, int]] = {}
    languages = knowledge.work.languages
    for vote in knowledge.ensemble:
        per_language = counts.setdefault(vote.teacher, {})
        for row in np.flatnonzero(vote.served):
            per_language[languages[row]] = per_language.get(languages[row], 0) + 1
    return counts


def ensemble_soft_labels(knowledge: wire.Knowledge, weights: dict[str, float], temperature: float) -> wire.SoftLabels:
    """The teachers' weighted mixture at ``temperature`` as logits ``T * log p``: at the same T,
    ``soft_label_kl`` (and at T = 1 the pseudo-labels) then see exactly the mixture p."""
    votes = knowledge.ensemble
    unknown = [vote.teacher for vote in votes if vote.teacher not in weights]
    if unknown:
        raise ContractError(f"knowledge from teacher(s) {unknown} that this job does not list (teachers: "
                            f"{sorted(weights)}); run the student with the job's own config")
    log_p = ensemble_log_probs([torch.from_numpy(np.asarray(v.logits)) for v in votes],
                               [torch.from_numpy(np.asarray(v.served)) for v in votes],
                               [weights[v.teacher] for v in votes], temperature=temperature)
    return wire.SoftLabels.full((temperature * log_p).to(torch.float32).numpy())


def teacher_weights(config: JobConfig) -> dict[str, float]:
    return {name: config.teacher_section(name).weight for name in config.teacher_names}


def teacher_predictions(soft: wire.SoftLabels) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's most likely class per sample and its probability (at temperature 1)."""
    if soft.per_token:
        raise ValueError("pseudo-labels are per sample; these soft labels are per token")
    if soft.kind == wire.SOFT_FULL:
        logits = soft.logits.astype(np.float64)
        predicted = logits.argmax(-1)
        top = np.take_along_axis(logits, predicted[:, None], -1)[:, 0]
        log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return predicted.astype(np.int64), np.exp(top - log_norm)
    # Top-k arrives sorted with the full logsumexp, so the first entry is exact.
    top = soft.topk_values[:, 0].astype(np.float64)
    return soft.topk_indices[:, 0].astype(np.int64), np.exp(top - soft.topk_logsumexp.astype(np.float64))


def pseudo_label(
    work: wire.WorkBatch,
    soft: wire.SoftLabels,
    threshold: float,
    labels: np.ndarray | None,
    withheld: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """``labels`` (or all -1) with the teacher's prediction filled in where the student has no label and
    the teacher's probability reaches ``threshold``; and per language, of the samples without a label,
    how many passed (``passed``/``total``). Given the ``withheld`` gold labels, also how many of those
    that passed were right (``correct``): they score the pseudo-labels and never train the student.
    """
    filled = np.full(work.n_samples, -1, dtype=np.int64) if labels is None else labels.astype(np.int64)
    unlabelled = filled < 0
    predicted, probability = teacher_predictions(soft)
    passed = unlabelled & (probability >= threshold)
    filled[passed] = predicted[passed]
    counts: dict[str, dict[str, int]] = {}
    for i in np.flatnonzero(unlabelled):
        entry = counts.setdefault(work.languages[i], {"passed": 0, "total": 0})
        entry["total"] += 1
        entry["passed"] += int(passed[i])
        if withheld is not None:
            entry["correct"] = entry.get("correct", 0) + int(passed[i] and predicted[i] == withheld[i])
    return filled, counts


def add_counts(into: dict[str, dict[str, int]], counts: dict[str, dict[str, int]]) -> None:
    for language, entry in counts.items():
        total = into.setdefault(language, {})
        for key, value in entry.items():
            total[key] = total.get(key, 0) + value


def knowledge_nbytes(knowledge: wire.Knowledge) -> dict[str, int]:
    """Payload bytes of a knowledge message by part (the rest of its encoded size is msgpack framing)."""
    work, soft = knowledge.work, knowledge.soft
    soft_arrays = () if soft is None else (soft.logits, soft.topk_values, soft.topk_indices, soft.topk_logsumexp)
    return {
        "work": sum(a.nbytes for a in (work.sample_ids, work.input_ids, work.attention_mask, work.labels)
                    if a is not None),
        "soft": sum(a.nbytes for a in soft_arrays if a is not None)
        + sum(vote.logits.nbytes + vote.served.nbytes for vote in knowledge.ensemble),
        "hidden_states": sum(a.nbytes for a in knowledge.hidden_states.values()),
        "attentions": sum(a.nbytes for a in knowledge.attentions.values()),
        "embeddings": 0 if knowledge.embeddings is None else knowledge.embeddings.nbytes,
    }


def build_projections(contract: Contract) -> nn.ModuleDict:
    return nn.ModuleDict({name: HiddenProjection(s, t) for name, (s, t) in contract.projections.items()})


def pack_weights(model: nn.Module, projections: nn.Module) -> dict[str, Tensor]:
    """The checkpoint's weights: the student's state dict plus the projections under PROJECTIONS_PREFIX."""
    weights = dict(model.state_dict())
    weights.update({PROJECTIONS_PREFIX + key: value for key, value in projections.state_dict().items()})
    return weights


def unpack_weights(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(student state dict, projections state dict) of checkpoint weights made by ``pack_weights``."""
    model = {key: value for key, value in weights.items() if not key.startswith(PROJECTIONS_PREFIX)}
    projections = {key[len(PROJECTIONS_PREFIX):]: value for key, value in weights.items()
                   if key.startswith(PROJECTIONS_PREFIX)}
    return model, projections


def distillation_losses(
    student: StudentOutputs | Tensor,
    knowledge: wire.Knowledge,
    config: JobConfig,
    contract: Contract | None = None,
    projections: nn.ModuleDict | dict[str, nn.Module] | None = None,
    labels: np.ndarray | None | str = "from_work",
) -> tuple[Tensor, dict[str, float]]:
    """Every loss term the contract asks for, weighted and summed; also each term's value for the log.

    ``student`` may be just the logits when only labels are distilled. ``labels`` are the hard labels
    the student learns from (-1: none for that sample); by default those of the work batch unless
    withheld. Terms: soft, hard, hidden (mean over layer pairs), attention (KL, or MiniLM relations
    when head counts differ; mean over pairs), embedding (mean-pooled last layer).
    """
    distill = config.distill
    outputs = student if isinstance(student, StudentOutputs) else StudentOutputs(logits=student)
    contract = contract if contract is not None else resolve_contract(distill, None, None)
    projections = dict(projections.items()) if projections is not None else {}
    if isinstance(labels, str):
        labels = student_labels(knowledge.work, config)
    logits, device = outputs.logits, outputs.logits.device
    terms: dict[str, Tensor] = {}
    soft = knowledge.soft
    if knowledge.ensemble:
        soft = ensemble_soft_labels(knowledge, teacher_weights(config), distill.temperature)
    mask = torch.from_numpy(knowledge.work.attention_mask.astype(np.bool_)).to(device)
    if soft is not None and distill.soft_weight > 0:
        if soft.kind == wire.SOFT_FULL:
            # Per-token soft labels (a tagger) count every real token of the batch.
            terms["soft"] = soft_label_kl(logits, _tensor(soft.logits, device), temperature=distill.temperature,
                                          mask=mask if soft.per_token else None)
        else:
            terms["soft"] = soft_label_kl_topk(
                logits,
                _tensor(soft.topk_values, device),
                torch.from_numpy(soft.topk_indices.astype(np.int64)).to(device),
                _tensor(soft.topk_logsumexp, device),
                temperature=distill.temperature,
            )
    if labels is not None and distill.hard_weight > 0 and (labels >= 0).any():
        hard = torch.tensor(labels, dtype=torch.int64, device=device)
        terms["hard"] = hard_label_ce(logits, hard, ignore_index=-1)

    if contract.hidden_pairs:
        terms["hidden"] = _mean([
            hidden_state_loss(
                _student_layer(outputs.hidden_states, s), _teacher_layer(knowledge, "hidden_states", t, device),
                mask=mask, kind=distill.hidden_loss, projection=projections.get(hidden_projection_name(s, t)),
            )
            for s, t in contract.hidden_pairs
        ])
    if contract.attention_mode == "kl":
        terms["attention"] = _mean([
            attention_kl(_student_layer(outputs.attentions, s - 1), _teacher_layer(knowledge, "attentions", t, device),
                         mask=mask)
            for s, t in contract.attention_pairs
        ])
    elif contract.attention_mode == "relation":
        terms["attention"] = _mean([
            minilm_relation_loss(
                _student_layer(outputs.hidden_states, s), _teacher_layer(knowledge, "hidden_states", t, device),
                mask=mask, num_relation_heads=contract.relation_heads,
            )
            for s, t in contract.attention_pairs
        ])
    if contract.request.embeddings:
        if knowledge.embeddings is None:
            raise ContractError(_missing(knowledge, "embeddings", "distill.embedding_weight"))
        pooled = mean_pool(_student_layer(outputs.hidden_states, -1), mask)
        terms["embedding"] = embedding_loss(pooled, _tensor(knowledge.embeddings, device),
                                            kind=distill.embedding_loss,
                                            projection=projections.get(EMBEDDING_PROJECTION))
    if not terms:
        # Nothing in this batch to learn from (no label, and no pseudo-label reached the threshold). A zero loss
        # still makes it a step, so that steps and the ledger's batches stay equal (what a resume checks).
        return logits.sum() * 0.0, {"total": 0.0}
    return combine_losses(terms, loss_weights(distill))


def loss_weights(distill: DistillConfig) -> dict[str, float]:
    return {"soft": distill.soft_weight, "hard": distill.hard_weight, "hidden": distill.hidden_weight,
            "attention": distill.attention_weight, "embedding": distill.embedding_weight}


def _tensor(array: np.ndarray, device: torch.device) -> Tensor:
    # astype copies: wire arrays are read-only views of the message, and features travel as float16.
    return torch.from_numpy(array.astype(np.float32)).to(device)


def _mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()


def _student_layer(layers: tuple[Tensor, ...] | None, index: int) -> Tensor:
    if layers is None:
        raise ValueError("the student's forward pass returned no hidden states or attentions, which the "
                         "knowledge contract needs (run it with output_hidden_states / output_attentions)")
    # Autocast may leave bf16 features; the losses and the float32 projections work in float32.
    return layers[index].float()


def _teacher_layer(knowledge: wire.Knowledge, kind: str, layer: int, device: torch.device) -> Tensor:
    layers = getattr(knowledge, kind)
    if layer not in layers:
        field_name = "distill.hidden_layers" if kind == "hidden_states" else "distill.attention_layers"
        raise ContractError(_missing(knowledge, f"{kind} of teacher layer {layer}", field_name))
    return _tensor(layers[layer], device)


def _missing(knowledge: wire.Knowledge, what: str, field_name: str) -> str:
    return (f"knowledge from {knowledge.teacher_id} carries no {what}, which {field_name} asks for: do the teacher "
            "replicas run the same job config as the student?")


class StudentTrainer:
    """Plain class; ``actors.shells.StudentActor`` runs it under Ray."""

    def __init__(
        self,
        config: JobConfig,
        student_init_dir: str,
        batches_per_epoch: int,
        redis_url: str,
        student_dir: str,
        name: str = "student",
        progress: Callable[[dict], None] | None = None,
        checkpoint_dir: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        rendezvous: str | None = None,
    ):
        self.config = config
        self.name = name
        # Data-parallel workers share the student's consumer group, each as its own consumer.
        self.rank, self.world_size = rank, world_size
        self.consumer = name if world_size == 1 else f"{name}-w{rank}"
        self.init_dir = Path(student_init_dir)
        self.student_dir = Path(student_dir)
        self.progress = progress
        torch.set_num_threads(config.student.threads)
        torch.manual_seed(config.training.seed)
        self.device = torch.device("cuda" if config.student.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.contract = self._resolve_contract()
        student_config = AutoConfig.from_pretrained(self.init_dir)
        overrides: dict = {}
        if self.contract.student_needs_attentions:
            # Compared attention maps must be distributions: eager attention materialises them, and attention
            # dropout would zero entries of the student's (HF returns the maps after dropout).
            overrides["attn_implementation"] = "eager"
            if hasattr(student_config, "attention_probs_dropout_prob"):
                overrides["attention_probs_dropout_prob"] = 0.0
        self._config_restore = {key: getattr(student_config, key) for key in overrides if key != "attn_implementation"}
        self.model = model_class(config.task).from_pretrained(self.init_dir, **overrides).to(self.device)
        if config.student.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.projections = build_projections(self.contract).to(self.device)
        self.task_heads = self._tie_task_heads()
        # A student with a trimmed vocabulary reads the teacher tokenizer's ids through this table.
        map_path = self.init_dir / VOCAB_MAP_FILE
        self.id_map = VocabMap.load(map_path).table if map_path.exists() else None
        self.bf16 = use_bf16(config.training.precision == "bfloat16", self.device.type, "training.precision")
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.group = self.keys.student_group(name)
        self.streams = JobStreams(connect_job(redis_url, config.transport), self.keys)
        training = config.training
        self.ledger = EpochLedger(batches_per_epoch=batches_per_epoch, epochs=training.epochs)
        # The driver reads missing() from another thread while the loop records batches.
        self._ledger_lock = threading.Lock()
        # Data-parallel workers apply up to world_size batches per optimiser step.
        total_steps = -(-batches_per_epoch * training.epochs // world_size)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(training.warmup_ratio * total_steps), total_steps
        )
        self.state = TrainingState()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resumed_from_step: int | None = None
        if self.checkpoint_dir is not None:
            self.resume()
        self.sync = None
        self._own_samples = 0
        if world_size > 1:
            from polydistill.student.data_parallel import GradientSync

            self.sync = GradientSync(rank, world_size, rendezvous, self.device)
            self.sync.broadcast_parameters([*self.model.parameters(), *self.projections.parameters()])

    def _resolve_contract(self, init_dir: Path | None = None, config: JobConfig | None = None) -> Contract:
        init_dir, config = init_dir or self.init_dir, config or self.config
        teacher_config = load_teacher_config(init_dir)
        distill = config.distill
        if teacher_config is None and wants_features(distill):
            raise ContractError(
                f"distill asks for hidden states, attention or embeddings, but {init_dir} has no "
                f"{TEACHER_CONFIG_FILE} (the driver's prepare_student writes it): prepare the student again"
            )
        return resolve_contract(distill, teacher_config, AutoConfig.from_pretrained(init_dir))

    def _tie_task_heads(self) -> dict[str, TaskHead]:
        """A multi-task job's extra heads, each on the main model's encoder (one set of encoder weights).
        Their parameters live in ``projections`` (under ``task_<name>``), so checkpoints hold them."""
        heads: dict[str, TaskHead] = {}
        encoder = self.model.base_model
        for section in self.config.extra_tasks:
            folder = task_folder(self.init_dir, section.name)
            seen_as = self.config.for_task(section.name)
            if section.task == "sentence-embedding":
                model = encoder  # the embedding is the encoder's own mean-pooled output
            else:
                model = model_class(section.task).from_pretrained(folder).to(self.device)
                setattr(model, model.base_model_prefix, encoder)
            contract = self._resolve_contract(folder, seen_as)
            projections = build_projections(contract).to(self.device)
            self.projections[f"task_{section.name}"] = nn.ModuleDict({"model": model, "projections": projections})
            heads[section.name] = TaskHead(seen_as, model, contract, projections, section.weight)
        return heads

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the student and the feature projections (and a multi-task job's heads),
        each parameter once although the heads share the encoder."""
        unique = {id(p): p for p in (*self.model.parameters(), *self.projections.parameters()) if p.requires_grad}
        return list(unique.values())

    # -- the loop ---------------------------------------------------------------------------
    def train(self, should_stop: Callable[[], bool] = lambda: False) -> dict:
        if self.sync is not None:
            return self.train_data_parallel(should_stop)
        self.model.train()
        started = time.perf_counter()
        last_message = time.monotonic()
        own_pending_checked = 0.0  # read this consumer's unacknowledged messages first
        while not self.ledger.complete and not should_stop():
            try:
                entries = []
                if time.monotonic() - own_pending_checked > _OWN_PENDING_EVERY_S:
                    own_pending_checked = time.monotonic()
                    entries = self.streams.read_pending(self.keys.knowledge_stream, self.group, self.consumer, count=64)
                entries = entries or self.fetch()
            except GroupMissing as exc:
                if not self.wait_for_streams(exc, should_stop):
                    break
                continue
            if entries:
                last_message = time.monotonic()
            elif time.monotonic() - last_message > self.config.training.stall_timeout_s:
                raise StallError(
                    f"no knowledge for {self.config.training.stall_timeout_s:.0f} s with "
                    f"{len(self.missing())} batches still missing: are the teacher replicas running? "
                    "(raise training.stall_timeout_s if teachers are just slow to start)"
                )
            for entry_id, payload in entries:
                stepped = self.apply(entry_id, payload)
                if stepped and self.state.step % self.config.training.checkpoint_every == 0:
                    self.checkpoint()
        self.checkpoint()
        self.save()
        return self.summary(time.perf_counter() - started)

    def train_data_parallel(self, should_stop: Callable[[], bool]) -> dict:
        """The lock-step rounds of ``student/data_parallel.py``: every worker runs this same loop."""
        from polydistill.student.data_parallel import RoundRow, decide_round

        self.model.train()
        started = time.perf_counter()
        last_batch = time.monotonic()
        while not self.ledger.complete:
            entry_id, knowledge = self._fetch_one()
            work = knowledge.work if knowledge is not None else None
            mine = RoundRow(has_batch=work is not None, epoch=work.epoch if work else -1,
                            batch_id=work.batch_id if work else -1, samples=work.n_samples if work else 0,
                            stop=should_stop())
            table = self.sync.exchange(mine)
            if any(row.stop for row in table):
                break  # this worker's message stays pending: a resumed run reads it again
            decisions = decide_round(table, self.ledger.is_applied)
            applied = [row for row, applies in zip(table, decisions) if applies]
            values = None
            if applied:
                computed = time.perf_counter()
                if decisions[self.rank]:
                    loss, values, counts = self.losses(knowledge)
                    loss.backward()
                    values = {"loss": float(loss.detach()), **values}
                    add_counts(self.state.pseudo_labels, counts)
                    add_counts(self.state.teacher_samples, served_counts(knowledge))
                self.sync.average_gradients(self.parameters(), len(applied))
                self.update()
                self.state.compute_seconds += time.perf_counter() - computed
            with self._ledger_lock:
                for row, applies in zip(table, decisions):
                    if applies:
                        self.ledger.record(row.epoch, row.batch_id, row.samples)
                        self.state.step += 1
                    elif row.has_batch:
                        self.ledger.count_duplicate()
            if any(row.has_batch for row in table):
                last_batch = time.monotonic()
            elif time.monotonic() - last_batch > self.config.training.stall_timeout_s:
                raise StallError(f"no knowledge for any of the {self.world_size} workers for "
                                 f"{self.config.training.stall_timeout_s:.0f} s: are the teacher replicas running?")
            if entry_id is not None:
                self.acknowledge(entry_id)
            if values is not None:
                self.state.last_loss = values["loss"]
                if self.rank == 0:
                    self.log(work.epoch, values)
            if self.rank == 0 and applied and self.state.optimizer_steps % self.config.training.checkpoint_every == 0:
                self.checkpoint()
        if self.rank == 0:
            self.checkpoint()
            self.save()
        summary = self.summary(time.perf_counter() - started)
        summary["data_parallel"] = {"workers": self.world_size, "rank": self.rank, "samples_read": self._own_samples,
                                    "optimizer_steps": self.state.optimizer_steps}
        return summary

    def _fetch_one(self) -> tuple[bytes | None, wire.Knowledge | None]:
        """At most one new, valid knowledge message for this worker (an invalid one is dead-lettered)."""
        try:
            entries = self.fetch()
        except GroupMissing:
            time.sleep(0.2)  # Redis lost its data; the driver recreates the group and re-feeds
            return None, None
        for entry_id, payload in entries:
            knowledge = self._decode(entry_id, payload)
            if knowledge is None:
                return None, None
            self._own_samples += knowledge.work.n_samples
            self._count_bytes(payload, knowledge)
            return entry_id, knowledge
        return None, None

    def _count_bytes(self, payload: bytes, knowledge: wire.Knowledge) -> None:
        self.state.wire_bytes += len(payload)
        for part, size in knowledge_nbytes(knowledge).items():
            self.state.wire_bytes_by_part[part] = self.state.wire_bytes_by_part.get(part, 0) + size

    def _decode(self, entry_id: bytes, payload: bytes) -> wire.Knowledge | None:
        """The knowledge message of this job in ``payload``; None after dead-lettering anything else."""
        try:
            knowledge = wire.decode(payload)
            if not isinstance(knowledge, wire.Knowledge) or knowledge.work.job_id != self.keys.job_id:
                raise wire.WireError("not a knowledge message of this job")
        except wire.WireError as exc:
            log.error("dead-lettering knowledge entry %s: %s", entry_id, exc)
            self.streams.dead_letter(entry_id, payload, str(exc), self.keys.knowledge_stream)
            self.acknowledge(entry_id)
            return None
        return knowledge

    def wait_for_streams(self, error: GroupMissing, should_stop: Callable[[], bool]) -> bool:
        """Redis lost its data: keep the ledger (in memory) and wait for the driver to recreate the
        streams and re-enqueue whatever this student has not applied. False if told to stop."""
        log.warning("%s; waiting for the driver to recreate it", error)
        return self.streams.wait_for_group(
            self.keys.knowledge_stream, self.group,
            timeout_s=self.config.transport.reconnect_timeout_s, should_stop=should_stop,
        )

    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) these weights have not learnt from: what the driver must (re-)feed."""
        with self._ledger_lock:
            return self.ledger.missing()

    def fetch(self) -> list[tuple[bytes, bytes]]:
        waited = time.perf_counter()
        entries = self.streams.read(
            self.keys.knowledge_stream, self.group, self.consumer, count=1, block_ms=self.config.transport.block_ms
        )
        self.state.wait_seconds += time.perf_counter() - waited
        return entries

    def apply(self, entry_id: bytes, payload: bytes) -> bool:
        """Trains on one knowledge message unless the ledger has it; True when a step was taken."""
        knowledge = self._decode(entry_id, payload)
        if knowledge is None:
            return False
        if is_chunk(knowledge):  # one batch in several messages (storage/chunking.py)
            return self.gather_chunk(entry_id, payload, knowledge)
        work = knowledge.work
        stepped = not self.ledger.is_applied(work.epoch, work.batch_id)
        if not stepped:
            with self._ledger_lock:
                self.ledger.count_duplicate()
        else:
            computed = time.perf_counter()
            values = self.step(knowledge)
            self.state.compute_seconds += time.perf_counter() - computed
            self._count_bytes(payload, knowledge)
            with self._ledger_lock:
                self.ledger.record(work.epoch, work.batch_id, work.n_samples)
            self.log(work.epoch, values)
        # After a reset of the streams (Redis lost its data) this ack finds no group: a no-op.
        self.acknowledge(entry_id)
        return stepped

    def acknowledge(self, entry_id: bytes) -> None:
        stream = self.keys.knowledge_stream
        if self.config.knowledge_stream_shared:
            # Other groups (students, the cache writer) read the same entries: acknowledge ours, drop
            # what all have read.
            self.streams.ack_and_trim(stream, self.group, [entry_id])
        else:
            self.streams.ack_and_delete(stream, self.group, [entry_id])

    def _forward(self, token_ids: np.ndarray, mask: np.ndarray, *, hidden: bool, attentions: bool = False):
        token_ids = token_ids if self.id_map is None else self.id_map[token_ids]
        input_ids = torch.from_numpy(token_ids.astype(np.int64)).to(self.device)
        attention_mask = torch.from_numpy(mask.astype(np.int64)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden,
                              output_attentions=attentions)

    def step(self, knowledge: wire.Knowledge) -> dict[str, float]:
        loss, values, counts = self.losses(knowledge)
        loss.backward()
        self.update()
        self.state.step += 1
        self.state.last_loss = float(loss.detach())
        add_counts(self.state.pseudo_labels, counts)
        add_counts(self.state.teacher_samples, served_counts(knowledge))
        return {"loss": self.state.last_loss, **values}

    def losses(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float], dict[str, dict[str, int]]]:
        """The task's loss on one knowledge message, its terms, and per-language pseudo-label counts.
        In a multi-task job, the loss of the batch's task, through that task's head, scaled by its weight."""
        task = knowledge.work.task
        if self.task_heads or task is not None:
            return self.task_losses(task or "main", knowledge)
        return self.single_task_losses(knowledge)

    def task_losses(self, task: str, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float], dict]:
        if task != "main" and task not in self.task_heads:
            raise ContractError(f"a batch of task {task!r}, which this student has no head for (extra_tasks: "
                                f"{sorted(self.task_heads)}); run the student with the job's own config")
        head = self.task_heads.get(task)
        saved = (self.config, self.model, self.contract, self.projections)
        if head is not None:  # the batch's task, seen through its head, for the length of one loss
            self.config, self.model, self.contract, self.projections = head.config, head.model, head.contract, \
                head.projections
        try:
            loss, values, counts = self.single_task_losses(knowledge)
        finally:
            self.config, self.model, self.contract, self.projections = saved
        weight = head.weight if head is not None else self.config.task_weight
        self.state.task_samples[task] = self.state.task_samples.get(task, 0) + knowledge.work.n_samples
        return loss * weight, {f"{task}.{name}": value for name, value in values.items()}, counts

    def single_task_losses(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float], dict]:
        if self.config.task == "sentence-embedding":
            return *self.embedding_losses(knowledge), {}
        if self.config.task in ("causal-lm", "masked-lm"):
            return *self.lm_losses(knowledge), {}
        if self.config.task == "seq2seq":
            return *self.seq2seq_losses(knowledge), {}
        work = knowledge.work
        # With its own tokenizer (student.tokenizer) the student reads its own ids of the same texts.
        ids, mask = ((work.student_input_ids, work.student_attention_mask) if work.student_input_ids is not None
                     else (work.input_ids, work.attention_mask))
        output = self._forward(ids, mask, hidden=self.contract.student_needs_hidden_states,
                               attentions=self.contract.student_needs_attentions)
        outputs = StudentOutputs(logits=output.logits, hidden_states=output.hidden_states, attentions=output.attentions)
        labels, counts = self.labels_for(knowledge)
        loss, values = distillation_losses(outputs, knowledge, self.config, self.contract, self.projections, labels)
        return loss, values, counts

    def update(self) -> None:
        """One optimiser step on the gradients in place (clipped), and the schedule."""
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1

    def embedding_losses(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float]]:
        """Parallel data (Reimers & Gurevych 2020): the student maps the English sentence *and* its
        translation onto the teacher's embedding of the English sentence."""
        work = knowledge.work
        if knowledge.embeddings is None or work.pair_input_ids is None:
            raise ContractError(_missing(knowledge, "embeddings of parallel sentences", "task: sentence-embedding"))
        target = _tensor(knowledge.embeddings, self.device)
        distill, projection = self.config.distill, self.projections[EMBEDDING_PROJECTION] if (
            EMBEDDING_PROJECTION in self.projections) else None
        terms = {}
        for term, ids, mask in (("embedding", work.input_ids, work.attention_mask),
                                ("translation", work.pair_input_ids, work.pair_attention_mask)):
            states = self._forward(ids, mask, hidden=False).last_hidden_state.float()
            pooled = mean_pool(states, torch.from_numpy(mask.astype(np.bool_)).to(self.device))
            terms[term] = embedding_loss(pooled, target, kind=distill.embedding_loss, projection=projection)
        return combine_losses(terms, {"embedding": distill.embedding_weight, "translation": distill.embedding_weight})

    def lm_losses(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float]]:
        """Language models (``student/lm_losses.py``): the chosen divergence from the teacher's per-token top-k
        (distill.lm_loss, weighed by soft_weight) and cross-entropy on the text's own tokens (hard_weight):
        next tokens for causal-lm, the masked positions' original tokens for masked-lm."""
        work, distill = knowledge.work, self.config.distill
        logits = self._forward(work.input_ids, work.attention_mask, hidden=False).logits
        mask = torch.from_numpy(work.attention_mask.astype(np.bool_)).to(self.device)
        masked = None
        if self.config.task == "masked-lm":
            if work.token_labels is None:
                raise ContractError(_missing(knowledge, "the masked positions' labels", "task masked-lm"))
            masked = torch.from_numpy(work.token_labels).to(self.device)
        terms: dict[str, Tensor] = {}
        if distill.soft_weight > 0:
            soft = knowledge.soft
            if soft is None or not soft.per_token:
                raise ContractError(_missing(knowledge, "per-token soft labels", f"task {self.config.task}'s distill.soft_weight"))
            if soft.kind == wire.SOFT_FULL:  # top_k >= the vocabulary: the whole distribution, as a top-V
                full = _tensor(soft.logits, self.device)
                values, lse = full, torch.logsumexp(full, dim=-1)
                indices = torch.arange(full.shape[-1], device=self.device).expand(full.shape)
            else:
                values, lse = _tensor(soft.topk_values, self.device), _tensor(soft.topk_logsumexp, self.device)
                indices = torch.from_numpy(soft.topk_indices.astype(np.int64)).to(self.device)
            settings = {"kind": distill.lm_loss, "temperature": distill.temperature, "beta": distill.gjs_beta}
            if masked is not None:  # masked LM: the hidden positions only, no shift
                terms["soft"] = masked_lm_distillation_loss(logits, values, indices, lse, masked, **settings)
            else:
                terms["soft"] = lm_distillation_loss(logits, values, indices, lse, mask, **settings)
        if distill.hard_weight > 0:
            input_ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(self.device)
            terms["hard"] = masked_lm_ce(logits, masked) if masked is not None else next_token_ce(logits, input_ids, mask)
        return combine_losses(terms, {"soft": distill.soft_weight, "hard": distill.hard_weight})

    def seq2seq_losses(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float]]:
        """An encoder-decoder under teacher forcing along the target the teacher chose (``target_ids``: the
        reference, or its beam output): its top-k per target token (distill.lm_loss, soft_weight) and
        cross-entropy on the target's tokens (hard_weight; sequence-level distillation when the target is
        the teacher's own translation)."""
        work, distill = knowledge.work, self.config.distill
        if knowledge.target_ids is None:
            raise ContractError(_missing(knowledge, "the decoder's target tokens", "task seq2seq"))
        targets = torch.from_numpy(knowledge.target_ids.astype(np.int64)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=torch.from_numpy(work.input_ids.astype(np.int64)).to(self.device),
                                attention_mask=torch.from_numpy(work.attention_mask.astype(np.int64)).to(self.device),
                                labels=targets).logits
        terms: dict[str, Tensor] = {}
        if distill.soft_weight > 0:
            soft = knowledge.soft
            if soft is None or not soft.per_token or soft.kind != wire.SOFT_TOPK:
                raise ContractError(_missing(knowledge, "top-k soft labels per target token", "distill.soft_weight"))
            terms["soft"] = masked_lm_distillation_loss(
                logits, _tensor(soft.topk_values, self.device),
                torch.from_numpy(soft.topk_indices.astype(np.int64)).to(self.device),
                _tensor(soft.topk_logsumexp, self.device), targets,
                kind=distill.lm_loss, temperature=distill.temperature, beta=distill.gjs_beta)
        if distill.hard_weight > 0:
            terms["hard"] = masked_lm_ce(logits, targets)
        return combine_losses(terms, {"soft": distill.soft_weight, "hard": distill.hard_weight})

    def gather_chunk(self, entry_id: bytes, payload: bytes, knowledge: wire.Knowledge) -> bool:
        """One chunk of a batch that travels in several messages (``storage/chunking.py``). Chunks are held,
        unacknowledged, until the batch's last one is in; then one step on the reassembled batch, recorded in
        the ledger once, and every chunk acknowledged. True when a step was taken."""
        if not hasattr(self, "_chunk_gather"):  # made on the first chunk: most jobs never chunk
            self._chunk_gather = ChunkGather()
        stream, work = self.keys.knowledge_stream, knowledge.work
        if self.ledger.is_applied(work.epoch, work.batch_id):  # a late copy: drop it, and anything held for it
            with self._ledger_lock:
                self.ledger.count_duplicate()
            for held in [entry_id, *self._chunk_gather.discard(work.epoch, work.batch_id)]:
                self.acknowledge(held)
            return False
        try:
            gathered = self._chunk_gather.add(entry_id, len(payload), knowledge)
        except wire.WireError as exc:
            log.error("dead-lettering knowledge entry %s: %s", entry_id, exc)
            self.streams.dead_letter(entry_id, payload, str(exc), stream)
            self.acknowledge(entry_id)
            return False
        if gathered.knowledge is None:
            if gathered.duplicate:  # a second copy of a chunk already held
                with self._ledger_lock:
                    self.ledger.count_duplicate()
                self.acknowledge(entry_id)
            return False
        batch = gathered.knowledge
        computed = time.perf_counter()
        values = self.step(batch)
        self.state.compute_seconds += time.perf_counter() - computed
        self.state.wire_bytes += gathered.payload_bytes
        for part, size in knowledge_nbytes(batch).items():
            self.state.wire_bytes_by_part[part] = self.state.wire_bytes_by_part.get(part, 0) + size
        with self._ledger_lock:
            self.ledger.record(work.epoch, work.batch_id, batch.work.n_samples)
        self.log(work.epoch, values)
        for held in gathered.entry_ids:
            self.acknowledge(held)
        return True

    def labels_for(self, knowledge: wire.Knowledge) -> tuple[np.ndarray | None, dict[str, dict[str, int]]]:
        """The hard labels of this batch, with pseudo-labels where configured, and their per-language counts."""
        work, threshold = knowledge.work, self.config.distill.pseudo_label_threshold
        labels = student_labels(work, self.config)
        if threshold is None:
            return labels, {}
        soft = (ensemble_soft_labels(knowledge, teacher_weights(self.config), 1.0) if knowledge.ensemble
                else knowledge.soft)
        if soft is None:
            return labels, {}
        withheld = work.labels if self.config.data.withhold_labels else None
        return pseudo_label(work, soft, threshold, labels, withheld)

    def log(self, epoch: int, values: dict[str, float]) -> None:
        if self.state.step % self.config.training.log_every and not self.ledger.complete:
            return
        entry = {"step": self.state.step, "epoch": epoch, **{k: round(v, 5) for k, v in values.items()}}
        self.state.loss_history.append(entry)
        if self.progress is not None:
            self.progress({"step": self.state.step, "samples": self.ledger.samples_applied, "loss": values["loss"],
                           "batches": self.ledger.batches_applied})

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Saves everything a restarted student needs, atomically; a no-op without a directory."""
        if self.checkpoint_dir is None:
            return
        torch_rng, rng = capture_rng()
        with self._ledger_lock:
            ledger = self.ledger.to_dict()
        save_checkpoint(self.checkpoint_dir, StudentCheckpoint(
            model=pack_weights(self.model, self.projections),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            torch_rng=torch_rng,
            rng=rng,
            ledger=ledger,
            state={"job_id": self.keys.job_id, "student": self.name, "training": asdict(self.state)},
        ))

    def resume(self) -> None:
        """Continues from the checkpoint in ``checkpoint_dir`` when there is one."""
        checkpoint = load_checkpoint(self.checkpoint_dir, map_location=self.device)
        if checkpoint is None:
            return
        ledger = EpochLedger.from_dict(checkpoint.ledger)
        where = f"the student checkpoint in {self.checkpoint_dir}"
        if checkpoint.state.get("job_id") != self.keys.job_id:
            raise CheckpointError(
                f"{where} belongs to job {checkpoint.state.get('job_id')!r}, not {self.keys.job_id!r}; "
                "use another output directory, or delete the checkpoint to start afresh"
            )
        if (ledger.epochs, ledger.batches_per_epoch) != (self.ledger.epochs, self.ledger.batches_per_epoch):
            raise CheckpointError(
                f"{where} was made for {ledger.epochs} epochs of {ledger.batches_per_epoch} batches, but the "
                f"config now gives {self.ledger.epochs} of {self.ledger.batches_per_epoch} (training.epochs, "
                "training.batch_size, data.*); resume with the job's own config (OUTPUT/job.yaml)"
            )
        state = TrainingState(**checkpoint.state["training"])
        if state.step != ledger.batches_applied:
            raise CheckpointError(
                f"{where} is inconsistent: {state.step} steps but {ledger.batches_applied} batches in its ledger"
            )
        model_state, projection_state = unpack_weights(checkpoint.model)
        try:
            self.projections.load_state_dict(projection_state)
        except RuntimeError:
            raise CheckpointError(
                f"{where} holds feature projections {sorted(projection_state)} but this config needs "
                f"{sorted(self.projections.state_dict())} (distill.hidden_layers, distill.embedding_weight, or the "
                "models' widths changed); resume with the job's own config (OUTPUT/job.yaml)"
            ) from None
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        restore_rng(checkpoint.torch_rng, checkpoint.rng)
        with self._ledger_lock:
            self.ledger = ledger
        self.state = state
        self.resumed_from_step = state.step
        log.info("student %s resumed from step %d (%d batches applied)", self.name, state.step,
                 ledger.batches_applied)

    # -- the end ----------------------------------------------------------------------------
    def save(self) -> None:
        self.student_dir.mkdir(parents=True, exist_ok=True)
        # Training-only settings (attention dropout off for attention distillation) do not follow the student.
        for key, value in self._config_restore.items():
            setattr(self.model.config, key, value)
        self.model.save_pretrained(self.student_dir)
        AutoTokenizer.from_pretrained(self.init_dir).save_pretrained(self.student_dir)
        for name, head in self.task_heads.items():  # each task's head with the shared encoder: a model of its own
            head.model.save_pretrained(task_folder(self.student_dir, name))
            AutoTokenizer.from_pretrained(self.init_dir).save_pretrained(task_folder(self.student_dir, name))

    def summary(self, wall_seconds: float) -> dict:
        return {
            "student": self.name,
            "steps": self.state.step,
            "samples_distilled": self.ledger.samples_applied,
            "samples_per_epoch": {str(e): n for e, n in sorted(self.ledger.samples.items())},
            "batches_applied": self.ledger.batches_applied,
            "duplicates_dropped": self.ledger.duplicates_dropped,
            "complete": self.ledger.complete,
            "final_loss": self.state.last_loss,
            "loss_history": self.state.loss_history,
            "wall_seconds": round(wall_seconds, 3),
            "wait_seconds": round(self.state.wait_seconds, 3),
            "compute_seconds": round(self.state.compute_seconds, 3),
            "student_path": str(self.student_dir),
            "resumed_from_step": self.resumed_from_step,
            "wire_bytes_per_sample": self._per_sample(self.state.wire_bytes),
            "wire_bytes_per_sample_by_part": {
                part: self._per_sample(size) for part, size in sorted(self.state.wire_bytes_by_part.items())
            },
            "pseudo_labels": (dict(sorted(self.state.pseudo_labels.items()))
                              if self.config.distill.pseudo_label_threshold is not None else None),
            "task_samples": dict(self.state.task_samples) if self.task_heads else None,
            "teacher_samples_per_language": ({teacher: dict(sorted(counts.items()))
                                              for teacher, counts in self.state.teacher_samples.items()}
                                             if self.config.extra_teachers else None),
        }

    def _per_sample(self, total: int) -> float | None:
        # A data-parallel worker counts the bytes of the messages it read itself.
        samples = self.ledger.samples_applied if self.sync is None else self._own_samples
        return round(total / samples, 1) if samples else None

