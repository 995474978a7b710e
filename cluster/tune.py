"""``polydistill tune``: a hyper-parameter search over distillation jobs with Ray Tune.

    polydistill tune JOB.yaml --space SPACE.yaml --output DIR [--set dotted.key=value ...]

SPACE.yaml (a :class:`TuneConfig`) names the dimensions searched: the temperature, the loss
weights, the hidden-layer mapping, the learning rate, and any other job key by its dotted name
(``space.more``, e.g. the student's depth, which is what gives the accuracy/size trade-off a front).
Every trial is one ordinary job (``cluster.driver.run_job``) built from JOB.yaml plus the trial's
``--set``-style overrides, with its own output folder ``DIR/trials/<trial>`` and its own job id, so
its Redis keys never meet another trial's. All trials share one Redis (the job's
``transport.redis_url``, else one private server started for the search). A random teacher
(``teacher.model: random``) is built once, in ``DIR/teacher``, and every trial distils that one.

When the job config knows a knowledge cache (``knowledge_cache`` in :class:`JobConfig`), every trial
runs with it on (whatever the job file says) and one cache folder (the job's ``knowledge_cache.dir``,
else ``DIR/knowledge_cache``), and a warm-up job with the base config runs first, alone, so
the teacher's knowledge is computed once. The cache key includes the knowledge contract: a trial
whose hidden-layer mapping differs from the warm-up's computes the teacher once for that contract and
stores it, and later trials with the same contract read it. Each trial's row says whether it read
the cache (its teacher replicas computed no sample).

Selection never reads the test split. Every trial is scored on a dev split (``data.dev_split``): the
data's own when it has one (SIB-200 ships ``dev.tsv``), else rows carved from the training split with a
fixed seed, stratified by language and label (``data.dev_from_train``, which also takes them out of every
trial's training rows). The best trial and the Pareto front are chosen on those scores; the test split
(``data.eval_split``) is read once, at the end, to score the chosen trial's teacher and student.

On a multi-node Ray cluster (``RAY_ADDRESS``), give a Redis every node reaches and put DIR on
storage every node shares: the trials' output folders, the shared teacher and the cache live there.

Outputs: ``DIR/tune_report.json`` (every trial's hyper-parameters and dev metrics, the split selected on,
the best trial with its test score, and the Pareto front of accuracy against size/latency),
``DIR/tune_report.md`` (the same as a table) and ``DIR/pareto.png``.

The pure parts (``trial_overrides``, ``pareto_front``, ``best_trial``, the table) need neither Ray nor
torch; Ray Tune is imported only when a search runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from polydistill.cluster.config import ConfigError, JobConfig, _format_validation_error, load_config
from polydistill.cluster.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED
from polydistill.cluster.failures import exit_status_of, failure_line
from polydistill.cluster.stopping import JobStopped
from polydistill.cluster.tracking import local_mlflow_store
from polydistill.cluster.tune_schedule import (
    METRIC,
    RUNNING,
    STOPPED,
    TIME_ATTR,
    SchedulerSettings,
    TrialReporter,
    asha_scheduler,
    check_schedulable,
    final_fields,
    stopped_trial_sweeper,
)
from polydistill.cluster.tune_schedule import trial_overrides as schedule_overrides  # noqa: I001 (a second name)

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, PARETO_PNG = "tune_report.json", "tune_report.md", "pareto.png"
MISSING = "—"
# Size/latency objectives a trial reports (the student's, from the job's efficiency section). A latency
# share is the student's latency over the teacher's, timed in the same rounds of the trial's own evaluation:
# unlike milliseconds, it compares trials that ran minutes apart on a machine whose speed drifts.
LATENCY_SHARES = {"latency_share_batch1": "latency_ms_batch1", "latency_share_batch32": "latency_ms_batch32"}
COST_KEYS = ("params", "non_embedding_params", "disk_bytes", "latency_ms_batch1", "latency_ms_batch32",
             *LATENCY_SHARES)
AXIS_LABELS = {"latency_share_batch1": "student ÷ teacher latency, batch 1",
               "latency_share_batch32": "student ÷ teacher latency, batch 32"}
METRIC_KEYS = ("accuracy", "overall_accuracy", "macro_f1", "retention")
# The named dimensions of `space` and the job keys they set.
NAMED_KEYS = {
    "temperature": "distill.temperature",
    "soft_weight": "distill.soft_weight",
    "hard_weight": "distill.hard_weight",
    "hidden_layers": "distill.hidden_layers",
    "hidden_weight": "distill.hidden_weight",
    "lr": "training.lr",
}
# Keys a search must not touch: the search sets them per trial itself.
_RESERVED_PREFIXES = ("job_id", "output_dir", "transport", "knowledge_cache")
# Data keys that choose which rows a trial is scored on: trials are comparable only on the same dev rows.
_SPLIT_KEYS = ("data.path", "data.languages", "data.limit_per_language", "data.train_split", "data.eval_split",
               "data.dev_split", "data.dev_from_train", "data.dev_fraction", "data.dev_seed")


class TuneConfigError(ConfigError):
    """The search description is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(_Strict):
    """One searched value: exactly one of ``choice``, ``uniform`` or ``loguniform``."""

    choice: list[Any] | None = Field(default=None, description="Pick one of these values.")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high], uniformly.")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="[low, high] with low > 0, uniformly in log space (learning rates, temperatures)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [name for name in ("choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform or loguniform (got {given or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is an empty list: give at least one value")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            low, high = bounds
            if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
                raise ValueError(f"{name} needs [low, high] with low < high, got [{low}, {high}]")
            if name == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {low}")
        return self

    def candidates(self) -> list[Any]:
        """The values checked before the search starts: every choice, or both bounds."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.uniform if self.uniform is not None else self.loguniform)

    def to_ray(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


def _is_layer_mapping(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2
        and all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in pair)
        for pair in value))


class SearchSpace(_Strict):
    """What the search varies; a dimension left out keeps the job's value."""

    temperature: Dimension | None = Field(default=None, description="distill.temperature")
    soft_weight: Dimension | None = Field(default=None, description="distill.soft_weight")
    hard_weight: Dimension | None = Field(default=None, description="distill.hard_weight")
    hidden_layers: Dimension | None = Field(
        default=None,
        description="distill.hidden_layers: a choice among [[student, teacher], ...] mappings, 'uniform' and "
        "null (no hidden-state loss: hidden_weight becomes 0).",
    )
    hidden_weight: Dimension | None = Field(
        default=None, description="distill.hidden_weight; a sampled 0 drops the hidden-state loss (layers: null)."
    )
    lr: Dimension | None = Field(default=None, description="training.lr")
    more: dict[str, Dimension] = Field(
        default_factory=dict,
        description="Any other job key by its dotted name, e.g. student.config.num_hidden_layers: {choice: [1, 2]}.",
    )

    @field_validator("temperature", "soft_weight", "hard_weight", "hidden_weight", "lr")
    @classmethod
    def _numbers(cls, value: Dimension | None) -> Dimension | None:
        if value is not None and value.choice is not None:
            bad = [item for item in value.choice if isinstance(item, bool) or not isinstance(item, (int, float))]
            if bad:
                raise ValueError(f"choice must hold numbers, got {bad}")
        return value

    @field_validator("hidden_layers")
    @classmethod
    def _mappings(cls, value: Dimension | None) -> Dimension | None:
        if value is None:
            return value
        if value.choice is None:
            raise ValueError("hidden_layers takes a choice: [[[student, teacher], ...], 'uniform', null]")
        for item in value.choice:
            if item is not None and item != "uniform" and not _is_layer_mapping(item):
                raise ValueError(f"each choice must be a list of [student_layer, teacher_layer] pairs, 'uniform' "
                                 f"or null; got {item!r}")
        return value

    @field_validator("more")
    @classmethod
    def _dotted_job_keys(cls, value: dict[str, Dimension]) -> dict[str, Dimension]:
        for key in value:
            parts = key.split(".")
            if len(parts) < 2 or not all(parts):
                raise ValueError(f"{key!r} is not a dotted job key such as student.config.num_hidden_layers")
            if key in NAMED_KEYS.values():
                name = next(name for name, job_key in NAMED_KEYS.items() if job_key == key)
                raise ValueError(f"{key!r} has its own dimension: use space.{name} instead")
            if parts[0] in _RESERVED_PREFIXES:
                raise ValueError(f"{key!r}: the search sets {parts[0]} for every trial itself")
            if key in _SPLIT_KEYS:
                raise ValueError(f"{key!r} changes the rows trials are scored on, and trials compare only on the "
                                 "same dev rows: set it for every trial (set: or --set) instead of searching it")
        return value

    @model_validator(mode="after")
    def _something(self) -> SearchSpace:
        if not self.dimensions():
            raise ValueError("the space is empty: give at least one dimension (temperature, soft_weight, "
                             "hard_weight, hidden_layers, hidden_weight, lr or more)")
        return self

    def dimensions(self) -> dict[str, Dimension]:
        """{job key: dimension}, named dimensions first."""
        named = {job_key: getattr(self, name) for name, job_key in NAMED_KEYS.items()
                 if getattr(self, name) is not None}
        return {**named, **self.more}


class TuneConfig(_Strict):
    """A search: SPACE.yaml of ``polydistill tune``."""

    space: SearchSpace
    num_samples: int = Field(default=8, ge=1, le=10_000, description="How many trials to sample.")
    max_concurrent_trials: int = Field(
        default=1, ge=1,
        description="Trials running at once. Each trial is a whole job (teacher replicas and a student): on a "
        "small machine keep 1.",
    )
    metric: Literal["accuracy", "overall_accuracy", "macro_f1", "retention"] = Field(
        default="accuracy",
        description="What the best trial maximises: accuracy is the student's language-average accuracy.",
    )
    minimize: list[Literal[COST_KEYS]] = Field(
        default_factory=lambda: ["params", "latency_share_batch32"],
        description="The costs of the Pareto front (the student's); latencies need evaluation.latency: true. "
        "A latency share (the student's latency over the teacher's, timed together in each trial) compares "
        "trials fairly; milliseconds carry the machine's state at each trial's moment.",
    )
    seed: int | None = Field(default=0, description="Seeds the random search; null: a different search each run.")
    warmup: bool = Field(
        default=True,
        description="Run the base job once before the search to fill the knowledge cache (only when the job "
        "config has knowledge_cache).",
    )
    time_budget_s: float | None = Field(default=None, gt=0, description="Start no trial after this long.")
    scheduler: SchedulerSettings | None = Field(
        default=None,
        description="Stop bad trials early: {asha: {grace_period_epochs: 1, reduction_factor: 3}} compares the "
        "trials' dev accuracy after each epoch (cluster/tune_schedule.py). None: every trial runs to its end.",
    )
    set: list[str] = Field(
        default_factory=list, description="Overrides for every trial (and the warm-up), e.g. training.epochs=1."
    )

    @field_validator("minimize")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a cost twice: {value}")
        return value

    @field_validator("set")
    @classmethod
    def _overrides_shape(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item:
                raise ValueError(f"{item!r}: expected dotted.key=value, e.g. training.epochs=1")
        return value


def load_tune_config(path: str | Path, updates: Mapping[str, Any] | None = None) -> TuneConfig:
    """Reads and validates SPACE.yaml; ``updates`` replace top-level keys (the CLI's flags)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise TuneConfigError(f"{path}: no such search space file") from exc
    except yaml.YAMLError as exc:
        raise TuneConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TuneConfigError(f"{path}: the top level must be a mapping (space:, num_samples:, ...)")
    raw = {**raw, **{key: value for key, value in (updates or {}).items() if value is not None}}
    return validate_tune_config(raw, source=str(path))


def validate_tune_config(raw: Mapping[str, Any], source: str = "search space") -> TuneConfig:
    try:
        return TuneConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise TuneConfigError(_format_validation_error(exc, source)) from None


# --------------------------------------------------------------------------- pure helpers


def yaml_value(value: Any) -> str:
    """VALUE of a ``key=VALUE`` override that ``cluster.config.parse_override`` reads back as ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot use {value} as a setting")
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return json.dumps(value)  # a double-quoted YAML string: no colon or hash can change its meaning
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as a setting")


def _plain(value: Any) -> Any:
    """Tune hands back numpy scalars and tuples; the report and the overrides want plain values."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def effective_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a sampled point ({dotted job key: value}) gives the job, as plain values.

    The hidden-state loss is switched on and off as a pair, since the job refuses layers without a
    weight and a weight without layers: a sampled mapping of null sets the weight to 0, and a sampled
    weight of 0 sets the mapping to null.
    """
    values = {key: _plain(value) for key, value in sample.items()}
    layers_key, weight_key = NAMED_KEYS["hidden_layers"], NAMED_KEYS["hidden_weight"]
    if layers_key in values and values[layers_key] is None:
        values[weight_key] = 0.0
    elif weight_key in values and values[weight_key] == 0:
        values[layers_key] = None
    return values


def trial_overrides(sample: Mapping[str, Any]) -> list[str]:
    """A sampled point as ``dotted.key=value`` overrides (see :func:`effective_sample`), in its order."""
    return [f"{key}={yaml_value(value)}" for key, value in effective_sample(sample).items()]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def pareto_front(rows: Sequence[Mapping[str, Any]], maximize: str = "accuracy",
                 minimize: Sequence[str] = ("params", "latency_share_batch32")) -> list[Mapping[str, Any]]:
    """The rows no other row dominates: at least as good on every objective and better on one.

    ``maximize`` is higher-is-better; each of ``minimize`` is lower-is-better. A cost that no row
    has (latency when it was not measured) is left out; a row without ``maximize`` or without a
    remaining cost (a failed trial) is not a candidate. Equal rows are all kept. Returns the rows
    themselves, best ``maximize`` first (ties: input order).
    """
    costs = [key for key in minimize if any(_number(row.get(key)) is not None for row in rows)]
    candidates = [row for row in rows if _number(row.get(maximize)) is not None
                  and all(_number(row.get(key)) is not None for key in costs)]

    def point(row: Mapping[str, Any]) -> tuple[float, ...]:
        return (-_number(row[maximize]), *(_number(row[key]) for key in costs))  # all lower-is-better

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    points = [point(row) for row in candidates]
    front = [row for row, p in zip(candidates, points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda row: -_number(row[maximize]))


def best_trial(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy",
               tie_break: Sequence[str] = ()) -> Mapping[str, Any] | None:
    """The row with the highest ``metric``; None when no row has it.

    Among equals the lowest ``tie_break`` costs win, compared in order (a row lacking one counts as
    the most costly), then the first row. With the Pareto front's costs as ``tie_break`` the best
    trial is always on the front."""
    scored = [row for row in rows if _number(row.get(metric)) is not None]
    if not scored:
        return None

    def cost(row: Mapping[str, Any], key: str) -> float:
        value = _number(row.get(key))
        return math.inf if value is None else value

    top = max(_number(row[metric]) for row in scored)
    return min((row for row in scored if _number(row[metric]) == top),
               key=lambda row: tuple(cost(row, key) for key in tie_break))


def trial_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial reports, read from its job report (``cluster.driver.run_job``)."""
    overall = report.get("overall") or {}
    efficiency = report.get("efficiency") or {}
    student, teacher_costs = efficiency.get("student") or {}, efficiency.get("teacher") or {}
    teachers = report.get("teachers") or []
    computed = sum(int(teacher.get("samples") or 0) for teacher in teachers)
    metrics = {
        "accuracy": (overall.get("language_average") or {}).get("student"),
        "overall_accuracy": (overall.get("student") or {}).get("accuracy"),
        "macro_f1": (overall.get("student") or {}).get("macro_f1"),
        "retention": overall.get("retention"),
        "teacher_accuracy": (overall.get("language_average") or {}).get("teacher"),
        **{key: student.get(key) for key in COST_KEYS if key not in LATENCY_SHARES},
        **{share: _share(student.get(figure), teacher_costs.get(figure)) for share, figure in LATENCY_SHARES.items()},
        "final_loss": report.get("final_loss"),
        "wall_seconds": report.get("total_seconds", report.get("wall_seconds")),
        "samples_distilled": report.get("samples_distilled"),
        # A job that read the teacher's knowledge from the cache ran no teacher forward pass.
        "teacher_samples_computed": computed,
        "knowledge_from_cache": bool(report.get("samples_distilled")) and computed == 0,
    }
    if "knowledge_cache" in report:  # whatever the job says about its cache, kept as it is
        metrics["knowledge_cache"] = json.dumps(report["knowledge_cache"], default=str)
    return metrics


def _share(student_ms: Any, teacher_ms: Any) -> float | None:
    """The student's latency as a share of the teacher's, both timed in the same rounds of the job."""
    student_value, teacher_value = _number(student_ms), _number(teacher_ms)
    if student_value is None or teacher_value is None or teacher_value <= 0:
        return None
    return student_value / teacher_value


def _short_names(keys: Iterable[str]) -> dict[str, str]:
    """Column names: a key's last part where that is unique, else the whole key."""
    keys = list(keys)
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (name if last.count(name) == 1 else key) for key, name in zip(keys, last)}


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return yaml_value(value).replace('"', "")
    return str(value)


def _percent(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{100 * number:.1f}%"


def _count(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{int(number):,}"


def _speedup(share: Any) -> str:
    value = _number(share)
    return MISSING if value is None or value <= 0 else f"{1 / value:.2f}×"


def _ms(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.2f}"


def format_tune_table(result: Mapping[str, Any]) -> str:
    """The trials as a Markdown pipe table: hyper-parameters, metrics, costs, best (★) and front (◆)."""
    rows = result.get("trials") or []
    keys = list(result.get("searched") or dict.fromkeys(key for row in rows for key in row.get("config", {})))
    names = _short_names(keys)
    best = result.get("best_trial")
    front = set(result.get("pareto_front") or [])
    split = (result.get("selected_on") or {}).get("split")
    scored_on = f" ({split})" if split else ""  # every trial's scores are on the dev split it was chosen on
    header = ["trial", *names.values(), f"accuracy{scored_on}", f"retention{scored_on}", "params",
              "latency b32 (ms, this trial's moment)", "speed-up b32", "knowledge", "front"]
    lines = []
    for row in rows:
        marks = ("★" if row["trial"] == best else "") + ("◆" if row["trial"] in front else "")
        if row.get("status") == STOPPED:
            knowledge = f"stopped after {_cell(row.get('epochs'))} epoch(s)"
        elif row.get("status") != "ok":
            knowledge = "failed"
        else:
            knowledge = "cache" if row.get("knowledge_from_cache") else "teacher"
        config = row.get("config") or {}
        lines.append([row["trial"], *(_cell(config.get(key)) for key in keys), _percent(row.get("accuracy")),
                      _percent(row.get("retention")), _count(row.get("params")), _ms(row.get("latency_ms_batch32")),
                      _speedup(row.get("latency_share_batch32")), knowledge, marks])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, lines)])


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    rows = {row["trial"]: row for row in result.get("trials") or []}
    metric = result.get("metric", "accuracy")
    lines = []
    selected_on = result.get("selected_on") or {}
    if selected_on:
        lines.append(selected_on_line(selected_on))
    split = selected_on.get("split", "held-out")
    best = rows.get(result.get("best_trial"))
    if best is not None:
        settings = " ".join(best.get("overrides") or [])
        lines.append(f"best trial: {best['trial']} ({split} {metric} {_percent(best.get(metric))}): {settings}")
    else:
        lines.append("best trial: none (no trial finished with a score)")
    test = result.get("test")
    if test:
        lines.append(chosen_trial_test_line(test, metric))
    costs = ", ".join(result.get("pareto_costs") or []) or "nothing"
    lines.append(f"Pareto front ({metric} against {costs}): {', '.join(result.get('pareto_front') or []) or 'empty'}")
    finished = [row for row in rows.values() if row.get("status") == "ok"]
    cached = [row["trial"] for row in finished if row.get("knowledge_from_cache")]
    cache = result.get("knowledge_cache") or {}
    if cache.get("enabled"):
        lines.append(f"knowledge cache {cache.get('dir')}: {len(cached)} of {len(finished)} finished trials read it")
    else:
        lines.append("knowledge cache: not available in this job config; every trial ran its teacher")
    stopped = [f"{name} ({_cell(row.get('epochs'))} epochs, dev {_percent(row.get(METRIC))})"
               for name, row in rows.items() if row.get("status") == STOPPED]
    if stopped:
        lines.append(f"stopped before their last epoch (the scheduler, or the time budget): {', '.join(stopped)}")
    failed = [name for name, row in rows.items() if row.get("status") not in ("ok", STOPPED)]
    if failed:
        lines.append(f"failed trials: {', '.join(failed)} (errors in tune_report.json)")
    return lines


def selected_on_line(selected_on: Mapping[str, Any]) -> str:
    """Which split the trials were scored and chosen on, and where its rows came from."""
    split, rows = selected_on.get("split"), _count(selected_on.get("rows"))
    languages = len(selected_on.get("rows_per_language") or {})
    if selected_on.get("source") == "train":
        origin = (f"carved from {selected_on.get('train_split')!r} ({_percent(selected_on.get('fraction'))} of each "
                  f"language's rows of each label, seed {selected_on.get('seed')}; no trial trained on them)")
    else:
        origin = "the data's own split"
    in_languages = f"{languages} language" + ("" if languages == 1 else "s")
    return (f"selected on: {split!r}, {origin}, {rows} rows in {in_languages}; test split "
            f"{selected_on.get('test_split')!r} read only for the best trial")


def chosen_trial_test_line(test: Mapping[str, Any], metric: str) -> str:
    """The chosen trial's score on the test split, read once after the search."""
    where = f"{test.get('split')!r}, read once for {test.get('trial')}"
    if test.get("error"):
        return f"test ({where}): failed: {test['error']}"
    return (f"test ({where}, {_count(test.get('rows'))} rows): {metric} {_percent(test.get(metric))}, "
            f"teacher {_percent(test.get('teacher_accuracy'))}, retention {_percent(test.get('retention'))}")


def render_markdown(result: Mapping[str, Any]) -> str:
    costs = ", ".join(f"`{cost}`" for cost in result.get("pareto_costs") or []) or "none"
    split = (result.get("selected_on") or {}).get("split")
    scored = f" on the `{split}` split" if split else ""
    intro = (f"{len(result.get('trials') or [])} trials, metric `{result.get('metric')}` (maximised{scored}), "
             f"Pareto costs {costs} (minimised). ★ best trial, ◆ on the Pareto front.")
    parts = [f"# Hyper-parameter search: {result.get('job')}", "", intro, "", format_tune_table(result), "",
             *(f"- {line}" for line in summary_lines(result))]
    if result.get("plot"):
        parts += ["", f"![Pareto front]({result['plot']})"]
    return "\n".join(parts) + "\n"


def plot_pareto(rows: Sequence[Mapping[str, Any]], front_names: Iterable[str], best_name: str | None,
                metric: str, costs: Sequence[str], path: Path) -> Path | None:
    """Accuracy against each cost, the front joined by a line; None when matplotlib is missing or
    there is nothing to draw."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return None
    costs = [cost for cost in costs if any(_number(row.get(cost)) is not None for row in rows)]
    scored = [row for row in rows if _number(row.get(metric)) is not None]
    if not scored or not costs:
        return None
    front_names = set(front_names)
    figure = Figure(figsize=(5 * len(costs), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(costs), squeeze=False)[0]
    for ax, cost in zip(axes, costs):
        points = [(row, _number(row.get(cost)), _number(row[metric])) for row in scored
                  if _number(row.get(cost)) is not None]
        ax.scatter([x for _, x, _ in points], [100 * y for _, _, y in points], color="0.6", label="trial", zorder=2)
        front = sorted((p for p in points if p[0]["trial"] in front_names), key=lambda p: p[1])
        if front:
            ax.plot([x for _, x, _ in front], [100 * y for _, _, y in front], "o-", color="tab:red",
                    label="Pareto front", zorder=3)
        for row, x, y in points:
            ax.annotate(row["trial"].removeprefix("trial_"), (x, 100 * y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
            if row["trial"] == best_name:
                ax.scatter([x], [100 * y], marker="*", s=200, color="gold", edgecolor="black", label="best", zorder=4)
        ax.set_xlabel(AXIS_LABELS.get(cost, f"student {cost}"))
        ax.set_ylabel(f"student {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------- running the search


def cache_supported() -> bool:
    """Whether this version of the job config has a knowledge cache section."""
    return "knowledge_cache" in JobConfig.model_fields


def cache_overrides(config: JobConfig, default_dir: Path) -> tuple[list[str], str | None]:
    """Overrides that switch the knowledge cache on, with the job's own folder or ``default_dir``."""
    if not cache_supported():
        return [], None
    section = getattr(config, "knowledge_cache", None)
    configured = getattr(section, "dir", None) if section is not None else None
    folder = str(Path(configured).resolve()) if configured else str(default_dir.resolve())
    return ["knowledge_cache.enabled=true", f"knowledge_cache.dir={yaml_value(folder)}"], folder


def shared_tracking(config: JobConfig, out: Path) -> list[str]:
    """With tracking on, every trial logs into one place: the search's own MLflow store and TensorBoard
    folder (unless the job names others), one run and one event folder per trial."""
    sets = []
    if config.tracking.mlflow and config.tracking.mlflow_tracking_uri is None:
        sets.append(f"tracking.mlflow_tracking_uri={yaml_value(local_mlflow_store(out)[0])}")
    if config.tracking.tensorboard and config.tracking.tensorboard_dir is None:
        sets.append(f"tracking.tensorboard_dir={yaml_value(str(out / 'tensorboard'))}")
    return sets


def shared_teacher(config: JobConfig, folder: Path) -> list[str]:
    """Overrides that give every trial the same teacher checkpoint, built once here.

    A random teacher (``teacher.model: random``) is otherwise built by each job in its own folder,
    with a freshly trained WordPiece vocabulary whose ids are not reproducible: trials would distil
    different teachers, and no two would share a knowledge-cache key. A teacher given by name or
    folder is already shared (and its fine-tuned copy is cached by recipe). The folder is reused
    while the teacher's recipe (teacher and data sections, seed) stays the same, so that a second
    search reads the first one's cache."""
    if config.teacher.model != "random":
        return []
    from polydistill.cluster.prepare import prepare_teacher
    from polydistill.storage.job_data import load_job_split

    recipe = json.dumps({"teacher": config.teacher.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
                         "seed": config.training.seed}, sort_keys=True)
    marker = folder / "tune_teacher_recipe.json"
    if not (marker.is_file() and marker.read_text(encoding="utf-8") == recipe):
        shutil.rmtree(folder, ignore_errors=True)
        train = load_job_split(config.data, config.data.train_split)
        built = prepare_teacher(config, folder.parent, train)  # writes <parent>/teacher
        if built.resolve() != folder.resolve():
            raise RuntimeError(f"the random teacher was built in {built}, not {folder}")
        marker.write_text(recipe, encoding="utf-8")
    return [f"teacher.model={yaml_value(str(folder.resolve()))}", "teacher.config={}", "teacher.tokenizer=null"]


def trial_bundles(config: JobConfig) -> list[dict[str, float]]:
    """Placement-group bundles for one trial: an empty one for the trial's own process, then one per
    actor the job starts (teacher replicas, up to the autoscaler's maximum, and each student).

    Ray Tune schedules everything a trial starts inside the trial's placement group, so the job's
    actors must have their bundles there, or they would wait forever for CPUs the group lacks."""

    def bundle(cpus: float, gpus: float, resources: Mapping[str, float]) -> dict[str, float]:
        wanted = {"CPU": cpus, "GPU": gpus, **resources}
        return {key: float(value) for key, value in wanted.items() if value}

    teacher = config.teacher
    replicas = teacher.autoscaling.max_replicas if teacher.autoscaling is not None else teacher.replicas
    actors = [bundle(teacher.num_cpus, teacher.num_gpus, teacher.resources)] * replicas
    for name in config.student_names:
        student = config.for_student(name).student
        actors.append(bundle(student.num_cpus, student.num_gpus, student.resources))
    bundles = [{}, *(actor for actor in actors if actor)]  # an actor that asks for nothing needs no bundle
    # The heavy stages (cluster/stages.py) run while no actor does, in an actor's bundle when theirs fits one.
    for stage in (config.finetune_resources, config.evaluation_resources):
        wanted = bundle(stage.num_cpus, stage.num_gpus, stage.resources)
        if wanted and not any(all(held.get(key, 0.0) >= value for key, value in wanted.items()) for held in bundles):
            bundles.append(wanted)
    return bundles


def check_space(job_path: Path, base: list[str], tune_config: TuneConfig) -> None:
    """Fails before anything starts when a value of the space makes an invalid job: each candidate
    (every choice, both bounds) is tried with the other dimensions at their first candidate."""
    dimensions = tune_config.space.dimensions()
    firsts = {key: dimension.candidates()[0] for key, dimension in dimensions.items()}
    for key, dimension in dimensions.items():
        for value in dimension.candidates():
            sample = {**firsts, key: value}
            try:
                load_config(job_path, [*base, *trial_overrides(sample)])
            except ConfigError as exc:
                name = next((n for n, k in NAMED_KEYS.items() if k == key), f"more.{key}")
                raise TuneConfigError(
                    f"space.{name}: the value {yaml_value(value)} makes an invalid job "
                    f"(with {' '.join(trial_overrides(sample))}):\n{exc}"
                ) from None


def _tune_trial(sample: dict, *, job_path: str, base: list[str], secret: list[str], trials_dir: str,
                tag: str, cwd: str, scheduled: bool = False) -> None:
    """One trial: the job with the sampled overrides, run to its report; reports the metrics. ``scheduled``:
    its dev score after each epoch goes to Tune's scheduler as well, which may end the job early."""
    from ray import tune

    from polydistill.cluster.driver import run_job
    from polydistill.cluster.quiet import quiet_libraries

    quiet_libraries()
    os.chdir(cwd)  # relative paths in the job file mean what they mean where `polydistill tune` ran
    name = tune.get_context().get_trial_name()
    out_dir = Path(trials_dir) / name
    overrides = trial_overrides(sample)
    try:
        config = load_config(job_path, [*base, *overrides, *secret, f"job_id={tag}-{name}"], output_dir=str(out_dir))
        if config.tracking.tensorboard_dir:  # each trial's events in a folder of its own (its MLflow run: its job id)
            config = config.model_copy(update={"tracking": config.tracking.model_copy(
                update={"tensorboard_dir": str(Path(config.tracking.tensorboard_dir) / name)})})
        reporter = TrialReporter(tune.report, config.training.epochs) if scheduled else None
        try:
            report = run_job(config, show_progress=False, on_progress=reporter)
        except JobStopped:
            if reporter is not None and reporter.stopped:
                return  # the scheduler's decision: the trial's last result (status "running") says how far it got
            raise
        metrics = trial_metrics(report)
        if metrics["params"] is None:  # evaluation.latency: false leaves efficiency empty; size is cheap
            metrics.update(_student_size(report["student_path"]))
        tune.report({"status": "ok", "output_dir": str(out_dir), **metrics, **final_fields(report)})
    except Exception as exc:  # an invalid combination, a failed job: the row says why, the search goes on
        log.exception("trial %s failed", name)
        tune.report({"status": "error", "output_dir": str(out_dir), "error": f"{type(exc).__name__}: {exc}"[:4000]})


def _student_size(student_path: str) -> dict[str, int]:
    from transformers import AutoModelForSequenceClassification

    from polydistill.student.efficiency import count_parameters, disk_bytes

    model = AutoModelForSequenceClassification.from_pretrained(student_path)
    return {**count_parameters(model), "disk_bytes": disk_bytes(student_path)}


def _row_from_result(result, order: int) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    config = effective_sample(result.config or {})
    name = Path(result.path).name if result.path else f"trial_{order:05d}"
    row: dict[str, Any] = {"trial": name, "status": metrics.get("status", "error"), "config": config,
                           "overrides": trial_overrides(config)}
    for key in (*METRIC_KEYS, "teacher_accuracy", *COST_KEYS, "final_loss", "wall_seconds", "samples_distilled",
                "teacher_samples_computed", "knowledge_from_cache", "output_dir"):
        row[key] = _plain(metrics.get(key))
    if "knowledge_cache" in metrics:
        row["knowledge_cache"] = json.loads(metrics["knowledge_cache"])
    if TIME_ATTR in metrics:  # with a scheduler: the epochs trained and the dev score after the last of them
        row["epochs"], row[METRIC] = _plain(metrics[TIME_ATTR]), _plain(metrics.get(METRIC))
    if metrics.get("status") == RUNNING and result.error is None:
        row["status"] = STOPPED  # by the scheduler, after row["epochs"] epochs: no final score
        return row
    error = metrics.get("error") or (str(result.error)[:4000] if result.error is not None else None)
    if error or row["status"] != "ok":
        row["status"] = "error"
        row["error"] = error or "the trial ended without reporting"
    return row


def _ensure_ray(bundles: list[dict[str, float]], concurrent: int) -> bool:
    """Joins the Ray cluster RAY_ADDRESS names, else starts a local Ray sized for ``concurrent``
    trials, unless Ray is initialised already; returns whether it called ``ray.init`` (the caller
    then shuts it down: a local Ray ends, a cluster is only left). Fails early when one trial cannot fit."""
    import ray

    needed = sum(bundle.get("CPU", 0.0) for bundle in bundles)
    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    elif started:
        cpus = max(float(os.cpu_count() or 1), needed * concurrent)
        ray.init(num_cpus=int(-(-cpus // 1)), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING)
    total = ray.cluster_resources()
    for key in {key for bundle in bundles for key in bundle}:
        want = sum(bundle.get(key, 0.0) for bundle in bundles)
        if want > total.get(key, 0.0) + 1e-9:
            if started:
                ray.shutdown()
            raise TuneConfigError(
                f"one trial needs {want:g} {key} (teacher replicas × teacher.num_cpus/num_gpus/resources plus each "
                f"student's), but the Ray cluster has {total.get(key, 0.0):g}: lower teacher.replicas or the "
                "per-actor resources with --set"
            )
    return started


def run_tune(job_path: str | Path, tune_config: TuneConfig, output_dir: str | Path,
             overrides: Sequence[str] = (), show_table: bool = True) -> dict[str, Any]:
    """Runs the search and writes its report; returns the report dict.

    ``overrides`` apply to every trial (after ``tune_config.set``). Trials are scored and chosen on the dev
    split (:func:`dev_selection`); the test split is read once, for the chosen trial (:func:`score_on_test`).
    Raises :class:`ConfigError` (nothing started) for an invalid job or space."""
    job_path = Path(job_path).resolve()
    out = Path(output_dir).resolve()
    base = [*tune_config.set, *overrides]
    config = load_config(job_path, base)
    if not config.data.eval_split:
        raise ConfigError("data.eval_split is null: a search reports the chosen trial's score on held-out test rows; "
                          "give data.eval_split")
    test_split = config.data.eval_split
    selection = dev_selection(config)
    base = [*base, *selection.overrides]
    if tune_config.scheduler is not None:
        check_schedulable(config, tune_config.scheduler, tune_config.space.dimensions())
        base = [*base, *schedule_overrides()]
    config = load_config(job_path, base)
    check_space(job_path, base, tune_config)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("trials", "warmup"):  # a rerun into the same folder replaces its trials (the cache stays)
        shutil.rmtree(out / stale, ignore_errors=True)
    cache_sets, cache_dir = cache_overrides(config, out / "knowledge_cache")
    base = [*base, *shared_teacher(config, out / "teacher"), *cache_sets, *shared_tracking(config, out)]
    started = time.perf_counter()
    rows, warmup = _run_trials(job_path, base, tune_config, out, config, fill_cache=cache_dir is not None)

    metric = tune_config.metric
    costs = [key for key in tune_config.minimize if any(_number(row.get(key)) is not None for row in rows)]
    best = best_trial(rows, metric, tie_break=costs)
    front = pareto_front(rows, maximize=metric, minimize=costs)
    result: dict[str, Any] = {
        "job": str(job_path),
        "output_dir": str(out),
        "overrides": [item for item in base if not item.startswith("transport.")],
        "searched": list(tune_config.space.dimensions()),
        "tune_config": {**tune_config.model_dump(mode="json"),  # no Redis URL or password in a report
                        "set": [item for item in tune_config.set if not item.startswith("transport.")]},
        "metric": metric,
        "selected_on": selection.summary,
        "pareto_costs": costs,
        "trials": rows,
        "best_trial": best["trial"] if best else None,
        "best": best,
        "test": score_on_test(job_path, base, best, test_split) if best else None,
        "pareto_front": [row["trial"] for row in front],
        "warmup": warmup,
        "knowledge_cache": {
            "supported": cache_supported(),
            "enabled": cache_dir is not None,
            "dir": cache_dir,
            "trials_from_cache": [row["trial"] for row in rows if row.get("knowledge_from_cache")],
        },
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    plot = plot_pareto(rows, result["pareto_front"], result["best_trial"], metric, costs, out / PARETO_PNG)
    result["plot"] = plot.name if plot else None
    (out / REPORT_JSON).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(render_markdown(result), encoding="utf-8")
    if show_table:
        print(format_tune_table(result))
        for line in summary_lines(result):
            print(line)
        print(f"report: {out / REPORT_JSON}, {out / REPORT_MD}" + (f", {plot}" if plot else ""))
    return result


@dataclass(frozen=True)
class DevSelection:
    """The split the search selects on: the overrides every trial (and the warm-up) runs with, and
    what the report says about it."""

    overrides: list[str]
    summary: dict[str, Any]


def dev_selection(config: JobConfig) -> DevSelection:
    """Every trial scored on ``data.dev_split``: the data's own, or (when the data has none, or with
    ``data.dev_from_train``) rows carved from the training split, which the trials then train without.

    Reads the dev and training splits once to check that the dev rows cover every language trained on."""
    from polydistill.storage.job_data import has_own_split, load_job_split

    data = config.data
    for key, other in (("eval_split", data.eval_split), ("train_split", data.train_split)):
        if data.dev_split == other:
            raise TuneConfigError(
                f"data.dev_split and data.{key} are both {other!r}: the search scores trials on data.dev_split, which "
                "must be rows no trial trains on and apart from the test rows (data.eval_split) it reads only for "
                "the chosen trial; give data.dev_split another split"
            )
    carve = data.dev_from_train or not has_own_split(data, data.dev_split)
    overrides = [*(["data.dev_from_train=true"] if carve and not data.dev_from_train else []),
                 f"data.eval_split={yaml_value(data.dev_split)}"]
    trial_data = data.model_copy(update={"dev_from_train": carve, "eval_split": data.dev_split})
    dev = load_job_split(trial_data, data.dev_split).dataset.with_format(None)
    trained = set(load_job_split(trial_data, data.train_split).dataset.with_format(None)["language"][:])
    per_language = dict(sorted(Counter(dev["language"][:]).items()))
    missing = sorted(trained - set(per_language))
    if missing:
        remedy = (f"raise data.dev_fraction (now {data.dev_fraction})" if carve else
                  f"add them to the data's {data.dev_split!r} split, or set data.dev_from_train: true to carve a dev "
                  f"split from {data.train_split!r}")
        raise TuneConfigError(f"the dev split {data.dev_split!r} has no rows of {', '.join(missing)}, which the "
                              f"trials train on: {remedy}")
    summary: dict[str, Any] = {"split": data.dev_split, "source": "train" if carve else "data", "rows": len(dev),
                               "rows_per_language": per_language, "test_split": data.eval_split}
    if carve:
        summary.update(train_split=data.train_split, fraction=data.dev_fraction, seed=data.dev_seed)
    return DevSelection(overrides=overrides, summary=summary)


def score_on_test(job_path: Path, base: Sequence[str], best: Mapping[str, Any], test_split: str) -> dict[str, Any]:
    """The chosen trial's teacher and student scored on the test split: the search's only read of it.

    A failure is recorded rather than raised, so that the search's report is still written."""
    from polydistill.student.evaluate import evaluate_job

    scored: dict[str, Any] = {"trial": best["trial"], "split": test_split}
    try:
        trial_report = json.loads((Path(best["output_dir"]) / "report.json").read_text(encoding="utf-8"))
        config = load_config(job_path, [*base, *best.get("overrides", []), f"data.eval_split={yaml_value(test_split)}",
                                        "evaluation.latency=false"])
        evaluation = evaluate_job(config, Path(trial_report["teacher_path"]), Path(trial_report["student_path"]),
                                  list(trial_report.get("labels") or []))
    except Exception as exc:
        log.exception("scoring the best trial %s on %s failed", best["trial"], test_split)
        return {**scored, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    metrics = trial_metrics(evaluation)
    return {**scored, "rows": evaluation.get("eval_samples"),
            **{key: metrics[key] for key in (*METRIC_KEYS, "teacher_accuracy")}}


def _run_trials(job_path: Path, base: list[str], tune_config: TuneConfig, out: Path, config: JobConfig,
                fill_cache: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The trials on Ray, all on one Redis, after the warm-up job that fills the knowledge cache when
    ``fill_cache`` (and the search asks for it); returns their rows (sorted by name) and the warm-up's metrics."""
    from polydistill.cluster.services import configured_redis_url
    from polydistill.storage.redis_server import PrivateRedisServer

    tag = f"tune-{secrets.token_hex(3)}"
    bundles = trial_bundles(config)
    started_ray = _ensure_ray(bundles, tune_config.max_concurrent_trials)
    server = None
    try:
        redis_url = configured_redis_url(config)
        if redis_url is None:  # one private server for the whole search; each trial has its own keys
            import ray

            if sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
                log.warning("a private Redis listens on this machine only: trials placed on other nodes of the "
                            "cluster cannot reach it; give transport.redis_url (or $POLYDISTILL_REDIS_URL)")
            server = PrivateRedisServer(maxmemory=config.transport.private_redis_maxmemory).start()
            redis_url = server.url
        secret = [f"transport.redis_url={yaml_value(redis_url)}"]  # kept out of the report and Tune's files
        warmup_metrics = None
        if fill_cache and tune_config.warmup:
            warmup_metrics = _warmup(job_path, base, secret, out / "warmup", f"{tag}-warmup")
        return _search(job_path, base, secret, tune_config, out, tag, bundles, config, redis_url), warmup_metrics
    finally:
        if server is not None:
            server.stop()
        if started_ray:
            import ray

            ray.shutdown()


def _redis_client(config: JobConfig, redis_url: str):
    """A client of the search's Redis with the job's password (read where this runs, never from the report)."""
    from polydistill.cluster.config import with_redis_password
    from polydistill.storage.streams import connect_job

    return connect_job(redis_url, with_redis_password(config).transport)


def _warmup(job_path: Path, base: list[str], secret: list[str], out_dir: Path, job_id: str) -> dict[str, Any]:
    """The base job, alone, before the search: computes the teacher's knowledge into the cache."""
    from polydistill.cluster.driver import run_job

    config = load_config(job_path, [*base, *secret, f"job_id={job_id}"], output_dir=str(out_dir))
    log.info("warm-up job %s fills the knowledge cache", job_id)
    report = run_job(config, show_progress=False)
    metrics = trial_metrics(report)
    if "knowledge_cache" in metrics:
        metrics["knowledge_cache"] = json.loads(metrics["knowledge_cache"])
    return {"output_dir": str(out_dir), **metrics}


def _search(job_path: Path, base: list[str], secret: list[str], tune_config: TuneConfig, out: Path, tag: str,
            bundles: list[dict[str, float]], config: JobConfig, redis_url: str) -> list[dict[str, Any]]:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0
    # Tune's own result files (result.json, progress.csv) without its TensorBoard logger, which would
    # warn on every run that tensorboardX is not installed.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search import BasicVariantGenerator

    def trial_name(trial) -> str:
        return "trial_" + str(trial.trial_id).rsplit("_", 1)[-1]

    scheduled = tune_config.scheduler is not None
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback()]
    sweeper = None
    if scheduled:
        # A trial that fails reports no dev score; ASHA skips such a result, but Tune's strict check would end
        # the whole search on it.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        sweeper = stopped_trial_sweeper(lambda: _redis_client(config, redis_url),
                                        lambda trial: f"{tag}-{trial_name(trial)}", config.transport.namespace)
        callbacks.append(sweeper)
    trainable = tune.with_parameters(_tune_trial, job_path=str(job_path), base=base, secret=secret,
                                     trials_dir=str(out / "trials"), tag=tag, cwd=os.getcwd(), scheduled=scheduled)

    tuner = tune.Tuner(
        tune.with_resources(trainable, tune.PlacementGroupFactory(bundles, strategy="PACK")),
        param_space={key: dimension.to_ray() for key, dimension in tune_config.space.dimensions().items()},
        tune_config=tune.TuneConfig(
            num_samples=tune_config.num_samples,
            search_alg=BasicVariantGenerator(max_concurrent=tune_config.max_concurrent_trials,
                                             random_state=tune_config.seed),
            time_budget_s=tune_config.time_budget_s,
            scheduler=asha_scheduler(tune_config.scheduler, config.training.epochs) if scheduled else None,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(name=f"search-{tag}", storage_path=str(out / "ray_tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=callbacks),
    )
    grid = tuner.fit()
    if sweeper is not None:
        sweeper.join()
    rows = [_row_from_result(result, order) for order, result in enumerate(grid)]
    return sorted(rows, key=lambda row: row["trial"])


# --------------------------------------------------------------------------- command line


def add_tune_command(subparsers) -> argparse.ArgumentParser:
    """Declares ``polydistill tune`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "tune", help="search temperature, loss weights, layer mapping and learning rate with Ray Tune"
    )
    parser.add_argument("config", help="job YAML file: the base every trial overrides")
    parser.add_argument("--space", required=True, help="search space YAML (see examples/tune/tiny_space.yaml)")
    parser.add_argument("--output", default="runs/tune", help="output directory (default: runs/tune)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key for every trial, e.g. --set training.epochs=1 (YAML value)")
    parser.add_argument("--num-samples", type=int, help="trials to run (overrides the space file's num_samples)")
    parser.add_argument("--max-concurrent", type=int, dest="max_concurrent_trials",
                        help="trials at once (overrides max_concurrent_trials)")
    parser.add_argument("--seed", type=int, help="search seed (overrides seed)")
    return parser


def run_tune_command(args: argparse.Namespace) -> int:
    """``polydistill tune``: 0 when at least one trial finished, 2 for bad input, 1 otherwise."""
    updates = {"num_samples": args.num_samples, "max_concurrent_trials": args.max_concurrent_trials,
               "seed": args.seed}
    try:
        tune_config = load_tune_config(args.space, updates)
        result = run_tune(args.config, tune_config, args.output, args.overrides)
    except ConfigError as exc:  # nothing was started
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        status = exit_status_of(exc)
        if status is None:
            raise
        print(failure_line(exc).replace("error: ", "error: the warm-up job failed: ", 1), file=sys.stderr)
        return status
    if not any(row.get("status") == "ok" for row in result["trials"]):
        print(f"error: no trial finished; see the errors in {Path(result['output_dir']) / REPORT_JSON}", file=sys.stderr)
        return EXIT_FAILED
    return 0
