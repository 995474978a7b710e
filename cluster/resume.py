"""The config a job ran with, saved for ``polydistill resume OUTPUT_DIR``.

``run`` writes ``OUTPUT_DIR/job.yaml`` before anything starts: the fully resolved config (every
default filled in, paths absolute, the job id fixed) so that a resume computes the same batch
plan and the same Redis keys. Secrets stay out of it: ``transport.password`` is dropped and a
password inside ``transport.redis_url`` is cut out of the URL. A resume that needs one gets it
again from ``transport.password_env`` (saved: it is only a variable's name) or ``--set``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from polydistill.cluster.config import ConfigError, JobConfig, load_config

JOB_FILE = "job.yaml"


def without_password(url: str | None) -> str | None:
    """The URL with any password (userinfo or ``?password=``) removed; the user name is kept."""
    if url is None:
        return None
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
    """The config saved in ``out_dir`` by ``run``, with ``--set`` overrides (e.g. the Redis password)."""
    path = Path(out_dir) / JOB_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no saved job config; `polydistill resume` continues a job that `polydistill run` started "
            "in this directory"
        )
    return load_config(path, list(overrides))
