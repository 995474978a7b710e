"""Backpressure: a student slowed down on purpose must not make Redis grow.

The feeder, a teacher replica and the student run as the plain classes in threads of this
process (no Ray: the point is the Redis streams between them), against a private redis-server
whose memory is measured alone. Producers block at ``transport.max_*_backlog``; nothing is
trimmed or dropped, and the student still applies every batch exactly once.
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
        self.peak_bytes = 0  # of the streams together (MEMORY USAGE), client buffers left out
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pipe = self.client.pipeline(transaction=True)
            for stream in self.streams:
                pipe.xlen(stream)
            for stream in self.streams:
                pipe.memory_usage(stream, samples=0)
            replies = pipe.execute()
            for stream, length in zip(self.streams, replies):
                self.peak[stream] = max(self.peak[stream], int(length))
            self.peak_bytes = max(self.peak_bytes, sum(int(b or 0) for b in replies[len(self.streams):]))
            time.sleep(0.005)


def test_a_slow_student_keeps_redis_memory_bounded(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with PrivateRedisServer() as server:
        config = load_config(EXAMPLES / "tiny.yaml", [
            f"transport.redis_url={server.url}", "data.languages=[eng_Latn, swh_Latn]", "data.limit_per_language=100",
            "data.eval_split=null", "training.epochs=4", "training.batch_size=16",
            f"transport.max_work_backlog={LIMIT}", f"transport.max_knowledge_backlog={LIMIT}",
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
