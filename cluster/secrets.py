"""Keeping the Redis password out of everything a user or operator can see.

Each process of a job reads the password where it runs (``config.with_redis_password``): from
the variable ``transport.password_env`` names, the file ``transport.password_file``, or
$POLYDISTILL_REDIS_PASSWORD. What travels between processes (Ray actor arguments, a submitted
job's entrypoint, runtime_env and metadata) and what is written down (job.yaml, the report, the
``validate`` output, logs) never holds it:

- ``validate`` prints ``redacted`` configs;
- ``submit`` refuses a password that would travel with the job (``refuse_secrets_in_submission``);
- the driver moves a password found in the Redis URL into the config (``separate_url_password``)
  and hands its actors a config without it (``password_handoff``). A password given in the config
  or the URL of a local run reaches them through a file only this user can read, for the run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from polydistill.cluster.config import ConfigError, JobConfig, url_carries_password
from polydistill.storage.streams import redact_url

REDACTED = "***"

HOW_TO_GIVE_THE_PASSWORD = (
    "export POLYDISTILL_REDIS_PASSWORD where the job runs (on every node), or name another variable with "
    "transport.password_env, or set transport.password_file to a path readable on every node"
)


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


def _url_password(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.password is not None:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password")


def separate_url_password(config: JobConfig, url: str, url_setting: str) -> tuple[JobConfig, str]:
    """(config, url) with a password found in ``url`` moved into ``transport.password`` and out of
    ``transport.redis_url`` as well: the URL can then be logged and handed to actors.

    ``url_setting`` names where the URL came from, for the error when the config gives a password too."""
    if not url_carries_password(url):
        return config, url
    transport = config.transport
    others = [name for name in ("password", "password_env", "password_file") if getattr(transport, name) is not None]
    if others:
        raise ConfigError(f"{url_setting} carries a Redis password, and transport.{others[0]} gives one too: "
                          "give it in one place")
    transport = transport.model_copy(update={"password": _url_password(url),
                                             "redis_url": without_password(transport.redis_url)})
    return config.model_copy(update={"transport": transport}), without_password(url)


@contextmanager
def password_handoff(config: JobConfig) -> Iterator[JobConfig]:
    """The config to give the job's actors: without ``transport.password``.

    A password read from a variable or a file is read again by each actor where it runs. One given in
    the config itself (or moved there from the URL) exists only in this process: it is written, for
    the block, to a file only this user can read, which the actors' config names as
    ``transport.password_file``; that reaches actors on this machine only (``check_handoff_reaches``)."""
    password = config.transport.password
    if password is None:
        yield config
        return
    descriptor, path = tempfile.mkstemp(prefix="polydistill-redis-")  # mode 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(password)
        transport = config.transport.model_copy(update={"password": None, "password_file": path})
        yield config.model_copy(update={"transport": transport})
    finally:
        os.unlink(path)


def check_handoff_reaches(config: JobConfig, joins_a_cluster: bool) -> None:
    """A password given in the config reaches the actors through a file on this machine
    (``password_handoff``); actors on other nodes of a cluster would not find it."""
    if joins_a_cluster and config.transport.password is not None:
        raise ConfigError("the Redis password is given in the config (transport.password, or inside the Redis URL), "
                          "which actors on other nodes of the Ray cluster cannot read: " + HOW_TO_GIVE_THE_PASSWORD)


def redacted(config: JobConfig) -> dict:
    """The config as JSON-ready data, with the Redis password and any password in the URL shown as ***."""
    data = config.model_dump(mode="json")
    transport = data["transport"]
    if transport.get("password") is not None:
        transport["password"] = REDACTED
    if transport.get("redis_url") is not None:
        transport["redis_url"] = redact_url(transport["redis_url"])
    return data


def refuse_secrets_in_submission(config: JobConfig, redis_url: str | None) -> None:
    """``polydistill submit`` sends the job's entrypoint (with every --set), its runtime_env and the
    uploaded config folder to the cluster, where anyone who can list jobs can read them: none may
    carry the Redis password."""
    where = "the job's entrypoint (--set) or its uploaded config"
    if config.transport.password is not None:
        problem = f"transport.password would reach the cluster in {where}"
    elif config.transport.redis_url is not None and url_carries_password(config.transport.redis_url):
        problem = f"transport.redis_url carries a password, which would reach the cluster in {where}"
    elif redis_url and url_carries_password(redis_url):
        problem = ("the Redis URL (--redis-url or $POLYDISTILL_REDIS_URL) carries a password, which would reach "
                   "the cluster in the job's runtime_env, shown by the dashboard")
    else:
        return
    raise ConfigError(f"{problem}: leave the password out, and {HOW_TO_GIVE_THE_PASSWORD}")
