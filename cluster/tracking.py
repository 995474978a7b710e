"""Experiment tracking: one small interface (``Tracker``) that the driver and ``polydistill tune``
log through, with MLflow and TensorBoard behind it.

What a job logs: its config (redacted) as parameters, the student's progress while it trains
(``progress/*``), after it every logged step's loss per term (``loss/*``, extra students under
``loss.<name>/*``), the dev score of each epoch with ``training.validate_each_epoch`` (``dev/*``), the
report's figures (``eval/*``: accuracy per model and per language, retention
and the intervals, speed and size) and its files (report.md, report.json, plots, job.yaml) as
artefacts. The pure part (``config_params``, ``loss_metrics``, ``report_metrics``) decides the
names and values; the backends only write them."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from polydistill.cluster.config import ConfigError, JobConfig
from polydistill.cluster.stopping import JobStopped
from polydistill.cluster.secrets import redacted

log = logging.getLogger(__name__)

# Keys of a loss_history entry that are coordinates, not losses.
_COORDINATES = {"step", "epoch"}
# Report sections whose numeric leaves are the job's figures.
_REPORT_SECTIONS = ("overall", "per_language", "efficiency")
_ARTEFACTS = ("report.md", "report.json", "job.yaml", "per_language_accuracy.png", "training_loss.png",
              "accuracy_vs_size.png")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_BATCH = 500  # metrics per log_batch call (the REST API takes at most 1,000)
MLFLOW_PARAM_BATCH = 100
MLFLOW_PARAM_CHARS = 6000


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, str]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def close(self, status: str) -> None: ...


# -- what is logged (pure) ------------------------------------------------------------------------
def metric_name(*parts: str) -> str:
    """Joins parts with '/' and replaces what tracking backends refuse in a name."""
    return _UNSAFE.sub("_", "/".join(str(part) for part in parts if part != ""))


def _flatten(data, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, data


def config_params(config: JobConfig) -> dict[str, str]:
    """The config, redacted, as flat ``section.key`` parameters (lists and nulls as JSON text)."""
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in _flatten(redacted(config))}


def loss_metrics(loss_history: list[Mapping], prefix: str = "loss") -> Iterator[tuple[int, dict[str, float]]]:
    """(step, {"loss/<term>": value}) for each logged step; nulls and non-finite values left out."""
    for entry in loss_history:
        values = {metric_name(prefix, key): float(value) for key, value in entry.items()
                  if key not in _COORDINATES and isinstance(value, (int, float)) and math.isfinite(value)}
        if "epoch" in entry:
            values[metric_name(prefix, "epoch")] = float(entry["epoch"])
        yield int(entry["step"]), values


def report_metrics(report: Mapping) -> dict[str, float]:
    """The report's figures as ``eval/<section>/...`` metrics: every finite number (booleans left out)
    under overall, per_language and efficiency, plus the job's accounting and wall time."""
    metrics: dict[str, float] = {}
    for section in _REPORT_SECTIONS:
        for key, value in _flatten(report.get(section) or {}):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[metric_name("eval", section, *key.split("."))] = float(value)
    for key in ("samples_distilled", "samples_expected", "dead_letters", "wall_seconds", "total_seconds"):
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[metric_name("job", key)] = float(value)
    return metrics


def validation_metrics(validation: list[Mapping], prefix: str = "dev") -> Iterator[tuple[int, dict[str, float]]]:
    """(step, {"dev/accuracy": .., "dev/epoch": .., "dev/per_language/<language>": ..}) per scored epoch."""
    for score in validation:
        metrics = {metric_name(prefix, "accuracy"): float(score["accuracy"]),
                   metric_name(prefix, "epoch"): float(score["epoch"])}
        metrics.update({metric_name(prefix, "per_language", language): float(value)
                        for language, value in score["per_language"].items()})
        yield int(score["step"]), metrics


def progress_metrics(progress: Mapping[str, str]) -> tuple[int, dict[str, float]] | None:
    """The student's live progress hash ({"step": "12", "loss": "0.81", ...}) as metrics at its step."""
    try:
        step = int(float(progress["step"]))
    except (KeyError, ValueError):
        return None
    metrics = {}
    for key in ("loss", "samples", "batches"):
        try:
            value = float(progress[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            metrics[metric_name("progress", key)] = value
    return step, metrics


# -- backends (I/O) -------------------------------------------------------------------------------
def _needs(module: str, setting: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ConfigError(f"{setting} needs the {module.split('.')[0]} package: pip install 'polydistill[tracking]' "
                          f"or set {setting}: false") from error


def local_mlflow_store(folder: Path) -> tuple[str, str]:
    """The tracking URI and artefact location of a local MLflow store in ``folder`` (MLflow 3 keeps its
    file store in maintenance mode; SQLite is the local backend it recommends)."""
    folder = folder.resolve()
    return f"sqlite:///{folder / MLFLOW_DB}", (folder / MLFLOW_ARTIFACTS).as_uri()


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` (no global active run: a tune process logs
    several runs side by side)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                 artifact_location: str | None = None):
        mlflow = _needs("mlflow", "tracking.mlflow")
        self._entities = _needs("mlflow.entities", "tracking.mlflow")
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.artifact_location = artifact_location
        self.run_id = self.client.create_run(self._experiment_id(experiment), run_name=run_name,
                                             tags=dict(tags)).info.run_id
        self.tracking_uri = tracking_uri

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created if missing (a concurrent tune trial may create it first) and restored
        if it was deleted (a deleted experiment takes no runs)."""
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=self.artifact_location)
            except Exception:  # created meanwhile by another trial: read it back
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [self._entities.Param(key, value[:MLFLOW_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MLFLOW_PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [self._entities.Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + MLFLOW_BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker:
    """TensorBoard event files: scalars per step, the config and the report as text."""

    def __init__(self, log_dir: Path):
        _needs("tensorboard", "tracking.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: Mapping[str, str]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".md":
            self.writer.add_text(path.stem, path.read_text(encoding="utf-8"), 0)

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


class JobTracking:
    """The trackers a job's config enables, fed by the driver; a no-op when none is."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self._last_progress_step = -1
        self.job_status: str | None = None  # the report's status, once finish() has seen it

    @classmethod
    def open(cls, config: JobConfig, out_dir: Path) -> "JobTracking":
        settings = config.tracking
        trackers: list[Tracker] = []
        if settings.mlflow:
            uri, artifacts = settings.mlflow_tracking_uri, None
            if uri is None:  # a local store: MLflow's SQLite backend, the artefacts in a folder beside it
                uri, artifacts = local_mlflow_store(out_dir)
            trackers.append(MlflowTracker(uri, settings.experiment, settings.run_name or config.resolved_job_id,
                                          {"polydistill.task": config.task, "polydistill.job_id": config.resolved_job_id},
                                          artifacts))
        if settings.tensorboard:
            trackers.append(TensorBoardTracker(Path(settings.tensorboard_dir or out_dir / "tensorboard")))
        tracking = cls(trackers)
        tracking.each("log_params", config_params(config))
        return tracking

    def each(self, method: str, *args) -> None:
        """Calls every tracker; one that fails (a tracking server gone, a full disk) is logged once and dropped:
        tracking never ends or fails a job."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 - any tracker error, contained
                log.warning("experiment tracking: %s.%s failed (%s: %s); no more is logged there",
                            type(tracker).__name__, method, type(error).__name__, error)
                self.trackers.remove(tracker)

    def progress(self, progress: Mapping[str, str]) -> None:
        """Live: called with the student's progress hash whenever the driver reads it."""
        if not self.trackers:
            return
        logged = progress_metrics(progress)
        if logged is not None and logged[0] > self._last_progress_step and logged[1]:
            self._last_progress_step = logged[0]
            self.each("log_metrics", logged[1], logged[0])

    def finish(self, report: Mapping, out_dir: Path) -> None:
        """After the report is written: losses per step, the report's figures, its files."""
        self.job_status = report.get("status")
        if not self.trackers:
            return
        for step, metrics in loss_metrics(report.get("loss_history") or []):
            self.each("log_metrics", metrics, step)
        for step, metrics in validation_metrics(report.get("validation") or []):
            self.each("log_metrics", metrics, step)
        for name, extra in (report.get("extra_students") or {}).items():
            for step, metrics in loss_metrics(extra.get("loss_history") or [], prefix=f"loss.{name}"):
                self.each("log_metrics", metrics, step)
            for step, metrics in validation_metrics(extra.get("validation") or [], prefix=f"dev.{name}"):
                self.each("log_metrics", metrics, step)
        # Each hard-label ablation's dev curve at its own steps, which are the student's at each epoch's end.
        for name, ablation in (report.get("ablation_validation") or {}).items():
            for step, metrics in validation_metrics(ablation["curve"], prefix=f"dev.{name}"):
                self.each("log_metrics", metrics, step)
        last_step = int(report.get("student_steps") or 0)
        self.each("log_metrics", report_metrics(report), last_step)
        for name in _ARTEFACTS:
            if (out_dir / name).is_file():
                self.each("log_artifact", out_dir / name)

    def close(self, status: str) -> None:
        self.each("close", status)


# The report's status -> the run status MLflow shows.
RUN_STATUS = {"completed": "FINISHED", "completed_with_dead_letters": "FINISHED", "stopped": "KILLED",
              "failed": "FAILED"}


@contextmanager
def tracked(tracking: JobTracking) -> Iterator[JobTracking]:
    """Closes the trackers however the job ends: the report's status when it got one, else KILLED for a
    stop or Ctrl-C and FAILED for any other error."""
    status = "FAILED"
    try:
        yield tracking
        status = RUN_STATUS.get(tracking.job_status or "completed", "FINISHED")
    except (JobStopped, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        tracking.close(status)
