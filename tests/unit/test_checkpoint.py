"""Student checkpoints: atomic save, weights-only load, RNG and ledger round trips."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from polydistill.storage.ledger import EpochLedger
from polydistill.student.checkpoint import (
    CheckpointError,
    StudentCheckpoint,
    capture_rng,
    discard_checkpoint,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def small_training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def make_checkpoint(model, optimizer, scheduler, step: int = 3) -> StudentCheckpoint:
    ledger = EpochLedger(batches_per_epoch=4, epochs=2)
    for batch in range(step):
        ledger.record(0, batch, 16)
    torch_rng, rng = capture_rng()
    return StudentCheckpoint(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        torch_rng=torch_rng, rng=rng, ledger=ledger.to_dict(),
        state={"job_id": "job-a", "training": {"step": step, "last_loss": float("nan")}},
    )


def test_round_trip_restores_weights_optimizer_scheduler_ledger_and_state(tmp_path):
    model, optimizer, scheduler = small_training_state()
    save_checkpoint(tmp_path / "student", make_checkpoint(model, optimizer, scheduler))
    loaded = load_checkpoint(tmp_path / "student")

    fresh, fresh_opt, fresh_sched = small_training_state()
    torch.nn.init.zeros_(fresh[0].weight)
    fresh.load_state_dict(loaded.model)
    fresh_opt.load_state_dict(loaded.optimizer)
    fresh_sched.load_state_dict(loaded.scheduler)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_sched.last_epoch == scheduler.last_epoch == 3
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    ledger = EpochLedger.from_dict(loaded.ledger)
    assert ledger.missing() == [(0, 3)] + [(1, b) for b in range(4)]
    assert loaded.state["job_id"] == "job-a" and loaded.state["training"]["step"] == 3
    # Only tensors and JSON on disk: every .pt file loads with weights_only=True.
    for name in ("model", "optimizer", "scheduler", "rng"):
        torch.load(tmp_path / "student" / f"{name}.pt", weights_only=True)


def test_rng_states_continue_exactly_where_they_were():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    tensors, plain = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    json.dumps(plain)  # the non-tensor part is plain JSON
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng(tensors, plain)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_a_save_that_died_half_way_leaves_the_previous_checkpoint_readable(tmp_path):
    model, optimizer, scheduler = small_training_state()
    target = tmp_path / "checkpoints" / "student"
    save_checkpoint(target, make_checkpoint(model, optimizer, scheduler, step=2))
    # A crash while writing the next one: only its temp directory exists, with some files.
    tmp = target.parent / ".student.tmp"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"torn")
    assert load_checkpoint(target).state["training"]["step"] == 2
    # A crash between the two renames: only the previous one, moved aside, exists.
    target.rename(target.parent / ".student.old")
    assert find_checkpoint(target) == target.parent / ".student.old"
    assert load_checkpoint(target).state["training"]["step"] == 2
    # The next save cleans both sidecars up.
    save_checkpoint(target, make_checkpoint(model, optimizer, scheduler, step=3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["student"]
    assert load_checkpoint(target).state["training"]["step"] == 3
    discard_checkpoint(target)
    assert load_checkpoint(target) is None


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = small_training_state()
    save_checkpoint(tmp_path / "student", make_checkpoint(model, optimizer, scheduler))
    (tmp_path / "student" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "student")
