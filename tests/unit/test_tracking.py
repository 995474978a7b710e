"""What a job logs to its experiment tracker (names, values, redaction) and how the run's status
follows the job's outcome. The backends are exercised on a real job in
tests/integration/test_tracking_job.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from polydistill.cluster.config import validate_config
from polydistill.cluster.stopping import JobStopped
from polydistill.cluster.tracking import (
    JobTracking,
    config_params,
    loss_metrics,
    metric_name,
    progress_metrics,
    report_metrics,
    tracked,
)


class Recorder:
    """A Tracker that keeps what it was given."""

    def __init__(self):
        self.params, self.metrics, self.artefacts, self.status = {}, [], [], None

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path):
        self.artefacts.append(path.name)

    def close(self, status):
        self.status = status


def config(**extra):
    return validate_config({"teacher": {"model": "random"}, "data": {"path": "/data"}, **extra})


def test_params_are_the_flat_config_with_every_secret_redacted():
    params = config_params(config(transport={"redis_url": "redis://user:hunter2@redis:6379/0"},
                                  tracking={"mlflow": True, "mlflow_tracking_uri": "https://mlflow.example"}))
    assert params["training.epochs"].isdigit()
    assert params["teacher.model"] == "random"
    assert params["data.languages"] == "null"
    assert params["transport.redis_url"] == "redis://user:***@redis:6379/0"
    assert params["tracking.mlflow_tracking_uri"] == "https://mlflow.example"
    assert not any("hunter2" in value for value in params.values())
    assert config_params(config(transport={"password": "hunter2"}))["transport.password"] == "***"


@pytest.mark.parametrize("uri", ["https://me:s3cret@mlflow.example", "https://mlflow.example/?token=s3cret",
                                 "http://mlflow.example:5000/?Password=s3cret"])
def test_a_tracking_uri_with_a_credential_is_refused_naming_the_environment_variables(uri):
    from polydistill.cluster.config import ConfigError

    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") as caught:
        config(tracking={"mlflow": True, "mlflow_tracking_uri": uri})
    assert "s3cret" not in str(caught.value)


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_others_go_on(caplog):
    class Broken(Recorder):
        def log_metrics(self, metrics, step):
            raise ConnectionError("tracking server gone")

    broken, working = Broken(), Recorder()
    tracking = JobTracking([broken, working])
    tracking.progress({"step": "1", "loss": "0.5"})
    tracking.progress({"step": "2", "loss": "0.4"})
    assert tracking.trackers == [working] and len(working.metrics) == 2
    assert "Broken.log_metrics failed (ConnectionError: tracking server gone)" in caplog.text
    tracking.close("FINISHED")
    assert working.status == "FINISHED" and broken.status is None


def test_losses_per_term_at_their_steps_without_nulls_or_nan():
    history = [{"step": 10, "epoch": 0, "loss": 1.5, "soft": 1.2, "hard": 0.3, "hidden": None},
               {"step": 20, "epoch": 1, "loss": 0.9, "soft": math.nan, "hard": 0.2}]
    assert list(loss_metrics(history)) == [
        (10, {"loss/loss": 1.5, "loss/soft": 1.2, "loss/hard": 0.3, "loss/epoch": 0.0}),
        (20, {"loss/loss": 0.9, "loss/hard": 0.2, "loss/epoch": 1.0}),
    ]
    assert list(loss_metrics(history[:1], prefix="loss.tiny"))[0][1]["loss.tiny/soft"] == 1.2


def test_report_figures_per_model_and_language_booleans_and_text_left_out():
    report = {"overall": {"student": {"accuracy": 0.77}, "ablation:student": {"accuracy": 0.75}, "retention": 0.9},
              "per_language": {"amh_Ethi": {"teacher": {"accuracy": 0.8}, "intervals": {"low": -0.01},
                                            "note": "text", "flag": True}},
              "efficiency": {"speedup_batch_32": 2.6, "latency": {"student_ms": 5.5}},
              "samples_distilled": 400, "wall_seconds": 12.5, "status": "completed"}
    assert report_metrics(report) == {
        "eval/overall/student/accuracy": 0.77, "eval/overall/ablation:student/accuracy": 0.75,
        "eval/overall/retention": 0.9, "eval/per_language/amh_Ethi/teacher/accuracy": 0.8,
        "eval/per_language/amh_Ethi/intervals/low": -0.01, "eval/efficiency/speedup_batch_32": 2.6,
        "eval/efficiency/latency/student_ms": 5.5, "job/samples_distilled": 400.0, "job/wall_seconds": 12.5}


def test_names_keep_only_what_backends_accept():
    assert metric_name("eval", "per_language", "zho_Hans", "f1 (macro)") == "eval/per_language/zho_Hans/f1 _macro_"
    assert metric_name("loss", "", "soft") == "loss/soft"


def test_live_progress_is_logged_once_per_new_step():
    recorder = Recorder()
    tracking = JobTracking([recorder])
    for progress in ({"step": "4", "loss": "0.9", "samples": "64"}, {"step": "4", "loss": "0.9"},
                     {"step": "8", "loss": "nan", "samples": "128"}, {"samples": "130"}):
        tracking.progress(progress)
    assert recorder.metrics == [(4, {"progress/loss": 0.9, "progress/samples": 64.0}),
                                (8, {"progress/samples": 128.0})]
    assert progress_metrics({"step": "x"}) is None


def test_finish_logs_losses_figures_and_the_files_there_are(tmp_path):
    (tmp_path / "report.md").write_text("# Report\n")
    (tmp_path / "job.yaml").write_text("job_id: x\n")
    recorder = Recorder()
    tracking = JobTracking([recorder])
    tracking.finish({"status": "completed", "student_steps": 20, "overall": {"student": {"accuracy": 0.5}},
                     "loss_history": [{"step": 20, "epoch": 0, "loss": 1.0}],
                     "extra_students": {"tiny": {"loss_history": [{"step": 20, "loss": 2.0}]}}}, tmp_path)
    assert (20, {"loss/loss": 1.0, "loss/epoch": 0.0}) in recorder.metrics
    assert (20, {"loss.tiny/loss": 2.0}) in recorder.metrics
    assert (20, {"eval/overall/student/accuracy": 0.5}) in recorder.metrics
    assert recorder.artefacts == ["report.md", "job.yaml"]


def test_finish_logs_the_ablations_dev_curve_beside_the_students(tmp_path):
    recorder = Recorder()
    point = {"step": 10, "epoch": 1.0, "accuracy": 0.6, "per_language": {"eng_Latn": 0.7}}
    JobTracking([recorder]).finish({"status": "completed", "ablation_validation": {
        "ablation": {"curve": [point], "kept_step": 10, "stopped_early": False},
        "ablation:tiny": {"curve": [dict(point, accuracy=0.5)], "kept_step": 10, "stopped_early": False}}}, tmp_path)
    assert (10, {"dev.ablation/accuracy": 0.6, "dev.ablation/epoch": 1.0,
                 "dev.ablation/per_language/eng_Latn": 0.7}) in recorder.metrics
    assert (10, {"dev.ablation:tiny/accuracy": 0.5, "dev.ablation:tiny/epoch": 1.0,
                 "dev.ablation:tiny/per_language/eng_Latn": 0.7}) in recorder.metrics


@pytest.mark.parametrize(("status", "raised", "run_status"), [
    ("completed", None, "FINISHED"), ("completed_with_dead_letters", None, "FINISHED"),
    ("failed", None, "FAILED"), (None, RuntimeError("boom"), "FAILED"),
    (None, KeyboardInterrupt(), "KILLED"),
    (None, JobStopped("polydistill stop", "/tmp/out", 0, 10, None, False, None), "KILLED"),
])
def test_the_run_ends_with_the_jobs_outcome(tmp_path, status, raised, run_status):
    recorder = Recorder()
    tracking = JobTracking([recorder])
    with pytest.raises(type(raised)) if raised is not None else _nothing():
        with tracked(tracking):
            if status is not None:
                tracking.finish({"status": status}, tmp_path)
            if raised is not None:
                raise raised
    assert recorder.status == run_status


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_tracker_without_its_package_is_a_config_error_naming_the_extra(monkeypatch):
    import builtins

    from polydistill.cluster.config import ConfigError

    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(ConfigError, match=r"tracking.mlflow needs the mlflow package: pip install 'polydistill\[tracking\]'"):
        JobTracking.open(config(tracking={"mlflow": True}), Path("/nonexistent"))
