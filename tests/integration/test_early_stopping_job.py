"""A real job whose dev score stops improving: training.patience ends the student's plan early, the
accounting holds the student to the epochs it kept, the ablation stops by the same rule, and the
knowledge cache is sealed without the driver waiting for the epochs nobody reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLANNED_EPOCHS = 5


def test_a_student_whose_dev_score_stops_improving_ends_early_with_exact_accounting(
        tmp_path, redis_server, local_ray):
    # A learning rate too small to move the weights: every epoch scores what the first did, so the first is
    # the best and, with a patience of one, training ends after the second.
    config = load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={redis_server.url}", "data.languages=[eng_Latn, swh_Latn]",
        "data.limit_per_language=64", f"training.epochs={PLANNED_EPOCHS}", "training.batch_size=16",
        "training.lr=1.0e-12", "teacher.replicas=1",
        "training.validate_each_epoch=true", "training.keep_best=true", "training.patience=1",
        "evaluation.ablation=true", "evaluation.ablations_after_distillation=true",
        "evaluation.latency=false", "data.dev_from_train=true",
        "knowledge_cache.enabled=true", f"knowledge_cache.dir={tmp_path / 'cache'}",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)

    stopped = report["stopped_early"]
    assert stopped["after_epoch"] == 1 and stopped["patience"] == 1
    # The epoch a batch of which was applied when dev decided is finished too (one replica: none was).
    trained = report["epochs_trained"]
    assert trained == stopped["last_epoch"] + 1 and trained in (2, 3) and report["epochs"] == PLANNED_EPOCHS
    per_epoch = report["samples_expected"] // trained
    assert report["status"] == "completed"
    assert report["samples_distilled"] == report["samples_expected"] == per_epoch * trained
    assert report["samples_per_epoch"] == {str(epoch): per_epoch for epoch in range(trained)}
    assert report["batches_missing"] == 0 and report["duplicates_dropped"] == 0
    assert [score["epoch"] for score in report["validation"]] == list(range(trained))
    assert report["kept_epoch"] == 0
    assert "student stopped early: no new best dev score in the 1 epoch(s) up to epoch 2" in (
        tmp_path / "out" / "report.md").read_text()

    assert report["knowledge_cache"]["writer"]["sealed"]

    ablation = json.loads((tmp_path / "out" / "ablation" / "validation.json").read_text())
    assert ablation["stopped_early"] and len(ablation["curve"]) == 2
    assert report["ablation_validation"] == {"ablation": ablation}  # and in the report, beside the student's epochs
    assert "ablation stopped early by the same rule: trained 2 of" in (tmp_path / "out" / "report.md").read_text()
