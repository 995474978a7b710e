"""The chaos run's faults, as they happen on a real node: a process killed by SIGKILL (a pre-empted
node, an OOM kill), Redis restarted or down, and bad messages written into a running job's streams
(a buggy or hostile producer)."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

import msgpack
import numpy as np

from polydistill.storage import wire

PAST_ANY_VOCABULARY = 10_000_000  # a token id no model's vocabulary reaches
PAST_ANY_POSITIONS = 4096  # rows longer than the positions of the models this script runs
TEMPLATE_WAIT_S = 30.0  # how long a poison fault waits for a message to copy


class NothingToKill(RuntimeError):
    """No live actor of the class: its work was done (replicas end with the feed), so the fault has no target."""


def kill_actor_process(class_name: str, rng: random.Random) -> str:
    """SIGKILLs the worker process of one live actor of ``class_name`` in this Ray session."""
    from ray._private import state  # the integration tests use the same view of live actors

    alive = sorted((info for info in state.actors().values()
                    if info["ActorClassName"] == class_name and info["State"] == "ALIVE"),
                   key=lambda info: info["Pid"])
    if not alive:
        raise NothingToKill(f"no live {class_name} to kill")
    victim = rng.choice(alive)
    os.kill(victim["Pid"], signal.SIGKILL)
    return f"SIGKILL pid {victim['Pid']} ({len(alive)} {class_name} alive)"


def _newest(client, stream: str) -> tuple[bytes, bytes] | None:
    newest = client.xrevrange(stream, count=1)
    return (newest[0][0], newest[0][1][b"m"]) if newest else None


def _wait_for_message(client, streams: list[str]) -> tuple[str, bytes, bytes]:
    deadline = time.monotonic() + TEMPLATE_WAIT_S
    while time.monotonic() < deadline:
        for stream in streams:
            entry = _newest(client, stream)
            if entry is not None:
                return stream, *entry
        time.sleep(0.02)
    raise RuntimeError(f"no message in {streams} to copy for {TEMPLATE_WAIT_S:g} s")


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ("1700000000000-12") as numbers: as text, "...-9" would sort after "...-12"."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, sequence = text.split("-")
    return int(milliseconds), int(sequence)


def _overflowing(batch: wire.WorkBatch) -> bytes:
    """The batch's bytes with input_ids and mask claiming [2**32, 2**32] (int64 sizes multiply to 0)."""
    body = msgpack.unpackb(wire.encode(batch), raw=False)
    for name in ("input_ids", "attention_mask"):
        body[name] = {"dtype": "int32", "shape": [2**32, 2**32], "raw": b""}
    return msgpack.packb(body, use_bin_type=True)


def poison_work(client, keys) -> tuple[str, int]:
    """Three bad work batches: a copy of a planned batch with token ids past any vocabulary (it takes
    the place of the original when no teacher has read that yet: its samples are then dead-lettered),
    one whose shape overflows, and one with rows longer than any model's positions."""
    # Late in a job the work stream may be empty (every batch read and acknowledged): a knowledge
    # message carries its work batch too.
    stream, entry_id, payload = _wait_for_message(client, [keys.work_stream, keys.knowledge_stream])
    message = wire.decode(payload)
    batch = message.work if isinstance(message, wire.Knowledge) else message
    stream = keys.work_stream
    past_vocabulary = dataclasses.replace(batch, input_ids=np.full_like(batch.input_ids, PAST_ANY_VOCABULARY))
    too_long = dataclasses.replace(batch, input_ids=np.ones((batch.n_samples, PAST_ANY_POSITIONS), np.int32),
                                   attention_mask=np.ones((batch.n_samples, PAST_ANY_POSITIONS), np.uint8))
    groups = client.xinfo_groups(stream)
    unread = (bool(groups) and isinstance(message, wire.WorkBatch)
              and _stream_id(entry_id) > _stream_id(groups[0]["last-delivered-id"]))
    transaction = client.pipeline(transaction=True)
    if unread:
        transaction.xdel(stream, entry_id)
    for bad in (wire.encode(past_vocabulary), _overflowing(batch), wire.encode(too_long)):
        transaction.xadd(stream, {b"m": bad})
    swapped = bool(transaction.execute()[0]) if unread else False
    where = f"epoch {batch.epoch} batch {batch.batch_id}"
    return (f"3 bad work batches; {where} {'swapped for its bad copy' if swapped else 'copied (already read)'}",
            3)


def poison_knowledge(client, keys) -> tuple[str, int]:
    """Two bad knowledge messages: a copy moved to an epoch outside the plan, and a copy with token ids
    past any vocabulary. The planned batch itself still arrives in its own message."""
    _, _, payload = _wait_for_message(client, [keys.knowledge_stream])
    knowledge = wire.decode(payload)
    work = knowledge.work
    outside = dataclasses.replace(knowledge, work=dataclasses.replace(work, epoch=work.epoch + 1000))
    past_vocabulary = dataclasses.replace(
        knowledge, work=dataclasses.replace(work, input_ids=np.full_like(work.input_ids, PAST_ANY_VOCABULARY)))
    for bad in (outside, past_vocabulary):
        client.xadd(keys.knowledge_stream, {b"m": wire.encode(bad)})
    return f"2 bad knowledge messages (copies of epoch {work.epoch} batch {work.batch_id})", 2
