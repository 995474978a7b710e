"""Cross-lingual alignment in a real job: the teacher's embeddings of the pivot language's sentences are
computed in a stage (a Ray task), and the student learns every sample once with the alignment term."""

from __future__ import annotations

import pytest

from polydistill.cluster.driver import run_job
from tests.integration.test_pipeline import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_alignment_targets_are_a_stage_and_every_sample_is_learnt_once(tmp_path, redis_server, local_ray):
    config = tiny_config(tmp_path, redis_server.url, "data.limit_per_language=64", "training.epochs=1",
                         "evaluation.latency=false", "teacher.replicas=1",
                         "distill.align_language=eng_Latn", "distill.align_weight=1.0")
    report = run_job(config, show_progress=False)
    assert report["status"] == "completed" and report["samples_distilled"] == report["samples_expected"] == 128
    assert "alignment_targets" in report["stage_placement"] and "alignment_targets" in report["stage_seconds"]
    assert any("align" in key for entry in report["loss_history"] for key in entry)
