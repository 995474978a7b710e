"""The Redis password: where each process reads it (config.with_redis_password) and how it stays out
of what users and operators see (cluster/secrets.py, the submission a `polydistill submit` sends)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from polydistill.cluster.config import ConfigError, load_config, redis_password, validate_config, with_redis_password
from polydistill.cluster.jobs import submission_request
from polydistill.cluster.secrets import (
    check_handoff_reaches,
    password_handoff,
    redacted,
    refuse_secrets_in_submission,
    separate_url_password,
)

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
MINIMAL = {"teacher": {"model": "random"}, "data": {"path": "d"}}
SECRET = "Pa55:w/rd@x"


def config_with(**transport):
    return validate_config({**MINIMAL, "transport": transport})


def test_validate_shows_the_password_and_the_urls_password_as_stars():
    shown = redacted(config_with(password=SECRET))["transport"]
    assert shown["password"] == "***"
    shown = redacted(config_with(redis_url="redis://bob:hunter2@h:1/0"))["transport"]
    assert shown["redis_url"] == "redis://bob:***@h:1/0" and shown["password"] is None
    shown = redacted(config_with(redis_url="rediss://h:1/0?password=hunter2"))["transport"]
    assert "hunter2" not in shown["redis_url"]


def test_each_process_reads_the_password_from_the_first_source_set(tmp_path):
    environ = {"POLYDISTILL_REDIS_PASSWORD": "from-default", "MINE": "from-mine"}
    assert redis_password(config_with(password_env="MINE").transport, environ) == "from-mine"
    secret_file = tmp_path / "pw"
    secret_file.write_text(f"{SECRET}\n")
    assert redis_password(config_with(password_file=str(secret_file)).transport, environ) == SECRET
    assert redis_password(config_with(redis_url="redis://h:1/0").transport, environ) == "from-default"
    assert redis_password(config_with(redis_url="redis://:inline@h:1/0").transport, environ) is None  # the URL has it
    assert redis_password(config_with().transport, {}) is None
    resolved = with_redis_password(config_with(password_file=str(secret_file)), environ)
    assert resolved.transport.password == SECRET and resolved.transport.password_file == str(secret_file)


def test_a_password_file_that_cannot_be_read_or_holds_more_than_a_line_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"transport.password_file .*missing: cannot read it where the job runs"):
        redis_password(config_with(password_file=str(tmp_path / "missing")).transport)
    two_lines = tmp_path / "two"
    two_lines.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="one line"):
        redis_password(config_with(password_file=str(two_lines)).transport)


def test_one_source_of_the_password_at_most():
    for transport in ({"password": "x", "password_file": "/f"}, {"password_env": "X", "password_file": "/f"},
                      {"redis_url": "redis://:x@h:1/0", "password_env": "X"}):
        with pytest.raises(ConfigError, match="in one place") as refused:
            config_with(**transport)
        assert "x@h" not in str(refused.value)


def test_a_password_in_the_url_moves_into_the_config_and_out_of_every_url():
    config = config_with(redis_url="redis://bob:Pa55%3Aw%2Frd%40x@h:1/0")
    moved, url = separate_url_password(config, config.transport.redis_url, "transport.redis_url")
    assert url == moved.transport.redis_url == "redis://bob@h:1/0"
    assert moved.transport.password == SECRET
    with pytest.raises(ConfigError, match=r"\$POLYDISTILL_REDIS_URL carries a Redis password, and "
                                          r"transport.password_env gives one too"):
        separate_url_password(config_with(password_env="X"), "redis://:x@h:1/0", "$POLYDISTILL_REDIS_URL")


def test_actors_get_a_password_given_in_the_config_through_a_file_only_this_user_reads():
    config = config_with(redis_url="redis://h:1/0", password=SECRET)
    with password_handoff(config) as for_actors:
        assert for_actors.transport.password is None and SECRET not in repr(for_actors.model_dump())
        handoff = Path(for_actors.transport.password_file)
        assert stat.S_IMODE(os.stat(handoff).st_mode) == 0o600
        assert with_redis_password(for_actors, {}).transport.password == SECRET
    assert not handoff.exists()
    plain = config_with(password_env="X")
    with password_handoff(plain) as for_actors:
        assert for_actors is plain  # each actor reads the variable where it runs
    with pytest.raises(ConfigError, match="actors on other nodes"):
        check_handoff_reaches(config, joins_a_cluster=True)
    check_handoff_reaches(config, joins_a_cluster=False)


def test_a_submission_shows_no_password(monkeypatch):
    """What `ray job list` and the dashboard show of a submitted job: entrypoint, runtime_env, metadata."""
    monkeypatch.setenv("POLYDISTILL_REDIS_PASSWORD", SECRET)  # the submitter's own, for status and stop
    request = submission_request(TINY, ["transport.password_env=TEAM_REDIS_PASSWORD", "training.epochs=1"],
                                 redis_url="redis://bob@redis.internal:6379/0", submission_id="tiny-1")
    shown = f"{request.entrypoint} {request.env_vars} {request.metadata}"
    assert SECRET not in shown and "training.epochs=1" in request.entrypoint
    assert request.metadata["polydistill_password_env"] == "TEAM_REDIS_PASSWORD"
    assert request.env_vars["POLYDISTILL_REDIS_URL"] == "redis://bob@redis.internal:6379/0"


URL_WITH_SECRET = f"redis://:{SECRET.replace('/', '%2F')}@h:1/0"


@pytest.mark.parametrize(("overrides", "redis_url", "named"), [
    ([f"transport.password={SECRET}"], None, "transport.password would reach the cluster"),
    ([f"transport.redis_url={URL_WITH_SECRET}"], None, "transport.redis_url carries a password"),
    ([], URL_WITH_SECRET, "runtime_env"),
], ids=["--set password", "password in transport.redis_url", "password in --redis-url"])
def test_submit_refuses_a_password_that_would_travel_with_the_job(overrides, redis_url, named):
    with pytest.raises(ConfigError) as refused:
        submission_request(TINY, overrides, redis_url=redis_url)
    message = str(refused.value)
    assert named in message and "POLYDISTILL_REDIS_PASSWORD" in message
    assert "transport.password_env" in message and "transport.password_file" in message
    assert SECRET.split(":")[0] not in message


def test_a_config_file_with_a_password_is_refused_too(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(TINY.read_text().replace("data:\n", f"transport:\n  password: '{SECRET}'\ndata:\n", 1))
    with pytest.raises(ConfigError, match="transport.password would reach the cluster"):
        refuse_secrets_in_submission(load_config(path), None)


def test_status_and_stop_reach_the_job_redis_as_its_acl_user_with_its_ca(tmp_path):
    """The ACL user and the CA travel in the job's metadata (never a password), so the job commands
    connect as the job does."""
    from types import SimpleNamespace

    from polydistill.cluster.jobs import job_ref

    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    request = submission_request(TINY, ["transport.password_env=TEAM_REDIS_PASSWORD", "transport.username=job_tiny",
                                        f"transport.tls_ca_file={ca}"],
                                 redis_url="rediss://redis.internal:6380/0", submission_id="tiny-2")
    ref = job_ref(SimpleNamespace(metadata=request.metadata), "tiny-2")
    assert (ref.username, ref.tls_ca_file, ref.password_env) == ("job_tiny", str(ca), "TEAM_REDIS_PASSWORD")
