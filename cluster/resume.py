"""The config a job ran with, saved for ``polydistill resume OUTPUT_DIR``.

``run`` writes ``OUTPUT_DIR/job.yaml`` before anything starts: the fully resolved config (every
default filled in, paths absolute, the job id fixed) so that a resume computes the same batch
plan and the same Redis keys. Secrets stay out of it: ``transport.password`` is dropped and a
password inside ``transport.redis_url`` is cut out of the URL. A resume reads the password again
where it runs, as every process of a job does (cluster/secrets.py): from ``transport.password_env``
or ``transport.password_file`` (saved: a variable's name, a path), or $POLYDISTILL_REDIS_PASSWORD.
Like any run, it takes the job id anew (storage/ownership.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from polydistill.cluster.config import ConfigError, JobConfig, load_config
from polydistill.cluster.secrets import without_password

JOB_FILE = "job.yaml"


def job_file_contents(config: JobConfig) -> dict:
    data = config.model_dump(mode="json")
    data["job_id"] = config.resolved_job_id
    data["output_dir"] = str(Path(config.output_dir).resolve())
    data["transport"]["password"] = None
    data["transport"]["redis_url"] = without_password(config.transport.redis_url)
    return data


def save_job_config(config: JobConfig, out_dir: Path) -> Path:
    path = Path(out_dir) / JOB_FILE
    header = "# The resolved config of this job, written by `polydistill run`; no secrets.\n" \
             "# `polydistill resume DIR` continues the job with it.\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(job_file_contents(config), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def load_job_config(out_dir: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """The config saved in ``out_dir`` by ``run``, with ``--set`` overrides (e.g. another Redis URL)."""
    path = Path(out_dir) / JOB_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no saved job config; `polydistill resume` continues a job that `polydistill run` started "
            "in this directory"
        )
    return load_config(path, list(overrides))
