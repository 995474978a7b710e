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
