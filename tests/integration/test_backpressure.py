"""Backpressure: a student slowed down on purpose must not make Redis grow.

The feeder, a teacher replica and the student run as the plain classes in threads of this
process (no Ray: the point is the Redis streams between them), against a private redis-server
whose memory is measured alone. Producers block at ``transport.max_*_backlog`` entries, or at
``max_*_backlog_bytes`` when those come first; nothing is trimmed or dropped, and the student still
applies every batch exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from polydistill.actors.feeder import Feeder
from polydistill.actors.teacher import TeacherReplica
from polydistill.cluster.config import load_config
from polydistill.cluster.prepare import prepare_student, prepare_teacher
from polydistill.storage import wire
from polydistill.storage.job_data import load_job_split
from polydistill.storage.keys import TEACHER_GROUP, JobKeys
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import JobStreams, connect
from polydistill.student.trainer import StudentTrainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LIMIT = 4  # transport.max_work_backlog and max_knowledge_backlog
STEP_DELAY_S = 0.1


class SlowStudent(StudentTrainer):
    """The real student, sleeping before every step: a consumer much slower than its producers."""

    def step(self, knowledge):
        time.sleep(STEP_DELAY_S)
        return super().step(knowledge)


class StreamSampler(threading.Thread):
    def __init__(self, client, streams: list[str]):
        super().__init__(daemon=True)
        self.client, self.streams = client, streams
        self.peak = {stream: 0 for stream in streams}
        self.peak_stream_bytes = {stream: 0 for stream in streams}  # MEMORY USAGE of each
        self.peak_bytes = 0  # of the streams together, client buffers left out
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pipe = self.client.pipeline(transaction=True)
            for stream in self.streams:
                pipe.xlen(stream)
            for stream in self.streams:
                pipe.memory_usage(stream, samples=0)
            replies = pipe.execute()
            sizes = [int(b or 0) for b in replies[len(self.streams):]]
            for stream, length, size in zip(self.streams, replies, sizes):
                self.peak[stream] = max(self.peak[stream], int(length))
                self.peak_stream_bytes[stream] = max(self.peak_stream_bytes[stream], size)
            self.peak_bytes = max(self.peak_bytes, sum(sizes))
            time.sleep(0.005)


def test_a_slow_student_keeps_redis_memory_bounded(tmp_path):
    run = run_with_a_slow_student(tmp_path, [f"transport.max_work_backlog={LIMIT}",
                                             f"transport.max_knowledge_backlog={LIMIT}"])
    summary, plan, keys, sampler, teacher, work_bytes, baseline, memory, seconds = run
    assert summary["complete"] and summary["steps"] == plan.batches_per_epoch * plan.epochs
    assert summary["samples_distilled"] == plan.samples_per_epoch * plan.epochs
    # Producers waited for the slow student instead of piling work up in Redis.
    assert sampler.peak[keys.work_stream] <= LIMIT
    assert sampler.peak[keys.knowledge_stream] <= LIMIT  # one replica: no overshoot
    assert teacher.batches_done == len(work_bytes)
    growth = int(memory["used_memory_peak"]) - baseline
    queued_if_unbounded = 2 * sum(work_bytes)  # every work batch and its knowledge at once, at least
    bounded_at = 2 * LIMIT * max(work_bytes)
    print(f"\n[backpressure] slow student ({STEP_DELAY_S * 1000:.0f} ms/step, {seconds:.1f} s, "
          f"{len(work_bytes)} batches of up to {max(work_bytes) / 1024:.1f} KiB): Redis used_memory_peak "
          f"{int(memory['used_memory_peak']) / 1024:.0f} KiB (baseline {baseline / 1024:.0f} KiB, "
          f"+{growth / 1024:.0f} KiB incl. client buffers); the two streams peaked at "
          f"{sampler.peak_bytes / 1024:.0f} KiB and {sampler.peak} entries, against >= "
          f"{queued_if_unbounded / 1024:.0f} KiB if nothing pushed back")
    # The streams never held more than LIMIT messages each (plus per-stream overhead).
    assert sampler.peak_bytes < 2 * bounded_at + 16 * 1024, (sampler.peak_bytes, bounded_at)
    assert growth < bounded_at + 1024 * 1024, (growth, bounded_at)


WORK_BYTES_LIMIT = 64 * 1024  # the least transport.max_work_backlog_bytes allows: about three batches of 64


def test_the_feeder_waits_at_the_byte_limit_before_the_entry_limit(tmp_path):
    run = run_with_a_slow_student(tmp_path, ["training.batch_size=64", "training.epochs=12",
                                             "transport.max_work_backlog=1000",
                                             f"transport.max_work_backlog_bytes={WORK_BYTES_LIMIT}",
                                             f"transport.max_knowledge_backlog={LIMIT}"])
    summary, plan, keys, sampler, teacher, work_bytes, *_ = run
    assert summary["complete"] and summary["samples_distilled"] == plan.samples_per_epoch * plan.epochs
    assert teacher.batches_done == len(work_bytes)
    assert sum(work_bytes) > 4 * WORK_BYTES_LIMIT  # unbounded, the work stream would have held far more
    # Far below the 1000 entries allowed; past the byte limit by no more than the last transaction's batches
    # (it fills the room left in bytes, and one batch more).
    assert sampler.peak[keys.work_stream] < 10
    assert sampler.peak_stream_bytes[keys.work_stream] < WORK_BYTES_LIMIT + 2 * max(work_bytes) + 8 * 1024, (
        sampler.peak_stream_bytes, max(work_bytes))


def test_large_knowledge_messages_wait_at_the_byte_limit(redis_server):
    """A teacher's side of the knowledge stream: each message is 200 KB, so a limit of 1 MB holds five,
    far below the 1000 entries allowed, while a slow student reads them."""
    limit, message, messages = 1024 * 1024, b"k" * 200_000, 40
    keys = JobKeys("bytes")
    producer = JobStreams(connect(redis_server.url), keys)
    producer.client.delete(keys.knowledge_stream)
    producer.ensure_group(keys.knowledge_stream, keys.student_group())
    sampler = StreamSampler(connect(redis_server.url), [keys.knowledge_stream])
    sampler.start()

    def publish() -> None:
        for _ in range(messages):
            producer.wait_for_room(keys.knowledge_stream, 1000, max_bytes=limit, timeout_s=30, poll_s=0.005)
            producer.add(keys.knowledge_stream, message)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    student = JobStreams(connect(redis_server.url), keys)
    received = 0
    while received < messages:
        time.sleep(0.01)
        for entry_id, payload in student.read(keys.knowledge_stream, keys.student_group(), "s", count=1, block_ms=100):
            assert payload == message
            student.ack_and_delete(keys.knowledge_stream, keys.student_group(), [entry_id])
            received += 1
    publisher.join(timeout=10)
    sampler.done.set()
    sampler.join(timeout=10)
    assert sampler.peak[keys.knowledge_stream] <= limit // len(message) + 1
    assert sampler.peak_stream_bytes[keys.knowledge_stream] < limit + 2 * len(message), sampler.peak_stream_bytes


def run_with_a_slow_student(tmp_path, overrides: list[str]):
    """The tiny job with ``overrides``, its feeder and one teacher replica in threads, a slow student in
    this one, the two streams sampled throughout."""
    out = tmp_path / "out"
    out.mkdir()
    with PrivateRedisServer() as server:
        config = load_config(EXAMPLES / "tiny.yaml", [
            f"transport.redis_url={server.url}", "data.languages=[eng_Latn, swh_Latn]", "data.limit_per_language=100",
            "data.eval_split=null", "training.epochs=4", "training.batch_size=16", *overrides,
        ], output_dir=str(out))
        train = load_job_split(config.data, config.data.train_split)
        teacher_dir = prepare_teacher(config, out, train)
        init_dir, _ = prepare_student(config, teacher_dir, out, train)
        keys = JobKeys(config.resolved_job_id)
        client = connect(server.url)
        streams = JobStreams(client, keys)
        streams.ensure_group(keys.work_stream, TEACHER_GROUP)
        streams.ensure_group(keys.knowledge_stream, keys.student_group())

        feeder = Feeder(config, str(teacher_dir), server.url)
        plan = feeder.plan()
        work_bytes = [len(wire.encode(feeder.work_batch(epoch, batch_id, rows)))
                      for epoch in range(plan.epochs) for batch_id, rows in enumerate(feeder.epoch_batches(epoch))]
        teacher = TeacherReplica("teacher-0", config, str(teacher_dir), server.url)
        student = SlowStudent(config, str(init_dir), plan.batches_per_epoch, server.url, str(out / "student"))
        baseline = int(client.info("memory")["used_memory"])

        stop = threading.Event()
        sampler = StreamSampler(client, [keys.work_stream, keys.knowledge_stream])
        threads = [threading.Thread(target=feeder.feed, daemon=True),
                   threading.Thread(target=teacher.serve, args=(stop.is_set,), daemon=True), sampler]
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        summary = student.train()
        seconds = time.perf_counter() - started
        stop.set()
        sampler.done.set()
        for thread in threads:
            thread.join(timeout=30)
        memory = client.info("memory")
    return summary, plan, keys, sampler, teacher, work_bytes, baseline, memory, seconds
