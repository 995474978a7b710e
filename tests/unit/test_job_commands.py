"""The job commands (status, logs, stop, scale) against a Ray cluster that refuses them: one line saying
what to change and a non-zero exit status, never a traceback."""

from __future__ import annotations

import pytest
import ray.exceptions
import ray.job_submission

from polydistill.cluster.cli import main
from polydistill.cluster.exit_codes import EXIT_FAILED


class TokenRefused:
    """Ray's client as it behaves against a cluster with token authentication and no token here."""

    def __init__(self, address, headers=None):
        raise ray.exceptions.AuthenticationError("Authentication token is missing or incorrect.")


@pytest.mark.parametrize("command", [["status", "a-job"], ["logs", "a-job"], ["stop", "a-job"],
                                     ["scale", "a-job", "--teachers", "2"]])
def test_a_cluster_asking_for_its_token_gets_one_line_naming_what_to_set(command, monkeypatch, capsys):
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", TokenRefused)
    assert main(command) == EXIT_FAILED
    error = capsys.readouterr().err
    assert error.startswith("error: the Ray cluster found on this machine (no --address given) asks for its "
                            "authentication token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    assert "polydistill run" in error and "Traceback" not in error
