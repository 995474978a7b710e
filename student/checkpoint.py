"""Student checkpoints, and why the ledger inside them is what makes a student crash exact.

What a checkpoint holds (``OUTPUT/checkpoints/student/``)::

    model.pt  optimizer.pt  scheduler.pt  rng.pt   torch.save of state dicts and tensors only,
                                                  read back with ``weights_only=True``
    rng.json                                      numpy's and Python's RNG states
    ledger.json                                   ``EpochLedger.to_dict()``: the (epoch, batch)
                                                  pairs these weights have learnt from
    state.json                                    training counters, loss history, and what
                                                  job and plan the checkpoint belongs to

It is written into a sibling temp directory, flushed to disk, and swapped in with two
renames (current -> ``.student.old``, temp -> current). A crash at any point leaves either the
previous complete checkpoint or the new one: ``find_checkpoint`` falls back to ``.old`` when
it died between the renames, and never reads a temp directory. Nothing is pickled: tensors go
through torch's weights-only format, everything else through JSON.

Exactly once across a student crash
-----------------------------------
The student acknowledges (and deletes) a knowledge message right after the optimiser step that
used it. That ack is only *provisionally* safe: if the student dies later, the weights of every
step since its last checkpoint die with it, yet Redis no longer holds those batches. So Redis'
acknowledgements are not the record of what the student has learnt; the ledger saved
*together with the weights* is. Weights, optimiser, scheduler, RNG and ledger are captured at
the same instant, between two steps, so "in the checkpoint's ledger" means exactly "in these
weights".

On a restart the student loads the checkpoint and reports ``ledger.missing()``: every
(epoch, batch) not in these weights, including those applied and acknowledged after the
checkpoint. The driver then (see ``cluster/recovery.py``) stops the feeder, empties the work
and knowledge streams and recreates their groups in one transaction, and re-feeds exactly the
missing pairs (``Feeder.feed(only=...)``; the batch plan is a pure function, so a batch is
rebuilt identically). Clearing first keeps stale copies from being computed twice; any copy
that still slips through (a teacher that was mid-batch during the reset) arrives as a
duplicate, which the ledger drops. Hence every batch is applied to the final weights exactly
once: at least once because everything not in the ledger is re-fed after the reset, at most
once because the ledger refuses a second application.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt")
_JSON_FILES = ("rng.json", "ledger.json", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, incomplete, or made for another job or plan."""


@dataclass
class StudentCheckpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: dict[str, Any]  # tensors: the CPU generator state and one per CUDA device
    rng: dict[str, Any]  # JSON: numpy's and Python's generator states
    ledger: dict[str, Any]
    state: dict[str, Any]


# -- RNG states ---------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part, JSON part) of every generator training may draw from (dropout, shuffles)."""
    tensors: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    plain = {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, plain


def restore_rng(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available() and len(tensors["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    state = plain["numpy"]
    np.random.set_state((state["kind"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    state = plain["python"]
    random.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))


# -- writing ------------------------------------------------------------------------------------
def _sidecars(directory: Path) -> tuple[Path, Path]:
    return directory.parent / f".{directory.name}.tmp", directory.parent / f".{directory.name}.old"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, checkpoint: StudentCheckpoint) -> Path:
    """Writes the checkpoint atomically to ``directory`` (replacing any previous one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _sidecars(directory)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write: never read
    tmp.mkdir()
    torch.save(checkpoint.model, tmp / "model.pt")
    torch.save(checkpoint.optimizer, tmp / "optimizer.pt")
    torch.save(checkpoint.scheduler, tmp / "scheduler.pt")
    torch.save(checkpoint.torch_rng, tmp / "rng.pt")
    (tmp / "rng.json").write_text(json.dumps(checkpoint.rng), encoding="utf-8")
    (tmp / "ledger.json").write_text(json.dumps(checkpoint.ledger), encoding="utf-8")
    state = {"format": FORMAT_VERSION, **checkpoint.state}
    (tmp / "state.json").write_text(json.dumps(state, default=float), encoding="utf-8")
    for name in (*_TENSOR_FILES, *_JSON_FILES):
        _fsync(tmp / name)
    _fsync(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


# -- reading ------------------------------------------------------------------------------------
def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at ``directory``, or the previous one if a save died mid-swap."""
    directory = Path(directory)
    _, old = _sidecars(directory)
    for candidate in (directory, old):
        if candidate.is_dir() and all((candidate / name).is_file() for name in (*_TENSOR_FILES, *_JSON_FILES)):
            return candidate
    return None


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> StudentCheckpoint | None:
    """The checkpoint at ``directory`` (see ``find_checkpoint``), or None when there is none."""
    found = find_checkpoint(directory)
    if found is None:
        return None
    try:
        tensors = {
            name: torch.load(found / f"{name}.pt", map_location=map_location, weights_only=True)
            for name in ("model", "optimizer", "scheduler")
        }
        torch_rng = torch.load(found / "rng.pt", map_location="cpu", weights_only=True)
        plain = {name: json.loads((found / f"{name}.json").read_text(encoding="utf-8"))
                 for name in ("rng", "ledger", "state")}
    except Exception as exc:  # torn or foreign files: OSError, UnpicklingError, JSON errors, ...
        raise CheckpointError(
            f"the student checkpoint in {found} cannot be read ({exc}); delete it to start the student afresh"
        ) from exc
    if plain["state"].get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"the student checkpoint in {found} has format {plain['state'].get('format')!r}; this version reads "
            f"format {FORMAT_VERSION}"
        )
    return StudentCheckpoint(
        model=tensors["model"], optimizer=tensors["optimizer"], scheduler=tensors["scheduler"],
        torch_rng=torch_rng, rng=plain["rng"], ledger=plain["ledger"], state=plain["state"],
    )


def discard_checkpoint(directory: str | Path) -> None:
    """Removes a checkpoint and its sidecars (a fresh ``run`` into an old output directory)."""
    directory = Path(directory)
    for path in (directory, *_sidecars(directory)):
        shutil.rmtree(path, ignore_errors=True)
