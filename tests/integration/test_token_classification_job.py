"""The token-classification example runs as a job (shortened) with exact accounting; the student
is a tagger that loads with AutoModelForTokenClassification, and the evaluation scores words."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForTokenClassification, AutoTokenizer

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_token_classification.yaml"


def test_token_classification_example(tmp_path, redis_server, redis_client, local_ray):
    config = load_config(EXAMPLE, [
        f"transport.redis_url={redis_server.url}", "data.languages=[fra, rus]", "data.limit_per_language=64",
        "training.batch_size=16", "training.epochs=1", "evaluation.latency=false", "training.log_every=1",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 2 * 64
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    assert report["student_steps"] == report["batches_expected"]
    assert {"soft", "hard"} <= set(report["loss_history"][-1])
    # Per-token soft labels: 12 tags x float32 for every token of the batch.
    assert report["wire_bytes_per_sample_by_part"]["soft"] >= 12 * 4 * 8
    assert report["metric"] == "word tagging accuracy"
    for language in ("fra", "rus"):
        row = report["per_language"][language]
        assert {"teacher", "student", "ablation"} <= set(row)
        assert 0 <= row["student"]["accuracy"] <= 1 and row["student"]["n"] > 64  # words, not sentences
    assert "per_tag" in report["overall"]["student"]

    student = AutoModelForTokenClassification.from_pretrained(report["student_path"])
    tokenizer = AutoTokenizer.from_pretrained(report["student_path"])
    assert student.config.id2label[3] == "eng"
    logits = student(**tokenizer(["Je pense that it works"], return_tensors="pt")).logits
    assert logits.shape[-1] == 12
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []
