"""Transport: the codec and the Redis round trip per knowledge message, against references.

For each message size the same bytes go through these paths, timed in the same run:
- ``wire.encode`` + ``wire.decode`` of a language-modelling knowledge message (top-32 soft labels
  per token, as a teacher of a masked/causal LM would send them), in wire schema version 1 and in
  version 2 (float32 values, so the same bytes; and packed in 16 bits, as jobs send it by default);
- ``wire.decode`` of a version-2 message of hidden states (float16, width 384), which reads its
  arrays in place;
- a Redis round trip through ``JobStreams``: XADD, XREADGROUP, XACK + XDEL (``ack_and_delete``);
- ``redis-benchmark`` SET + GET of a value of the same size on the same server, one client;
- a plain numpy copy of the same number of bytes (the memcpy ceiling).

Each path is timed over a batch of messages, the batch repeated; the per-message time is the
median over repeats. Throughput counts the payload once per path.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from benchmarks.summary import gbps, median, ratio
from polydistill.storage import wire
from polydistill.storage.keys import JobKeys
from polydistill.storage.streams import JobStreams, connect

SIZES = {"10KB": 10_000, "100KB": 100_000, "1MB": 1_000_000, "4MB": 4_000_000}
TOP_K = 32
LM_VOCAB = 250_002  # XLM-R / multilingual-e5 vocabulary


@dataclass(frozen=True)
class TransportSettings:
    repeats: int
    bytes_per_repeat: int  # messages per timed batch = this ÷ message size (at least 3)
    max_messages_per_repeat: int
    redis_benchmark_seconds: float  # rough target duration of each redis-benchmark call


QUICK = TransportSettings(repeats=5, bytes_per_repeat=8_000_000, max_messages_per_repeat=200,
                          redis_benchmark_seconds=0.4)
FULL = TransportSettings(repeats=9, bytes_per_repeat=32_000_000, max_messages_per_repeat=800,
                         redis_benchmark_seconds=1.5)


def lm_knowledge(target_bytes: int, seed: int = 0) -> wire.Knowledge:
    """A knowledge message of about ``target_bytes``: top-32 soft labels for n × 128 tokens."""
    per_token = 4 + 1 + TOP_K * (4 + 4) + 4  # ids, mask, fp32 values + int32 indices, logsumexp
    tokens = max(1, target_bytes // per_token)
    seq_len = min(128, tokens)
    n = max(1, round(tokens / seq_len))
    rng = np.random.default_rng(seed)
    work = wire.WorkBatch(
        job_id="bench-transport", epoch=0, batch_id=0,
        sample_ids=np.arange(n, dtype=np.int64),
        languages=tuple("eng_Latn" for _ in range(n)),
        input_ids=rng.integers(5, LM_VOCAB, size=(n, seq_len), dtype=np.int32),
        attention_mask=np.ones((n, seq_len), dtype=np.uint8),
        labels=None,
    )
    values = np.sort(rng.normal(size=(n, seq_len, TOP_K)).astype(np.float32), axis=-1)[..., ::-1]
    soft = wire.SoftLabels(
        topk_values=np.ascontiguousarray(values) + 10.0,
        topk_indices=rng.integers(0, LM_VOCAB, size=(n, seq_len, TOP_K), dtype=np.int32),
        topk_logsumexp=np.full((n, seq_len), 11.0, dtype=np.float32),
    )
    return wire.Knowledge(work=work, teacher_id="bench", soft=soft, teacher_seconds=0.01)


HIDDEN_WIDTH = 384


def hidden_knowledge(target_bytes: int, seed: int = 0) -> wire.Knowledge:
    """A knowledge message of about ``target_bytes`` of float16 hidden states, n × 128 tokens × 384."""
    tokens = max(1, target_bytes // (2 * HIDDEN_WIDTH))
    seq_len = min(128, tokens)
    n = max(1, round(tokens / seq_len))
    rng = np.random.default_rng(seed)
    work = wire.WorkBatch(job_id="bench-transport", epoch=0, batch_id=0, sample_ids=np.arange(n, dtype=np.int64),
                          languages=tuple("eng_Latn" for _ in range(n)),
                          input_ids=rng.integers(5, LM_VOCAB, size=(n, seq_len), dtype=np.int32),
                          attention_mask=np.ones((n, seq_len), dtype=np.uint8))
    hidden = rng.normal(size=(n, seq_len, HIDDEN_WIDTH)).astype(np.float16)
    return wire.Knowledge(work=work, teacher_id="bench", hidden_states={6: hidden}, teacher_seconds=0.01)


def _time_batches(fn: Callable[[], None], messages: int, repeats: int) -> list[float]:
    """Seconds per message for each repeat of ``messages`` calls."""
    fn()  # warm-up
    per_message = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(messages):
            fn()
        per_message.append((time.perf_counter() - started) / messages)
    return per_message


class RoundTrip:
    """XADD → XREADGROUP → XACK + XDEL through JobStreams, one message at a time."""

    def __init__(self, streams: JobStreams, group: str = "student:bench"):
        self.streams = streams
        self.stream = streams.keys.knowledge_stream
        self.group = group
        streams.ensure_group(self.stream, group)

    def __call__(self, payload: bytes) -> bytes:
        self.streams.add(self.stream, payload)
        ((entry_id, received),) = self.streams.read(self.stream, self.group, "bench", count=1, block_ms=0)
        self.streams.ack_and_delete(self.stream, self.group, [entry_id])
        return received


def redis_benchmark_set_get(redis_url: str, size: int, seconds: float) -> dict:
    """SET and GET of ``size``-byte values by ``redis-benchmark`` (one client, no pipelining)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"available": False, "reason": "redis-benchmark is not on PATH"}
    parts = urlsplit(redis_url)
    results = {}
    # Aim for ``seconds`` per test with a rough guess of the rate; never fewer than 100 requests.
    guess_rate = max(200.0, 2.0e9 / max(size, 1) / 4)
    requests = int(max(100, min(200_000, guess_rate * seconds)))
    command = [binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379), "-c", "1",
               "-n", str(requests), "-d", str(size), "-t", "set,get", "--csv", "--dbnum", "15"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    except (subprocess.SubprocessError, OSError) as error:
        return {"available": False, "reason": f"redis-benchmark failed: {error}"}
    for row in csv.reader(io.StringIO(done.stdout)):
        if len(row) >= 2 and row[0] in ("SET", "GET"):
            results[row[0].lower() + "_per_s"] = float(row[1])
    if "set_per_s" not in results or "get_per_s" not in results:
        return {"available": False, "reason": f"could not parse redis-benchmark output: {done.stdout[:200]!r}"}
    round_trip = 1 / results["set_per_s"] + 1 / results["get_per_s"]
    return {"available": True, "requests": requests, **results, "set_get_seconds": round_trip,
            "set_get_gbps": gbps(size, round_trip)}


def _codec_times(knowledge: wire.Knowledge, codec: wire.WireCodec, messages: int, repeats: int) -> dict:
    payload = bytes(wire.encode(knowledge, codec))
    encode = _time_batches(lambda: wire.encode(knowledge, codec), messages, repeats)
    decode = _time_batches(lambda: wire.decode(payload), messages, repeats)
    return {"bytes": len(payload), "encode_s": median(encode), "decode_s": median(decode)}


def memcpy_seconds(n_bytes: int, repeats: int) -> list[float]:
    source = np.random.default_rng(1).integers(0, 255, size=n_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    copies = max(3, 64_000_000 // max(n_bytes, 1))
    return _time_batches(lambda: np.copyto(target, source), min(copies, 2000), repeats)


def measure(settings: TransportSettings, redis_url: str, realistic: wire.Knowledge, step_seconds: float,
            teacher_forward_seconds: float, log=print) -> dict:
    streams = JobStreams(connect(redis_url), JobKeys("bench-transport"))
    streams.delete_job_keys()
    round_trip = RoundTrip(streams)
    sizes: dict[str, dict] = {}
    try:
        for label, target in SIZES.items():
            log(f"  transport {label} ...")
            knowledge = lm_knowledge(target)
            payload = wire.encode(knowledge)
            size = len(payload)
            messages = int(min(settings.max_messages_per_repeat, max(3, settings.bytes_per_repeat // size)))
            encode = _time_batches(lambda: wire.encode(knowledge), messages, settings.repeats)
            decode = _time_batches(lambda: wire.decode(payload), messages, settings.repeats)
            v2 = _codec_times(knowledge, wire.WireCodec(value_bits=32), messages, settings.repeats)
            packed16 = _codec_times(knowledge, wire.WireCodec(value_bits=16), messages, settings.repeats)
            hidden = hidden_knowledge(target)
            hidden_payload = bytes(wire.encode(hidden, wire.WireCodec()))
            hidden_decode = _time_batches(lambda: wire.decode(hidden_payload), messages, settings.repeats)
            hidden_copy = memcpy_seconds(len(hidden_payload), settings.repeats)
            redis_rt = _time_batches(lambda: round_trip(payload), messages, settings.repeats)
            copy = memcpy_seconds(size, settings.repeats)
            reference = redis_benchmark_set_get(redis_url, size, settings.redis_benchmark_seconds)
            codec_s = median(encode) + median(decode)
            entry = {
                "bytes": size,
                "tokens": knowledge.work.input_ids.size,
                "messages_per_repeat": messages,
                "repeats": settings.repeats,
                "encode_s": median(encode),
                "decode_s": median(decode),
                "redis_round_trip_s": median(redis_rt),
                "memcpy_s": median(copy),
                "codec_encode_decode_gbps": gbps(size, codec_s),
                "redis_round_trip_gbps": gbps(size, median(redis_rt)),
                "memcpy_gbps": gbps(size, median(copy)),
                "redis_benchmark": reference,
            }
            entry["codec_over_memcpy_throughput"] = ratio(entry["codec_encode_decode_gbps"], entry["memcpy_gbps"])
            entry["v2"] = {**v2, "codec_over_memcpy_throughput": ratio(gbps(size, v2["encode_s"] + v2["decode_s"]),
                                                                       entry["memcpy_gbps"])}
            entry["v2_packed_16bit"] = {
                **packed16, "v1_bytes_per_s_encode_decode": gbps(size, packed16["encode_s"] + packed16["decode_s"]),
                "note": "throughput counts the version-1 bytes of the same message: what the packing costs per byte "
                        "it would otherwise send"}
            entry["v2_hidden_states"] = {
                "bytes": len(hidden_payload), "decode_s": median(hidden_decode), "memcpy_s": median(hidden_copy),
                "decode_over_memcpy_throughput": ratio(median(hidden_copy), median(hidden_decode))}
            entry["round_trip_over_redis_benchmark_throughput"] = ratio(
                entry["redis_round_trip_gbps"], reference.get("set_get_gbps"))
            sizes[label] = entry

        log("  transport: the pipeline's own message, and one more consumer ...")
        payload = wire.encode(realistic)
        messages = 200
        decode = median(_time_batches(lambda: wire.decode(payload), messages, settings.repeats))
        redis_rt = median(_time_batches(lambda: round_trip(payload), messages, settings.repeats))
        fanout = extra_consumer_cost(redis_url, payload, settings.repeats)
    finally:
        streams.delete_job_keys()
    share = ratio(decode + redis_rt, step_seconds)
    return {
        "transport_share_of_step": share,
        "sizes": sizes,
        "realistic_message": {
            "bytes": len(payload),
            "decode_s": decode,
            "redis_round_trip_s": redis_rt,
            "student_step_s": step_seconds,
            "share_of_step": share,
            "note": "XADD is counted although the teacher, not the student, pays it: an upper bound",
        },
        "extra_consumer": {
            **fanout,
            "teacher_forward_s": teacher_forward_seconds,
            "extra_consumer_over_teacher_forward": ratio(fanout["seconds_per_message"], teacher_forward_seconds),
            "bytes": len(payload),
        },
    }


def extra_consumer_cost(redis_url: str, payload: bytes, repeats: int, messages: int = 200) -> dict:
    """What one more student group costs per message: XREADGROUP + XACK + decode, no new XADD.

    The knowledge stream has one group today and ``ack_and_delete`` removes entries for every
    group, so two real students cannot share it yet; this measures the read side a second group
    would add, on a scratch stream with two groups and XACK only.
    """
    streams = JobStreams(connect(redis_url), JobKeys("bench-fanout"))
    streams.delete_job_keys()
    client, stream = streams.client, streams.keys.knowledge_stream
    for group in ("student:a", "student:b"):
        streams.ensure_group(stream, group)
    per_message = []
    for _ in range(repeats):
        pipe = client.pipeline(transaction=False)
        for _ in range(messages):
            streams.add(stream, payload, pipeline=pipe)
        pipe.execute()
        streams.read(stream, "student:a", "a", count=messages, block_ms=0)  # the first student
        started = time.perf_counter()
        for _ in range(messages):
            ((entry_id, received),) = streams.read(stream, "student:b", "b", count=1, block_ms=0)
            wire.decode(received)
            client.xack(stream, "student:b", entry_id)
        per_message.append((time.perf_counter() - started) / messages)
        client.xtrim(stream, maxlen=0)
    streams.delete_job_keys()
    return {"seconds_per_message": median(per_message), "repeats": repeats, "messages_per_repeat": messages}
