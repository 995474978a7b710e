"""The knowledge cache in a job: the first job's teachers fill it during epoch 0 and the later
epochs come from disk; a second job with the same teacher, data and contract runs with no
teacher at all; a change of contract makes a new cache. Accounting stays exact throughout. A
record changed on disk fails the next job that reads it, naming the sample and the folder to delete."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from polydistill.cluster.driver import run_job
from polydistill.storage.knowledge_cache import INDEX
from tests.integration.test_pipeline import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]


def cached_config(tmp_path, redis_url, name, *overrides):
    return tiny_config(tmp_path / name, redis_url, "knowledge_cache.enabled=true",
                       f"knowledge_cache.dir={tmp_path / 'cache'}", "training.epochs=3", "data.eval_split=null",
                       "distill.hidden_layers=[[2, 4]]", "distill.hidden_weight=0.5", *overrides)


def test_later_epochs_and_later_jobs_read_the_cache(tmp_path, redis_server, local_ray):
    # A short work queue: the feeder runs at most 4 batches ahead of the teachers, so the batches
    # enqueued once the cache is sealed (after the last of epoch 0 is written) come from disk.
    first = run_job(cached_config(tmp_path, redis_server.url, "first", "transport.max_work_backlog=4"),
                    show_progress=False)
    cache = first["knowledge_cache"]
    assert first["samples_distilled"] == first["samples_expected"] == 1200
    assert cache["writer"]["sealed"] and cache["writer"]["samples_written"] == 400
    assert cache["writer"]["records_rejected"] == 0
    assert not cache["read_from_start"]
    # Epoch 0 needed the teachers; most of epochs 1 and 2 came from disk, and no batch twice.
    assert cache["batches_from_cache"] >= 30, cache
    assert sum(t["batches"] for t in first["teachers"]) + cache["batches_from_cache"] == 75

    # The same teacher (a random teacher's tokenizer training is not bit-reproducible, and a teacher
    # with other files is another key), the same data and contract: everything from disk.
    same_teacher = f"teacher.model={first['teacher_path']}"
    second = run_job(cached_config(tmp_path, redis_server.url, "second", same_teacher), show_progress=False)
    assert second["knowledge_cache"]["path"] == cache["path"]
    assert second["knowledge_cache"]["read_from_start"] and second["knowledge_cache"]["writer"] is None
    assert second["teachers"] == [] and second["teacher_pool"] is None
    assert second["samples_distilled"] == second["samples_expected"] == 1200
    assert second["knowledge_cache"]["batches_from_cache"] == second["batches_expected"] == 75
    assert second["duplicates_dropped"] == 0 and second["final_loss"] == second["final_loss"]

    # Another contract (a different teacher layer) is another key, so another cache.
    third = run_job(cached_config(tmp_path, redis_server.url, "third", same_teacher, "distill.hidden_layers=[[2, 3]]"),
                    show_progress=False)
    assert third["knowledge_cache"]["path"] != cache["path"] and not third["knowledge_cache"]["read_from_start"]
    assert third["samples_distilled"] == 1200

    # A record changed on disk: a job reading the cache, with no teacher to fall back on, fails at that
    # sample and says which folder to delete (the next job then computes it again with its teacher).
    folder = Path(cache["path"])
    with np.load(folder / INDEX) as index:
        sample_id, (shard, offset, length) = int(index["sample_ids"][0]), index["places"][0].tolist()
    shard_file = folder / f"shard-{shard:05d}.bin"
    data = bytearray(shard_file.read_bytes())
    data[offset + length // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(Exception, match=rf"record of sample {sample_id} does not match its digest(.|\n)*"
                                        rf"delete the folder {re.escape(str(folder))}"):
        run_job(cached_config(tmp_path, redis_server.url, "fourth", same_teacher), show_progress=False)
