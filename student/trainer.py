"""The student worker: consumes knowledge messages and trains the student on them.

The loop reads top to bottom: fetch → agree → forward → loss → step → done → log → checkpoint.

- fetch, agree: the step strategy (``student/strategy.py``; ``student/data_parallel.py`` for several
  workers) reads messages through the consumer (``student/consumer.py``), which decides what each
  one is: a new batch, a duplicate, a chunk waiting for its siblings, or garbage to dead-letter.
- forward, loss: the objective of the batch's task kind (``student/task_kinds/``), through its head.
- step: backward, the gradients combined as the strategy says, one optimiser step.
- done: the batch into the ledger and its messages acknowledged, together. Acknowledging after the
  step means a student killed mid-step leaves the message pending, to be delivered again; the
  ledger makes that second delivery harmless.

Given a checkpoint directory, the trainer saves weights, optimiser, scheduler, RNG and ledger every
``training.checkpoint_every`` optimiser steps and at the end, and a new trainer resumes from them:
``student/checkpoint.py`` explains why the ledger in the checkpoint, not Redis' acknowledgements,
decides what a restarted student still has to learn.

Where the student's and the teacher's widths differ, learned projections map the student's features
to the teacher's; they train with the student and are checkpointed with it (under
``PROJECTIONS_PREFIX`` in the checkpoint's weights), but they are not part of the saved student,
which is the plain HF model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from polydistill.cluster.config import MAIN_STUDENT, JobConfig
from polydistill.storage import wire
from polydistill.storage.keys import JobKeys, dev_accuracy_field
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import Entry, JobStreams, connect_job
from polydistill.student.build import task_folder
from polydistill.student.checkpoint import (
    CheckpointError,
    StudentCheckpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from polydistill.student.consumer import ChunkLimits, KnowledgeConsumer, StudentInputs
from polydistill.student.data_parallel import DataParallel
from polydistill.student.heads import main_head, tie_task_heads
from polydistill.student.objectives import Counts, StudentRunner, served_counts, task_head, task_loss
from polydistill.student.precision import use_bf16
from polydistill.student.strategy import SingleWorker, StepStrategy
from polydistill.student.supervised import StoppingState, after_dev_score
from polydistill.student.task_kinds import task_kind
from polydistill.student.token_inputs import reads_own_token_ids, token_source
from polydistill.student.validation import (
    NEVER_STOP,
    DevValidation,
    best_weights_file,
    epochs_to_validate,
    label_names_of,
    load_weights,
    trainable_weights,
)
from polydistill.student.vocab_trim import VOCAB_MAP_FILE, VocabMap

log = logging.getLogger(__name__)

# Feature projections travel in the checkpoint's weights under this prefix, beside the student's own.
PROJECTIONS_PREFIX = "distill_projections."


class NonFiniteLoss(RuntimeError):
    """Too many batches in a row gave a NaN or infinite loss; the message names the last one."""


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
    pseudo_labels: Counts = field(default_factory=dict)
    # Several teachers: samples each teacher labelled, per language ({teacher: {language: count}}).
    teacher_samples: Counts = field(default_factory=dict)
    # Multi-task jobs: samples applied per task.
    task_samples: dict[str, int] = field(default_factory=dict)
    # Batches whose loss was not finite: learnt from nothing (no optimiser step), counted, and the run of them.
    steps_skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0
    last_finite_loss: float = math.nan
    # training.validate_each_epoch: one dev score per completed epoch ({epoch, step, accuracy, per_language}),
    # and where the best of them stands (after_dev_score's state, as a dict).
    validation: list[dict] = field(default_factory=list)
    best_validation: dict = field(default_factory=dict)
    # training.patience: {after_epoch, patience, last_epoch} once dev stopped improving, else empty.
    stopped_early: dict = field(default_factory=dict)

    def count_wire(self, payload_bytes: int, parts: dict[str, int]) -> None:
        self.wire_bytes += payload_bytes
        for part, size in parts.items():
            self.wire_bytes_by_part[part] = self.wire_bytes_by_part.get(part, 0) + size

    def count_batch(self, knowledge: wire.Knowledge, task: str | None, pseudo_labels: Counts) -> None:
        add_counts(self.pseudo_labels, pseudo_labels)
        add_counts(self.teacher_samples, served_counts(knowledge))
        if task is not None:
            self.task_samples[task] = self.task_samples.get(task, 0) + knowledge.work.n_samples


def add_counts(into: Counts, counts: Counts) -> None:
    for key, entry in counts.items():
        total = into.setdefault(key, {})
        for name, value in entry.items():
            total[name] = total.get(name, 0) + value


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


class StudentTrainer:
    """Plain class; ``actors.shells.StudentActor`` runs it under Ray."""

    def __init__(
        self,
        config: JobConfig,
        student_init_dir: str,
        batches_per_epoch: int,
        redis_url: str,
        student_dir: str,
        name: str = MAIN_STUDENT,
        progress: Callable[[dict], None] | None = None,
        checkpoint_dir: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        rendezvous: str | None = None,
    ):
        self.config, self.name, training = config, name, config.training
        self.init_dir = Path(student_init_dir)
        self.student_dir = Path(student_dir)
        self.progress = progress
        torch.set_num_threads(config.student.threads)
        torch.manual_seed(training.seed)
        self.device = torch.device("cuda" if config.student.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.main_head, self._training_only = main_head(config, self.init_dir, self.device)
        head = self.main_head
        self.model, self.contract, self.projections = head.model, head.contract, head.projections
        self.task_heads = tie_task_heads(self.main_head, self.init_dir, self.device)
        # A student with a trimmed vocabulary reads the teacher tokenizer's ids through this table, unless
        # it reads its trimmed tokenizer's own ids of the texts (student/token_inputs.py).
        map_path = self.init_dir / VOCAB_MAP_FILE
        self.runner = StudentRunner(
            self.device, use_bf16(training.precision == "bfloat16", self.device.type, "training.precision"),
            VocabMap.load(map_path).table if map_path.exists() and not reads_own_token_ids(config) else None)
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.group = self.keys.student_group(name)
        # Data-parallel workers share the student's consumer group, each as its own consumer.
        self.consumer = KnowledgeConsumer(
            JobStreams.of_job(connect_job(redis_url, config.transport), self.keys, config.transport), self.keys, self.group,
            name if world_size == 1 else f"{name}-w{rank}",
            EpochLedger(batches_per_epoch=batches_per_epoch, epochs=training.epochs),
            shared_stream=config.knowledge_stream_shared, block_ms=config.transport.block_ms,
            reconnect_timeout_s=config.transport.reconnect_timeout_s, chunk_limits=ChunkLimits.of(config.transport),
            inputs=StudentInputs.of(self.model.config, source=token_source(config),
                                    id_map_size=None if self.runner.id_map is None else len(self.runner.id_map)))
        # Data-parallel workers apply up to world_size batches per optimiser step.
        total_steps = -(-batches_per_epoch * training.epochs // world_size)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(training.warmup_ratio * total_steps), total_steps
        )
        self.state = TrainingState()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resumed_from_step: int | None = None
        self.dev = (DevValidation(config, self.init_dir, label_names_of(self.model))
                    if training.validate_each_epoch else None)
        self._best_weights: dict[str, Tensor] | None = None
        if self.checkpoint_dir is not None:
            self.resume()
        self.strategy: StepStrategy = (
            SingleWorker(self.consumer, training.stall_timeout_s, config.transport.prefetch) if world_size == 1 else
            DataParallel(self.consumer, rank, world_size, rendezvous, self.device,
                         [*self.model.parameters(), *self.projections.parameters()], training.stall_timeout_s))

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the student and the feature projections (and a multi-task job's heads),
        each parameter once although the heads share the encoder."""
        unique = {id(p): p for p in (*self.model.parameters(), *self.projections.parameters()) if p.requires_grad}
        return list(unique.values())

    @property
    def ledger(self) -> EpochLedger:
        return self.consumer.ledger

    def missing(self) -> list[tuple[int, int]]:
        """Every (epoch, batch) these weights have not learnt from: what the driver must (re-)feed."""
        return self.consumer.missing()

    # -- the loop ---------------------------------------------------------------------------
    def train(self, should_stop: Callable[[], bool] = lambda: False) -> dict:
        """Learns until the ledger holds every batch of every epoch, or until told to stop (what is not
        acknowledged then stays pending for a resumed run); then a last checkpoint and the student."""
        self.model.train()
        started = time.perf_counter()
        try:
            while not self.ledger.complete and not self.strategy.stopped:
                for entry_id, payload in self.fetch(should_stop):
                    self.apply(entry_id, payload)
        finally:
            self.strategy.close()
        if self.strategy.leads:
            self.checkpoint()
            self.save()
        return self.summary(time.perf_counter() - started)

    def fetch(self, should_stop: Callable[[], bool] = lambda: False) -> list[Entry]:
        """The messages this worker handles next, as its strategy reads them."""
        entries = self.strategy.fetch(should_stop)
        self.state.wait_seconds += self.consumer.take_waited_seconds()
        return entries

    def apply(self, entry_id: str | None, payload: bytes | None) -> bool:
        """One fetched message (None: a data-parallel round without one) from agreement to checkpoint;
        True when an optimiser step was taken."""
        round_ = self.strategy.agree(entry_id, payload)
        self.state.count_wire(round_.wire_bytes, round_.wire_parts)
        if not round_.learnt:
            self.consumer.done(round_)  # copies counted, entries acknowledged
            return False
        computed = time.perf_counter()
        stepped_before = self.state.optimizer_steps
        values = self.step(round_.knowledge)
        self.state.compute_seconds += time.perf_counter() - computed
        self.consumer.done(round_)
        if values is not None and self.strategy.leads:
            self.log(round_.knowledge.work.epoch, values)
        stepped = self.state.optimizer_steps > stepped_before  # a skipped (non-finite) batch takes no step
        if self.dev is not None and self.strategy.leads:
            self.validate_completed_epochs()
        if self.strategy.leads and stepped and self.state.optimizer_steps % self.config.training.checkpoint_every == 0:
            self.checkpoint()
        return True

    def validate_completed_epochs(self) -> None:
        """Scores the student on dev for each epoch the ledger has just completed; keeps the best weights."""
        for epoch in epochs_to_validate(self.ledger, (score["epoch"] for score in self.state.validation)):
            accuracy, per_language = self.dev(self.model)
            self.state.validation.append({"epoch": epoch, "step": self.state.step, "accuracy": accuracy,
                                          "per_language": per_language})
            patience = self.config.training.patience or NEVER_STOP
            best, stop = after_dev_score(StoppingState(**self.state.best_validation), epoch, accuracy, patience)
            self.state.best_validation = asdict(best)
            log.info("student %s: dev accuracy %.4f after epoch %d (best %.4f, epoch %d)", self.name, accuracy,
                     epoch, best.best_score, best.best_step)
            if self.progress is not None:  # live: a search's scheduler (cluster/tune_schedule.py) reads it
                self.progress({**self.progress_fields(), dev_accuracy_field(epoch): accuracy})
            if stop and not self.state.stopped_early:
                self.end_early(epoch, patience)
            if self.config.training.keep_best and best.best_step == epoch:
                self._best_weights = trainable_weights(self.model)
                self.keep_best_on_disk(epoch)
            elif stop:
                self.checkpoint()  # a restarted student must not train the epochs dropped

    def end_early(self, epoch: int, patience: int) -> None:
        """Dev has not improved for ``patience`` epochs: the plan ends here (or with the next epoch, when a
        batch of it was applied already); the batches of later epochs are acknowledged and dropped."""
        last = self.consumer.end_after(epoch)
        self.state.stopped_early = {"after_epoch": epoch, "patience": patience, "last_epoch": last}
        log.info("student %s: no new best dev score in %d epochs; training ends after epoch %d of %d", self.name,
                 patience, last, self.ledger.epochs)

    def keep_best_on_disk(self, epoch: int) -> None:
        """A restarted student keeps the best epoch's weights too: they are written under the epoch's name,
        then a checkpoint records the score, then older epochs' files go (a kill between the steps leaves
        the file the checkpoint names)."""
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / best_weights_file(epoch)
        torch.save(self._best_weights, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        self.checkpoint()
        for older in self.checkpoint_dir.glob(best_weights_file("*")):
            if older != path:
                older.unlink(missing_ok=True)

    def step(self, knowledge: wire.Knowledge | None) -> dict[str, float] | None:
        """forward → loss → backward on this worker's batch (None: a data-parallel worker without one this
        round), the gradients combined by the strategy, one optimiser step; the loss and its terms."""
        values = None
        skipped = False
        if knowledge is not None:
            loss, terms = self.loss(knowledge)
            self.state.last_loss = float(loss.detach())
            if math.isfinite(self.state.last_loss):
                loss.backward()
                self.state.nonfinite_in_row = 0
                self.state.last_finite_loss = self.state.last_loss
                values = {"loss": self.state.last_loss, **terms}
            else:
                skipped = True
                self.skip_nonfinite(knowledge, terms)
        # A data-parallel round still steps on the other workers' gradients (this worker's count as zero).
        self.state.step += self.strategy.combine_gradients(self.parameters())
        if skipped and isinstance(self.strategy, SingleWorker):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.update()
        return values

    def skip_nonfinite(self, knowledge: wire.Knowledge, terms: dict[str, float]) -> None:
        """A batch whose loss is NaN or infinite teaches nothing and would ruin the weights: it is not
        stepped on, only counted; a run of them means the job itself is broken, and it stops."""
        self.state.steps_skipped_nonfinite += 1
        self.state.nonfinite_in_row += 1
        work = knowledge.work
        bad = [name for name, value in terms.items() if name != "total" and not math.isfinite(value)] or ["total"]
        where = (f"batch {work.batch_id} of epoch {work.epoch}: loss {self.state.last_loss} "
                 f"(non-finite terms: {', '.join(bad)}; last finite loss {self.state.last_finite_loss:.5g})")
        limit = self.config.training.max_nonfinite_in_row
        if self.state.nonfinite_in_row >= limit:
            raise NonFiniteLoss(
                f"{limit} batches in a row gave a non-finite loss, the last {where}: lower training.lr, check "
                "the teacher's knowledge for NaN/inf, or raise training.max_nonfinite_in_row")
        log.warning("skipping %s", where)

    def loss(self, knowledge: wire.Knowledge) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch through the head of its task, and its terms; counts the batch."""
        task, head = task_head(knowledge, self.main_head, self.task_heads)
        objective = task_kind(head.config.task).objective
        labels, pseudo_labels = objective.labels(knowledge, head.config)
        outputs = objective.forward(self.runner, head, knowledge, labels)
        loss, terms = objective.loss(outputs, knowledge, labels, head)
        self.state.count_batch(knowledge, task, pseudo_labels)
        return task_loss(task, head, loss, terms)

    def update(self) -> None:
        """One optimiser step on the gradients in place (clipped), and the schedule."""
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1

    def log(self, epoch: int, values: dict[str, float]) -> None:
        if self.state.step % self.config.training.log_every and not self.ledger.complete:
            return
        entry = {"step": self.state.step, "epoch": epoch, **{k: round(v, 5) for k, v in values.items()}}
        self.state.loss_history.append(entry)
        if self.progress is not None:
            self.progress(self.progress_fields())

    def progress_fields(self) -> dict:
        """What the student's progress hash says of it (``StudentActor`` writes it for the driver and the CLI)."""
        return {"step": self.state.step, "samples": self.ledger.samples_applied, "loss": self.state.last_loss,
                "batches": self.ledger.batches_applied, "steps_skipped_nonfinite": self.state.steps_skipped_nonfinite}

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Saves everything a restarted student needs, atomically; a no-op without a directory."""
        if self.checkpoint_dir is None:
            return
        torch_rng, rng = capture_rng()
        save_checkpoint(self.checkpoint_dir, StudentCheckpoint(
            model=pack_weights(self.model, self.projections),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            torch_rng=torch_rng,
            rng=rng,
            ledger=self.consumer.ledger_state(),
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
                f"{sorted(self.projections.state_dict())} (distill.hidden_layers, distill.embedding_weight, distill.align_weight, or the "
                "models' widths changed); resume with the job's own config (OUTPUT/job.yaml)"
            ) from None
        self.model.load_state_dict(model_state)
        if self.config.training.keep_best and state.best_validation:
            best_file = self.checkpoint_dir / best_weights_file(state.best_validation["best_step"])
            if not best_file.is_file():
                raise CheckpointError(f"{where} names dev's best epoch {state.best_validation['best_step']} but "
                                      f"{best_file.name} is missing; resume with the run's whole output folder")
            self._best_weights = torch.load(best_file, map_location=self.device)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        restore_rng(checkpoint.torch_rng, checkpoint.rng)
        self.consumer.restore(ledger)
        self.state = state
        self.resumed_from_step = state.step
        log.info("student %s resumed from step %d (%d batches applied)", self.name, state.step,
                 ledger.batches_applied)

    # -- the end ----------------------------------------------------------------------------
    def save(self) -> None:
        self.student_dir.mkdir(parents=True, exist_ok=True)
        # Training-only settings (attention dropout off for attention distillation) do not follow the student.
        for key, value in self._training_only.items():
            setattr(self.model.config, key, value)
        if self._best_weights is not None:  # training.keep_best: the epoch that scored best on dev
            load_weights(self.model, self._best_weights)
        self.model.save_pretrained(self.student_dir)
        AutoTokenizer.from_pretrained(self.init_dir).save_pretrained(self.student_dir)
        portable_files = task_kind(self.config.task).portable_files
        if portable_files is not None:
            portable_files(self.student_dir, self.config)
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
            "validation": self.state.validation,
            "kept_epoch": (self.state.best_validation.get("best_step")
                           if self._best_weights is not None else None),
            "epochs_trained": self.ledger.epochs_kept,
            "stopped_early": self.state.stopped_early or None,
            "steps_skipped_nonfinite": self.state.steps_skipped_nonfinite,
            "chunk_batches_given_up": self.consumer.batches_given_up,
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
            **self.strategy.summary(self.state.optimizer_steps),
        }

    def _per_sample(self, total: int) -> float | None:
        samples = self.strategy.wire_samples(self.ledger)  # a data-parallel worker: the messages it read itself
        return round(total / samples, 1) if samples else None
