"""One bad message never ends the job, and a slow batch is never taken from the replica computing it:
teacher replicas (the plain class, no Ray) on a real redis-server, each drill in a few seconds.

The job-level drill (a poison batch injected into a running job) is in test_faults.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
from transformers import BertConfig, BertForSequenceClassification

from polydistill.actors.teacher import TeacherReplica, WorkerFailing
from polydistill.cluster.config import validate_config
from polydistill.storage import wire
from polydistill.storage.keys import TEACHER_GROUP
from polydistill.storage.streams import DEAD_LETTER_BATCH_FIELD

pytestmark = pytest.mark.integration

JOB = "job-poison"
VOCAB, POSITIONS = 50, 16


def tiny_teacher(path: Path) -> str:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=POSITIONS, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def job_config(tmp_path: Path, **transport):
    return validate_config({"job_id": JOB, "teacher": {"model": "random"}, "data": {"path": str(tmp_path)},
                            "transport": {"max_deliveries": 3, "reclaim_idle_ms": 200, "block_ms": 50, **transport}})


def work(batch_id: int, input_ids: np.ndarray | None = None) -> wire.WorkBatch:
    ids = np.ones((2, 4), dtype=np.int32) if input_ids is None else input_ids
    return wire.WorkBatch(job_id=JOB, epoch=0, batch_id=batch_id, sample_ids=np.arange(2), languages=("eng",) * 2,
                          input_ids=ids, attention_mask=np.ones(ids.shape, dtype=np.int32), labels=None)


def overflowing_shape() -> bytes:
    """A work batch whose input_ids claim [2**32, 2**32] with no bytes: int64 sizes multiply to 0."""
    body = msgpack.unpackb(wire.encode(work(0)), raw=False)
    body["input_ids"] = {"dtype": "int32", "shape": [2**32, 2**32], "raw": b""}
    body["attention_mask"] = {"dtype": "uint8", "shape": [2**32, 2**32], "raw": b""}
    return msgpack.packb(body, use_bin_type=True)


class Recording(TeacherReplica):
    """A teacher replica that counts its computations per batch, and can be made slow or failing."""

    def __init__(self, *args, seconds: float = 0.0, fail_on: dict[int, Exception] | None = None,
                 computed: Counter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds, self.fail_on = seconds, fail_on or {}
        self.computed = computed if computed is not None else Counter()

    def compute(self, message: wire.WorkBatch) -> wire.Knowledge:
        self.computed[message.batch_id] += 1
        time.sleep(self.seconds)
        if message.batch_id in self.fail_on:
            raise self.fail_on[message.batch_id]
        return super().compute(message)


def serve_until(replicas: list[TeacherReplica], done, timeout_s: float = 30.0) -> list[BaseException]:
    """Runs each replica's serve loop on a thread until ``done()``; returns what the loops raised."""
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout_s

    def should_stop() -> bool:
        return done() or time.monotonic() > deadline

    def run(replica):
        try:
            replica.serve(should_stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(replica,), daemon=True) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 5)
    assert time.monotonic() <= deadline, "the replicas did not finish in time"
    return errors


def dead_letters(client, keys) -> list[dict]:
    return [fields for _, fields in client.xrange(keys.dead_letter_stream)]


def test_a_batch_slower_than_reclaim_idle_ms_is_computed_once(redis_server, redis_client, tmp_path):
    config = job_config(tmp_path, reclaim_idle_ms=200)
    teacher = tiny_teacher(tmp_path / "teacher")
    computed: Counter = Counter()
    # Each batch computes for 4 x reclaim_idle_ms, while the other replica reclaims every 200 ms.
    replicas = [Recording(f"teacher-{i}", config, teacher, redis_server.url, seconds=0.8, computed=computed)
                for i in range(2)]
    keys, streams = replicas[0].keys, replicas[0].streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    for batch_id in range(3):
        streams.add(keys.work_stream, wire.encode(work(batch_id)))
    errors = serve_until(replicas, lambda: redis_client.xlen(keys.knowledge_stream) >= 3)
    assert errors == []
    assert computed == {0: 1, 1: 1, 2: 1}, "a batch still computing was taken over by the other replica"
    assert sum(replica.reclaimed for replica in replicas) == 0
    assert dead_letters(redis_client, keys) == []
    assert redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 0


def test_poison_work_batches_are_dead_lettered_with_the_reason_and_the_replica_goes_on(
        redis_server, redis_client, tmp_path):
    config = job_config(tmp_path)
    replica = Recording("teacher-0", config, tiny_teacher(tmp_path / "teacher"), redis_server.url)
    keys, streams = replica.keys, replica.streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    poison = overflowing_shape()
    assert len(poison) < 400  # a few hundred bytes that once ended the job
    streams.add(keys.work_stream, poison)
    streams.add(keys.work_stream, wire.encode(work(1, np.full((2, 4), VOCAB + 7, dtype=np.int32))))
    streams.add(keys.work_stream, wire.encode(work(2, np.ones((2, POSITIONS + 4), dtype=np.int32))))
    streams.add(keys.work_stream, wire.encode(work(3)))
    errors = serve_until([replica], lambda: redis_client.xlen(keys.knowledge_stream) >= 1)
    assert errors == []
    records = dead_letters(redis_client, keys)
    reasons = [fields[b"reason"].decode() for fields in records]
    assert "work.input_ids.raw: 0 bytes, but shape [4294967296, 4294967296]" in reasons[0]
    assert "token ids span [57, 57], outside the teacher's vocabulary of 50" in reasons[1]
    assert "rows of 20 tokens, but the teacher has 16 positions" in reasons[2]
    # The batch each held, for the driver's accounting, where it decoded.
    assert [fields.get(DEAD_LETTER_BATCH_FIELD) for fields in records] == [None, b"0 1 2", b"0 2 2"]
    assert replica.computed == {3: 1}  # refused before the teacher ran, and the good batch computed
    assert redis_client.xlen(keys.work_stream) == 0


def test_a_batch_that_raises_every_time_is_dead_lettered_after_max_deliveries(redis_server, redis_client, tmp_path):
    config = job_config(tmp_path, max_deliveries=3)
    replica = Recording("teacher-0", config, tiny_teacher(tmp_path / "teacher"), redis_server.url,
                        fail_on={0: RuntimeError("The size of tensor a (1024) must match the size of tensor b (128)")})
    keys, streams = replica.keys, replica.streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    streams.add(keys.work_stream, wire.encode(work(0)))
    streams.add(keys.work_stream, wire.encode(work(1)))
    started = time.monotonic()
    errors = serve_until([replica], lambda: redis_client.xlen(keys.knowledge_stream) >= 1)
    assert errors == []
    assert time.monotonic() - started < 10
    [fields] = dead_letters(redis_client, keys)
    reason = fields[b"reason"].decode()
    assert "raised the same error on each of its 3 deliveries (transport.max_deliveries=3)" in reason
    assert "RuntimeError: The size of tensor a (1024)" in reason
    assert fields[DEAD_LETTER_BATCH_FIELD] == b"0 0 2"
    assert replica.computed == {0: 3, 1: 1}


def test_a_batch_that_fails_once_is_retried_and_published(redis_server, redis_client, tmp_path):
    config = job_config(tmp_path)
    replica = Recording("teacher-0", config, tiny_teacher(tmp_path / "teacher"), redis_server.url)
    once = {0: MemoryError("out of memory")}

    class FailsOnce(dict):
        def __contains__(self, batch_id):
            return once.pop(batch_id, None) is not None

        def __getitem__(self, batch_id):
            return MemoryError("out of memory")

    replica.fail_on = FailsOnce()
    keys, streams = replica.keys, replica.streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    streams.add(keys.work_stream, wire.encode(work(0)))
    assert serve_until([replica], lambda: redis_client.xlen(keys.knowledge_stream) >= 1) == []
    assert replica.computed == {0: 2} and dead_letters(redis_client, keys) == []


def test_different_errors_on_one_batch_blame_the_replica(redis_server, redis_client, tmp_path):
    config = job_config(tmp_path, max_deliveries=2)
    replica = Recording("teacher-0", config, tiny_teacher(tmp_path / "teacher"), redis_server.url)
    errors_in_turn = iter([MemoryError("out of memory"), RuntimeError("device lost")])

    class Varying(dict):
        def __contains__(self, batch_id):
            return True

        def __getitem__(self, batch_id):
            return next(errors_in_turn)

    replica.fail_on = Varying()
    keys, streams = replica.keys, replica.streams
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    streams.add(keys.work_stream, wire.encode(work(0)))
    [error] = serve_until([replica], lambda: False, timeout_s=10)
    assert isinstance(error, WorkerFailing) and "different errors" in str(error)
    # Left pending for another replica; nothing dead-lettered.
    assert dead_letters(redis_client, keys) == []
    assert redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 1
