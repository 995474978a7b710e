"""The whole path on one machine: feeder → teacher replicas → Redis → student → report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def tiny_config(tmp_path: Path, redis_url: str, *overrides: str):
    return load_config(
        EXAMPLES / "tiny.yaml",
        [
            f"transport.redis_url={redis_url}",
            "data.languages=[eng_Latn, swh_Latn]",
            "data.limit_per_language=200",
            "training.epochs=2",
            "training.batch_size=16",
            *overrides,
        ],
        output_dir=str(tmp_path / "out"),
    )


def test_every_sample_distilled_exactly_once_and_student_loads(tmp_path, redis_server, redis_client, local_ray):
    config = tiny_config(tmp_path, redis_server.url)
    report = run_job(config, show_progress=False)

    assert report["samples_expected"] == 2 * 2 * 200
    assert report["samples_distilled"] == report["samples_expected"]
    assert report["samples_per_epoch"] == {"0": 400, "1": 400}
    assert report["duplicates_dropped"] == 0 and report["dead_letters"] == 0
    assert report["batches_missing"] == 0
    assert sum(t["samples"] for t in report["teachers"]) == report["samples_expected"]
    # Both replicas are in the report; one that was still loading while the other drained the
    # work stream may have served nothing, which is the consumer group doing its job.
    assert len(report["teachers"]) == 2 and any(t["batches"] > 0 for t in report["teachers"])
    assert report["final_loss"] == report["final_loss"]  # not NaN

    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["samples_distilled"] == report["samples_distilled"]
    assert {"report.md", "per_language_accuracy.png", "training_loss.png"} <= {p.name for p in (tmp_path / "out").iterdir()}

    student = AutoModelForSequenceClassification.from_pretrained(report["student_path"])
    tokenizer = AutoTokenizer.from_pretrained(report["student_path"])
    assert student.config.num_hidden_layers == 2
    assert student.config.id2label[0] == "science/technology"
    logits = student(**tokenizer(["A sentence about football."], return_tensors="pt")).logits
    assert logits.shape == (1, 7)
    # Nothing of the job is left behind in Redis.
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []


def test_top_k_soft_labels_travel_and_train(tmp_path, redis_server, local_ray):
    config = tiny_config(tmp_path, redis_server.url, "distill.top_k=3", "training.epochs=1",
                         "teacher.replicas=1", "data.eval_split=null")
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 400
    assert report["final_loss"] == report["final_loss"]
