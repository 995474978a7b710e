"""The student worker: consumes knowledge messages and trains the student on them.

The loop reads top to bottom: fetch a message, skip it if the ledger has it, forward, losses,
step, acknowledge, log, checkpoint. Acknowledging after the step means a student killed
mid-step leaves the message pending, to be delivered again; the ledger makes that second
delivery harmless. Given a checkpoint directory, the trainer saves weights, optimiser,
scheduler, RNG and ledger every ``training.checkpoint_every`` steps and at the end, and a new
trainer resumes from them: ``student/checkpoint.py`` explains why the ledger in the checkpoint,
not Redis' acknowledgements, decides what a restarted student still has to learn.
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from cluster.config import JobConfig
from storage import wire
from storage.keys import JobKeys
from storage.ledger import EpochLedger
from storage.streams import GroupMissing, JobStreams, connect_job
from student.checkpoint import (
    CheckpointError,
    StudentCheckpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from student.vocab_trim import VOCAB_MAP_FILE, VocabMap
from student.losses import combine_losses, hard_label_ce, soft_label_kl, soft_label_kl_topk

log = logging.getLogger(__name__)


class StallError(RuntimeError):
    """No knowledge arrived for too long: the teachers are gone or stuck."""


# Look this often (one cheap read) at messages delivered to this student but not acknowledged: after
# Redis restarted from a snapshot, acks made after the snapshot are undone and come back pending.
_OWN_PENDING_EVERY_S = 5.0


@dataclass
class TrainingState:
    step: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    last_loss: float = math.nan
    loss_history: list[dict] = field(default_factory=list)


def distillation_losses(
    student_logits: torch.Tensor, knowledge: wire.Knowledge, config: JobConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted soft-label KL and hard-label CE for one knowledge message."""
    distill = config.distill
    terms: dict[str, torch.Tensor] = {}
    soft = knowledge.soft
    if soft is not None and distill.soft_weight > 0:
        if soft.kind == "full":
            teacher_logits = torch.tensor(soft.logits, dtype=torch.float32)
            terms["soft"] = soft_label_kl(student_logits, teacher_logits, temperature=distill.temperature)
        else:
            terms["soft"] = soft_label_kl_topk(
                student_logits,
                torch.tensor(soft.topk_values, dtype=torch.float32),
                torch.tensor(soft.topk_indices, dtype=torch.int64),
                torch.tensor(soft.topk_logsumexp, dtype=torch.float32),
                temperature=distill.temperature,
            )
    labels = knowledge.work.labels
    if labels is not None and distill.hard_weight > 0:
        terms["hard"] = hard_label_ce(student_logits, torch.tensor(labels, dtype=torch.int64))
    weights = {"soft": distill.soft_weight, "hard": distill.hard_weight}
    return combine_losses(terms, weights)


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
    ):
        self.config = config
        self.name = name
        self.init_dir = Path(student_init_dir)
        self.student_dir = Path(student_dir)
        self.progress = progress
        torch.set_num_threads(config.student.threads)
        torch.manual_seed(config.training.seed)
        self.device = torch.device("cuda" if config.student.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(self.init_dir).to(self.device)
        # A student with a trimmed vocabulary reads the teacher tokenizer's ids through this table.
        map_path = self.init_dir / VOCAB_MAP_FILE
        self.id_map = VocabMap.load(map_path).table if map_path.exists() else None
        self.bf16 = config.training.precision == "bfloat16"
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.group = self.keys.student_group(name)
        self.streams = JobStreams(connect_job(redis_url, config.transport), self.keys)
        training = config.training
        self.ledger = EpochLedger(batches_per_epoch=batches_per_epoch, epochs=training.epochs)
        # The driver reads missing() from another thread while the loop records batches.
        self._ledger_lock = threading.Lock()
        total_steps = batches_per_epoch * training.epochs
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(training.warmup_ratio * total_steps), total_steps
        )
        self.state = TrainingState()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resumed_from_step: int | None = None
        if self.checkpoint_dir is not None:
            self.resume()

    # -- the loop ---------------------------------------------------------------------------
    def train(self, should_stop: Callable[[], bool] = lambda: False) -> dict:
        self.model.train()
        started = time.perf_counter()
        last_message = time.monotonic()
        own_pending_checked = 0.0  # read this consumer's unacknowledged messages first
        while not self.ledger.complete and not should_stop():
            try:
                entries = []
                if time.monotonic() - own_pending_checked > _OWN_PENDING_EVERY_S:
                    own_pending_checked = time.monotonic()
                    entries = self.streams.read_pending(self.keys.knowledge_stream, self.group, self.name, count=64)
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
            self.keys.knowledge_stream, self.group, self.name, count=1, block_ms=self.config.transport.block_ms
        )
        self.state.wait_seconds += time.perf_counter() - waited
        return entries

    def apply(self, entry_id: bytes, payload: bytes) -> bool:
        """Trains on one knowledge message unless the ledger has it; True when a step was taken."""
        stream = self.keys.knowledge_stream
        try:
            knowledge = wire.decode(payload)
            if not isinstance(knowledge, wire.Knowledge) or knowledge.work.job_id != self.keys.job_id:
                raise wire.WireError("not a knowledge message of this job")
        except wire.WireError as exc:
            log.error("dead-lettering knowledge entry %s: %s", entry_id, exc)
            self.streams.dead_letter(entry_id, payload, str(exc), stream)
            self.streams.ack_and_delete(stream, self.group, [entry_id])
            return False
        work = knowledge.work
        stepped = not self.ledger.is_applied(work.epoch, work.batch_id)
        if not stepped:
            with self._ledger_lock:
                self.ledger.count_duplicate()
        else:
            computed = time.perf_counter()
            values = self.step(knowledge)
            self.state.compute_seconds += time.perf_counter() - computed
            with self._ledger_lock:
                self.ledger.record(work.epoch, work.batch_id, work.n_samples)
            self.log(work.epoch, values)
        # After a reset of the streams (Redis lost its data) this ack finds no group: a no-op.
        self.streams.ack_and_delete(stream, self.group, [entry_id])
        return stepped

    def step(self, knowledge: wire.Knowledge) -> dict[str, float]:
        work = knowledge.work
        token_ids = work.input_ids if self.id_map is None else self.id_map[work.input_ids]
        input_ids = torch.from_numpy(token_ids.astype(np.int64)).to(self.device)
        attention_mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss, values = distillation_losses(logits.float().cpu() if self.device.type != "cpu" else logits, knowledge,
                                           self.config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.last_loss = float(loss.detach())
        return {"loss": self.state.last_loss, **values}

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
            model=self.model.state_dict(),
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
        self.model.load_state_dict(checkpoint.model)
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
        self.model.save_pretrained(self.student_dir)
        AutoTokenizer.from_pretrained(self.init_dir).save_pretrained(self.student_dir)

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
        }

