"""The cache writer beside a student on a real knowledge stream: it keeps the knowledge of the plan's
samples only, so a message about a foreign sample neither enters the cache nor counts toward sealing
it, and the sealed cache serves the planned samples."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from polydistill.actors.cache_writer import CacheFiller
from polydistill.cluster.config import load_config
from polydistill.storage import wire
from polydistill.storage.keys import CACHE_WRITER_GROUP, JobKeys
from polydistill.storage.knowledge_cache import CacheKey, CachePlan, CacheReader, plan_path
from polydistill.storage.streams import JobStreams

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = CacheKey(teacher="t", contract="c", data="d")
PLANNED = [0, 1, 2, 3]


def tokens_of(sample_id: int) -> np.ndarray:
    return np.arange(1, 4 + sample_id, dtype=np.int32) + 10 * sample_id


def batch(job_id: str, batch_id: int, sample_ids: list[int]) -> wire.Knowledge:
    width = max(len(tokens_of(i)) for i in sample_ids)
    ids, mask = np.zeros((len(sample_ids), width), np.int32), np.zeros((len(sample_ids), width), np.uint8)
    for row, sample_id in enumerate(sample_ids):
        ids[row, : len(tokens_of(sample_id))], mask[row, : len(tokens_of(sample_id))] = tokens_of(sample_id), 1
    work = wire.WorkBatch(job_id=job_id, epoch=0, batch_id=batch_id, sample_ids=np.array(sample_ids, np.int64),
                          languages=("eng",) * len(sample_ids), input_ids=ids, attention_mask=mask)
    logits = np.array([[float(i), -float(i)] for i in sample_ids], np.float32)
    return wire.Knowledge(work=work, teacher_id="teacher-0", soft=wire.SoftLabels.full(logits))


def test_a_foreign_sample_on_the_stream_is_refused_and_does_not_seal_the_cache(tmp_path, redis_server, redis_client):
    config = load_config(EXAMPLES / "tiny.yaml", [f"transport.redis_url={redis_server.url}"],
                         output_dir=str(tmp_path / "out"))
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    root = tmp_path / "cache"
    root.mkdir()
    CachePlan.of_rows(np.array(PLANNED), [tokens_of(i) for i in PLANNED]).save(plan_path(root, KEY))
    streams = JobStreams(redis_client, keys)
    streams.ensure_group(keys.knowledge_stream, CACHE_WRITER_GROUP)
    # Samples 0 and 1, then a batch that holds sample 7 (not in the plan) beside sample 2, then 3 alone:
    # were sample 7 counted, the cache would look complete without sample 3.
    for batch_id, sample_ids in enumerate([[0, 1], [2, 7]]):
        streams.add(keys.knowledge_stream, wire.encode(batch(keys.job_id, batch_id, sample_ids)))
    filler = CacheFiller(config, str(root), KEY, len(PLANNED), redis_server.url)
    stop, summaries = threading.Event(), []
    running = threading.Thread(target=lambda: summaries.append(filler.run(stop.is_set)), daemon=True)
    running.start()
    try:
        wait_until(lambda: filler.writer.rejected == 1 and len(filler.writer.index) == 3)
        assert filler.sealed_at is None and sorted(filler.writer.index) == [0, 1, 2]
        streams.add(keys.knowledge_stream, wire.encode(batch(keys.job_id, 2, [3])))
        wait_until(lambda: filler.sealed_at is not None)
    finally:
        stop.set()
        running.join(timeout=10)
    summary, = summaries
    assert summary["sealed"] and summary["samples_written"] == 4 and summary["records_rejected"] == 1
    reader = CacheReader(Path(summary["path"]), KEY)
    served = reader.knowledge_for(batch(keys.job_id, 9, [3, 0]).work)
    np.testing.assert_array_equal(served.soft.logits, [[3.0, -3.0], [0.0, -0.0]])
    reader.close()


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the cache writer did not get there in time"
        time.sleep(0.02)
