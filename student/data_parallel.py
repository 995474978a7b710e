"""Data-parallel students: several workers train one student from one consumer group.

Each worker reads its own knowledge messages from the student's group (Redis hands each message
to one consumer), so W workers take W batches per round. A round is lock-step:

    1. each worker fetches at most one new message
    2. exchange (has a batch, epoch, batch id, samples, wants to stop) with all workers
    3. ``decide_round``: which of the batches are applied (a batch the ledger already has, or
       that a lower rank holds too, is skipped; every worker decides the same from the same table)
    4. the workers that apply one run forward and backward; the others contribute zero gradients
    5. gradients are summed across workers and divided by the number of applied batches: the
       update is that of one step over their union
    6. every worker records every applied batch in its ledger, so all ledgers stay equal and
       rank 0's answers the driver (missing batches, checkpoints)

``DataParallel`` is this as a step strategy of the one training loop (``student/strategy.py``).
Gradients travel over ``torch.distributed`` (gloo on CPUs, nccl on GPUs). Rank 0 is the Ray
actor the driver knows; it starts the other workers as actors it owns, so a worker that dies
takes the group down with it, and the driver restarts the student from its last checkpoint
like any lost student.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from polydistill.storage import wire
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import GroupMissing
from polydistill.student.consumer import KnowledgeConsumer, LearntBatch, Round, StallError

COLLECTIVE_TIMEOUT_S = 120
# After Redis lost its data, how long a worker waits before its next round: the driver recreates the
# group and re-feeds meanwhile.
GROUP_MISSING_PAUSE_S = 0.2


@dataclass(frozen=True)
class RoundRow:
    """One worker's line of a round's table."""

    has_batch: bool
    epoch: int = -1
    batch_id: int = -1
    samples: int = 0
    stop: bool = False

    def as_list(self) -> list[int]:
        return [int(self.has_batch), self.epoch, self.batch_id, self.samples, int(self.stop)]

    @classmethod
    def from_list(cls, values: Iterable[int]) -> "RoundRow":
        has, epoch, batch_id, samples, stop = (int(v) for v in values)
        return cls(bool(has), epoch, batch_id, samples, bool(stop))


def decide_round(table: list[RoundRow], is_applied: Callable[[int, int], bool]) -> list[bool]:
    """Per rank: does its batch count this round? Same table, same answer on every worker."""
    taken: set[tuple[int, int]] = set()
    decisions = []
    for row in table:
        key = (row.epoch, row.batch_id)
        applies = row.has_batch and not is_applied(*key) and key not in taken
        if applies:
            taken.add(key)
        decisions.append(applies)
    return decisions


def free_rendezvous(host: str) -> str:
    """A tcp:// address on ``host`` with a port free right now, for ``init_process_group``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{host}:{port}"


class GradientSync:
    """The collectives of one data-parallel student."""

    def __init__(self, rank: int, world_size: int, rendezvous: str, device: torch.device):
        self.rank, self.world_size = rank, world_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        self.device = device

    def exchange(self, row: RoundRow) -> list[RoundRow]:
        mine = torch.tensor(row.as_list(), dtype=torch.int64, device=self.device)
        table = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(table, mine)
        return [RoundRow.from_list(entry.tolist()) for entry in table]

    def average_gradients(self, parameters: list[nn.Parameter], contributors: int) -> None:
        """Sum of every worker's gradients ÷ the number of batches applied this round."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= max(contributors, 1)
        offset = 0
        for parameter, grad in zip(parameters, grads):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad).clone()
            offset += size

    def broadcast_parameters(self, parameters: Iterable[torch.Tensor]) -> None:
        """Rank 0's weights everywhere, so every worker starts from the same point."""
        for tensor in parameters:
            dist.broadcast(tensor.data, src=0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class DataParallel:
    """The step strategy of a data-parallel worker: lock-step rounds of at most one message per worker,
    the round's table deciding whose batches count, gradients averaged over them (module docstring)."""

    def __init__(self, consumer: KnowledgeConsumer, rank: int, world_size: int, rendezvous: str,
                 device: torch.device, parameters: list[nn.Parameter], stall_timeout_s: float):
        self.consumer = consumer
        self.rank, self.world_size = rank, world_size
        self.stall_timeout_s = stall_timeout_s
        self.sync = GradientSync(rank, world_size, rendezvous, device)
        self.sync.broadcast_parameters(parameters)
        self.leads = rank == 0
        self.stopped = False
        self.samples_read = 0  # of the messages this worker read itself
        self._stop_wanted = False
        self._round_batches = 0
        self._last_batch: float | None = None  # the stall clock starts with the first round

    def fetch(self, should_stop: Callable[[], bool]) -> list[tuple[str | None, bytes | None]]:
        try:
            entries = self.consumer.read_new()
        except GroupMissing:
            time.sleep(GROUP_MISSING_PAUSE_S)
            entries = []
        self._stop_wanted = should_stop()
        # Every worker takes part in every round, with a message or without one.
        return entries[:1] or [(None, None)]

    def agree(self, entry_id: str | None, payload: bytes | None) -> Round:
        """The round's table of every worker's message, and which of their batches count."""
        knowledge = None if entry_id is None else self.consumer.accept(entry_id, payload)
        if knowledge is None:
            mine, read = RoundRow(False, stop=self._stop_wanted), Round()
        else:
            work = knowledge.work
            mine = RoundRow(True, work.epoch, work.batch_id, work.n_samples, stop=self._stop_wanted)
            # A worker counts the bytes and samples of what it read itself, whether the round applies it or not.
            read = Round(entry_ids=(entry_id,), wire_bytes=len(payload), wire_parts=wire.knowledge_nbytes(knowledge))
            self.samples_read += work.n_samples
        table = self.sync.exchange(mine)
        if any(row.stop for row in table):
            self.stopped = True
            return replace(read, entry_ids=())  # this worker's message stays pending: a resumed run reads it again
        self._check_stall(table)
        decisions = decide_round(table, self.consumer.ledger.is_applied)
        learnt = tuple(LearntBatch(row.epoch, row.batch_id, row.samples)
                       for row, applies in zip(table, decisions) if applies)
        self._round_batches = len(learnt)
        duplicates = sum(row.has_batch and not applies for row, applies in zip(table, decisions))
        return replace(read, knowledge=knowledge if decisions[self.rank] else None, learnt=learnt,
                       duplicates=duplicates)

    def _check_stall(self, table: list[RoundRow]) -> None:
        if any(row.has_batch for row in table) or self._last_batch is None:
            self._last_batch = time.monotonic()
        elif time.monotonic() - self._last_batch > self.stall_timeout_s:
            raise StallError(f"no knowledge for any of the {self.world_size} workers for "
                             f"{self.stall_timeout_s:.0f} s: are the teacher replicas running?")

    def combine_gradients(self, parameters: list[nn.Parameter]) -> int:
        self.sync.average_gradients(parameters, self._round_batches)
        return self._round_batches

    def wire_samples(self, ledger: EpochLedger) -> int:
        return self.samples_read

    def summary(self, optimizer_steps: int) -> dict:
        return {"data_parallel": {"workers": self.world_size, "rank": self.rank, "samples_read": self.samples_read,
                                  "optimizer_steps": optimizer_steps}}

    def close(self) -> None:
        """Nothing runs beside the loop: the workers read in step with each other."""
