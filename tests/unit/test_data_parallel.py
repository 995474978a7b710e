"""The decision of a data-parallel round, and the gradient average, on two real gloo workers."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from polydistill.student.data_parallel import GradientSync, RoundRow, decide_round, free_rendezvous


def test_a_round_applies_each_new_batch_once_and_the_same_on_every_worker():
    applied = {(0, 3)}
    table = [RoundRow(True, 0, 5, 32), RoundRow(True, 0, 3, 32), RoundRow(False), RoundRow(True, 0, 5, 32),
             RoundRow(True, 1, 5, 16)]
    assert decide_round(table, lambda e, b: (e, b) in applied) == [True, False, False, False, True]
    assert decide_round([RoundRow(False), RoundRow(False)], lambda e, b: False) == [False, False]
    assert RoundRow.from_list(RoundRow(True, 2, 7, 9, stop=True).as_list()) == RoundRow(True, 2, 7, 9, True)


def _worker(rank: int, rendezvous: str, grads: list[list[float]], applies: list[bool], out) -> None:
    torch.manual_seed(rank)  # different starting weights: the broadcast must make them equal
    sync = GradientSync(rank, 2, rendezvous, torch.device("cpu"))
    parameter = torch.nn.Parameter(torch.randn(3))
    sync.broadcast_parameters([parameter])
    table = sync.exchange(RoundRow(applies[rank], 0, rank, 4))
    parameter.grad = torch.tensor(grads[rank]) if applies[rank] else None
    sync.average_gradients([parameter], sum(row.has_batch for row in table))
    out.put((rank, parameter.detach().tolist(), parameter.grad.tolist(), [r.batch_id for r in table]))
    sync.close()


@pytest.mark.parametrize("applies", [[True, True], [True, False]], ids=["both", "one"])
def test_gradients_are_averaged_over_the_batches_applied(applies):
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    rendezvous = free_rendezvous("127.0.0.1")
    grads = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]
    workers = [context.Process(target=_worker, args=(rank, rendezvous, grads, applies, out)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = dict((rank, rest) for rank, *rest in (out.get(timeout=60) for _ in workers))
    for worker in workers:
        worker.join(timeout=30)
    (weights0, grad0, table0), (weights1, grad1, table1) = results[0], results[1]
    assert weights0 == weights1 and table0 == table1 == [0, 1]
    expected = [2.0, 2.0, 2.0] if all(applies) else [1.0, 2.0, 3.0]
    assert grad0 == grad1 == pytest.approx(expected)
