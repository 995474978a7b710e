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

Gradients travel over ``torch.distributed`` (gloo on CPUs, nccl on GPUs). Rank 0 is the Ray
actor the driver knows; it starts the other workers as actors it owns, so a worker that dies
takes the group down with it, and the driver restarts the student from its last checkpoint
like any lost student.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT_S = 120


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
