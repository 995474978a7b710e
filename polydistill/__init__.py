"""polydistill: distributed knowledge distillation for multilingual language models.

The public API is small::

    import polydistill
    report = polydistill.run("examples/tiny.yaml", output="/tmp/out", **{"training.epochs": 1})
    config = polydistill.load_config("examples/tiny.yaml", ["training.epochs=1"])

The subpackages keep the repository's folders: ``polydistill.storage`` (schema, data and
transport), ``polydistill.student`` (models, knowledge, training, evaluation, compression),
``polydistill.actors`` (Ray actors) and ``polydistill.cluster`` (configuration, orchestration,
command line).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("polydistill")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

from polydistill.api import ConfigError, JobFailed, JobStopped, Report, load_config, run  # noqa: E402

__all__ = ["ConfigError", "JobFailed", "JobStopped", "Report", "__version__", "load_config", "run"]
