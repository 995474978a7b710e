"""The student worker: consumes knowledge messages and trains the student on them.

The loop reads top to bottom: fetch a message, skip it if the ledger has it, forward, losses,
step, acknowledge, log. Acknowledging after the step means a student killed mid-step leaves
the message pending, to be delivered again; the ledger makes that second delivery harmless.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from cluster.config import JobConfig
from storage import wire
from storage.keys import JobKeys
from storage.ledger import EpochLedger
from storage.streams import JobStreams, connect
from student.vocab_trim import VOCAB_MAP_FILE, VocabMap
from student.losses import combine_losses, hard_label_ce, soft_label_kl, soft_label_kl_topk

log = logging.getLogger(__name__)


class StallError(RuntimeError):
    """No knowledge arrived for too long: the teachers are gone or stuck."""


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
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        self.group = self.keys.student_group(name)
        self.streams = JobStreams(
            connect(redis_url, password=config.transport.password, tls_ca_file=config.transport.tls_ca_file),
            self.keys,
        )
        training = config.training
        self.ledger = EpochLedger(batches_per_epoch=batches_per_epoch, epochs=training.epochs)
        total_steps = batches_per_epoch * training.epochs
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(training.warmup_ratio * total_steps), total_steps
        )
        self.state = TrainingState()

    # -- the loop ---------------------------------------------------------------------------
    def train(self, should_stop: Callable[[], bool] = lambda: False) -> dict:
        self.model.train()
        started = time.perf_counter()
        last_message = time.monotonic()
        pending = self.streams.read_pending(self.keys.knowledge_stream, self.group, self.name, count=64)
        while not self.ledger.complete and not should_stop():
            entries = pending or self.fetch()
            pending = []
            if entries:
                last_message = time.monotonic()
            elif time.monotonic() - last_message > self.config.training.stall_timeout_s:
                raise StallError(
                    f"no knowledge for {self.config.training.stall_timeout_s:.0f} s with "
                    f"{len(self.ledger.missing())} batches still missing: are the teacher replicas running? "
                    "(raise training.stall_timeout_s if teachers are just slow to start)"
                )
            for entry_id, payload in entries:
                self.apply(entry_id, payload)
        self.save()
        return self.summary(time.perf_counter() - started)

    def fetch(self) -> list[tuple[bytes, bytes]]:
        waited = time.perf_counter()
        entries = self.streams.read(
            self.keys.knowledge_stream, self.group, self.name, count=1, block_ms=self.config.transport.block_ms
        )
        self.state.wait_seconds += time.perf_counter() - waited
        return entries

    def apply(self, entry_id: bytes, payload: bytes) -> None:
        stream = self.keys.knowledge_stream
        try:
            knowledge = wire.decode(payload)
            if not isinstance(knowledge, wire.Knowledge) or knowledge.work.job_id != self.keys.job_id:
                raise wire.WireError("not a knowledge message of this job")
        except wire.WireError as exc:
            log.error("dead-lettering knowledge entry %s: %s", entry_id, exc)
            self.streams.dead_letter(entry_id, payload, str(exc), stream)
            self.streams.ack_and_delete(stream, self.group, [entry_id])
            return
        work = knowledge.work
        if self.ledger.is_applied(work.epoch, work.batch_id):
            self.ledger.count_duplicate()
        else:
            computed = time.perf_counter()
            values = self.step(knowledge)
            self.state.compute_seconds += time.perf_counter() - computed
            self.ledger.record(work.epoch, work.batch_id, work.n_samples)
            self.log(work.epoch, values)
        self.streams.ack_and_delete(stream, self.group, [entry_id])

    def step(self, knowledge: wire.Knowledge) -> dict[str, float]:
        work = knowledge.work
        token_ids = work.input_ids if self.id_map is None else self.id_map[work.input_ids]
        input_ids = torch.from_numpy(token_ids.astype(np.int64)).to(self.device)
        attention_mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(self.device)
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
        }

