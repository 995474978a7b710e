"""The Python entry points: ``run`` a job from a config file or a validated config, ``load_config``.

``run`` is what ``polydistill run`` does, without printing: it raises on failure instead of
returning an exit status, and returns the report that it also writes as ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polydistill.cluster.config import ConfigError, JobConfig, apply_overrides, load_config, validate_config
from polydistill.cluster.report_schema import Report
from polydistill.cluster.stopping import JobFailed, JobStopped

__all__ = ["ConfigError", "JobFailed", "JobStopped", "Report", "load_config", "run"]


def run(config_or_path: JobConfig | str | Path, output: str | Path | None = None, *, resume: bool = False,
        show_progress: bool = False, **overrides: Any) -> Report:
    """Runs one distillation job and returns its report.

    Raises ``ConfigError`` for an invalid config (nothing started), ``JobStopped`` when the job was
    stopped from outside (``polydistill stop``, a signal; resumable with ``resume=True``), and
    ``JobFailed`` when it ran but did not distil every sample exactly once.

    ``overrides`` set config keys by dotted name, with Python values: ``**{"training.epochs": 2}``
    or, as keywords, with ``__`` for the dots: ``training__epochs=2``. A ``JobConfig`` is run as
    it is (overrides then apply to it too).
    """
    from polydistill.cluster.driver import run_job  # Ray, torch and transformers: only when a job runs

    lines = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(config_or_path, JobConfig):
        raw = apply_overrides(config_or_path.model_dump(mode="json"), lines)
        if output is not None:
            raw["output_dir"] = str(output)
        config = validate_config(raw, source="polydistill.run")
    else:
        config = load_config(config_or_path, lines, None if output is None else str(output))
    return Report.model_validate(run_job(config, show_progress=show_progress, resume=resume))
