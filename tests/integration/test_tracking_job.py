"""A real job with experiment tracking on and the student scored on dev after every epoch: its MLflow
run and TensorBoard events, read back with the libraries' own readers, and the epoch keep_best saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transformers import AutoModelForSequenceClassification

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.student.validation import DevValidation, label_names_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_job_leaves_an_mlflow_run_and_tensorboard_events_with_dev_scores_per_epoch(
        tmp_path, redis_server, local_ray):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={redis_server.url}", "data.languages=[eng_Latn, swh_Latn]",
        "data.limit_per_language=64", "training.epochs=2", "training.batch_size=16", "training.log_every=2",
        "tracking.mlflow=true", "tracking.tensorboard=true", "tracking.experiment=tiny-tracked",
        "training.validate_each_epoch=true", "training.keep_best=true", "evaluation.ablation=true",
        "evaluation.ablations_after_distillation=true",
        "evaluation.latency=false", "data.dev_from_train=true",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    out = tmp_path / "out"

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-tracked")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == config.resolved_job_id
    assert run.data.params["training.epochs"] == "2" and run.data.params["teacher.model"] == "random"
    losses = client.get_metric_history(run.info.run_id, "loss/loss")
    assert [m.step for m in losses] == [entry["step"] for entry in report["loss_history"]]
    assert losses[-1].value == pytest.approx(report["loss_history"][-1]["loss"])
    assert run.data.metrics["eval/overall/student/accuracy"] == pytest.approx(report["overall"]["student"]["accuracy"])
    assert run.data.metrics["eval/per_language/swh_Latn/teacher/accuracy"] == pytest.approx(
        report["per_language"]["swh_Latn"]["teacher"]["accuracy"])
    assert run.data.metrics["job/samples_distilled"] == report["samples_distilled"]
    assert client.get_metric_history(run.info.run_id, "progress/samples"), "no live progress was logged"
    artefacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.json", "job.yaml", "per_language_accuracy.png", "training_loss.png"} <= artefacts

    dev_scores = client.get_metric_history(run.info.run_id, "dev/accuracy")
    assert [(m.step, m.value) for m in dev_scores] == [(v["step"], pytest.approx(v["accuracy"]))
                                                       for v in report["validation"]]

    # One dev score per epoch; the saved student is the best epoch's, and scores on dev what it scored then.
    assert [v["epoch"] for v in report["validation"]] == [0, 1]
    best = max(report["validation"], key=lambda v: (v["accuracy"], -v["epoch"]))
    assert report["kept_epoch"] == best["epoch"]
    saved = AutoModelForSequenceClassification.from_pretrained(report["student_path"])
    assert DevValidation(config, Path(report["student_path"]), label_names_of(saved))(saved)[0] == pytest.approx(
        best["accuracy"])
    ablation = json.loads((out / "ablation" / "validation.json").read_text())
    assert len(ablation["curve"]) == 2 and ablation["kept_step"] is not None
    ablation_scores = client.get_metric_history(run.info.run_id, "dev.ablation/accuracy")
    assert [(m.step, m.value) for m in ablation_scores] == [(p["step"], pytest.approx(p["accuracy"]))
                                                            for p in ablation["curve"]]
    assert "## Dev accuracy by epoch" in (out / "report.md").read_text()

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss/loss", "eval/overall/student/accuracy", "progress/samples"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss/loss")] == [entry["step"] for entry in report["loss_history"]]
    assert events.Scalars("eval/overall/student/accuracy")[0].value == pytest.approx(
        report["overall"]["student"]["accuracy"], abs=1e-6)
