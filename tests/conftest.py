"""Fixtures shared by every test tier."""

from __future__ import annotations

from typing import Iterator

import pytest
import redis

from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import connect


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedisServer]:
    """One private redis-server for the whole session, on a free port (never 6379)."""
    with PrivateRedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: PrivateRedisServer) -> Iterator[redis.Redis]:
    """A client on an empty database: every test starts from FLUSHDB."""
    client = connect(redis_server.url, socket_timeout=10)
    client.flushdb()
    yield client
    client.close()


# Native libraries loaded by the suite (Ray's core worker, gRPC, torch's thread pools) can crash
# while the interpreter tears itself down, after every test has run and the summary is printed;
# the exit status would then be a segfault's instead of pytest's. Ending the process ourselves,
# as the very last step, reports the suite's own result.
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS not in config.stash:
        return
    import os
    import sys

    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])
