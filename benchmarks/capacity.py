"""How many teacher replicas and students one Redis serves, per kind of knowledge.

For each kind a knowledge message of one batch (32 sequences of 128 tokens, an XLM-R-base-sized
teacher: hidden 768, 12 heads, 250,002 pieces) is encoded as a job sends it (wire v2), then one
producer thread (``JobStreams.add``, as a teacher replica publishes) and one consumer thread
(``JobStreams.read`` + ``ack_and_delete`` + ``wire.decode``, as a student) move messages through a
private Redis for a few seconds, the producer held at most ``BACKLOG`` messages ahead. What one pair
sustains is the measured rate: Redis itself runs one command at a time, so more clients share it,
and the figures say how far one Redis goes before something else gives.

From those rates and a replica's measured throughput on an H100 (``results/gpu_teacher_h100.json``:
sequences/s of that encoder in bf16), each kind's row says how many such replicas one Redis keeps
up with (each one's bytes written once, read once per student).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.summary import ratio
from polydistill.storage import wire
from polydistill.storage.keys import JobKeys
from polydistill.storage.streams import JobStreams, connect

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ_LEN, HIDDEN, HEADS, VOCAB, CLASSES = 32, 128, 768, 12, 250_002, 7
BACKLOG = 16
GROUP = "student:capacity"


@dataclass(frozen=True)
class Kind:
    name: str
    knowledge: wire.Knowledge
    codec: wire.WireCodec


def _work(rng: np.random.Generator) -> wire.WorkBatch:
    return wire.WorkBatch(job_id="bench-capacity", epoch=0, batch_id=0, sample_ids=np.arange(BATCH, dtype=np.int64),
                          languages=("eng_Latn",) * BATCH,
                          input_ids=rng.integers(5, VOCAB, size=(BATCH, SEQ_LEN), dtype=np.int32),
                          attention_mask=np.ones((BATCH, SEQ_LEN), dtype=np.uint8))


def _peaked_topk(rng: np.random.Generator, k: int) -> wire.SoftLabels:
    """Top-k of peaked logits (log-probabilities falling like -1.5·log rank), without building [.., 250k]."""
    ranks = np.arange(1, k + 1)
    values = -1.5 * np.log(ranks) + 0.3 * rng.standard_normal((BATCH, SEQ_LEN, k))
    values = -np.sort(-values, axis=-1).astype(np.float32)
    indices = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(BATCH * SEQ_LEN)])
    return wire.SoftLabels(topk_values=values, topk_indices=indices.reshape(BATCH, SEQ_LEN, k).astype(np.int32),
                           topk_logsumexp=np.full((BATCH, SEQ_LEN), 1.0, np.float32))


def kinds(seed: int = 0) -> list[Kind]:
    rng = np.random.default_rng(seed)
    work = _work(rng)
    classes = wire.SoftLabels.full(rng.normal(size=(BATCH, CLASSES)).astype(np.float32))
    hidden = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)).astype(np.float16)
    attention = rng.random(size=(BATCH, HEADS, SEQ_LEN, SEQ_LEN)).astype(np.float16)
    top32, top128 = _peaked_topk(rng, 32), _peaked_topk(rng, 128)
    v16, v8, f8 = wire.WireCodec(value_bits=16), wire.WireCodec(value_bits=8), wire.WireCodec(feature_bits=8)
    return [
        Kind("class soft labels (7 classes)", wire.Knowledge(work=work, teacher_id="t", soft=classes), v16),
        Kind("top-32 per token, 16 bits", wire.Knowledge(work=work, teacher_id="t", soft=top32), v16),
        Kind("top-128 per token, 8 bits", wire.Knowledge(work=work, teacher_id="t", soft=top128), v8),
        Kind("hidden states, one layer, fp16", wire.Knowledge(work=work, teacher_id="t", hidden_states={6: hidden}),
             v16),
        Kind("hidden states, one layer, int8", wire.Knowledge(work=work, teacher_id="t", hidden_states={6: hidden}),
             f8),
        Kind("attention maps, one layer, fp16", wire.Knowledge(work=work, teacher_id="t", attentions={6: attention}),
             v16),
    ]


def sustained(streams: JobStreams, payload: bytes, seconds: float) -> dict:
    """Messages/s one producer and one consumer thread move through Redis, the producer at most BACKLOG ahead."""
    stream = streams.keys.knowledge_stream
    streams.client.delete(stream)
    streams.ensure_group(stream, GROUP)
    produced, consumed = [0], [0]
    room = threading.Semaphore(BACKLOG)
    deadline = time.perf_counter() + seconds
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            if room.acquire(timeout=0.05):
                streams.add(stream, payload)
                produced[0] += 1

    def consume() -> None:
        while not stop.is_set():
            entries = streams.read(stream, GROUP, "student", count=1, block_ms=50)
            for entry_id, received in entries:
                wire.decode(received)
                streams.ack_and_delete(stream, GROUP, [entry_id])
                consumed[0] += 1
                room.release()

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, deadline - time.perf_counter()))
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    streams.client.delete(stream)
    return {"messages_per_s": consumed[0] / elapsed, "mb_per_s": consumed[0] * len(payload) / elapsed / 1e6,
            "messages": consumed[0], "seconds": round(elapsed, 2)}


def h100_sequences_per_s() -> float | None:
    try:
        result = json.loads((RESULTS / "gpu_teacher_h100.json").read_text())
    except (OSError, ValueError):
        return None
    return max(row["sequences_per_s"] for row in result["forward"])


def measure(redis_url: str, seconds: float = 2.0, log=print) -> dict:
    streams = JobStreams(connect(redis_url), JobKeys("bench-capacity"))
    streams.delete_job_keys()
    replica_rate = h100_sequences_per_s()
    rows = []
    try:
        for kind in kinds():
            log(f"  capacity: {kind.name} ...")
            payload = bytes(wire.encode(kind.knowledge, kind.codec))
            rate = sustained(streams, payload, seconds)
            bytes_per_sample = len(payload) / BATCH
            replica_mb_per_s = None if replica_rate is None else replica_rate * bytes_per_sample / 1e6
            rows.append({
                "kind": kind.name,
                "bytes_per_sample": round(bytes_per_sample, 1),
                "message_bytes": len(payload),
                **rate,
                "samples_per_s": rate["messages_per_s"] * BATCH,
                "h100_replica_mb_per_s": replica_mb_per_s,
                # One replica's messages written once and read once by one student: the pair's rate is what
                # this Redis moved for one teacher and one student.
                "h100_replicas_per_redis": ratio(rate["messages_per_s"] * BATCH, replica_rate),
            })
    finally:
        streams.delete_job_keys()
    return {"batch": BATCH, "seq_len": SEQ_LEN, "h100_replica_sequences_per_s": replica_rate, "kinds": rows}

