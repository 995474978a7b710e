"""Redis Streams adapter: connection setup and the stream commands a job uses.

Only I/O lives here. What to do with a message (decode it, retry it, dead-letter
it, count a duplicate) is decided by the callers; this module moves opaque bytes
and never deserialises them, so nothing that arrives from Redis can run code.

Delivery model: each stream has consumer groups; a consumer reads with
XREADGROUP, and once it is done it acknowledges *and deletes* the entry
(XACK + XDEL), so the stream length is exactly "not yet delivered + delivered but
not yet acknowledged". A stream that several groups read (several students learning from one
teacher pass) is instead acknowledged per group and trimmed below the slowest group
(``ack_and_trim``). Entries of a consumer that died stay pending and are taken
over by another consumer with XAUTOCLAIM. Nothing is ever trimmed before every group has
acknowledged it, so backpressure blocks producers instead of dropping work.

Backpressure bounds each stream by messages and by bytes (``wait_for_room``); the bytes
are the stream's own memory in Redis (MEMORY USAGE), so they follow every way an entry
leaves a stream (acknowledged and deleted, trimmed below the slowest group, a group
destroyed, the stream reset) with no counter to keep in step.

Memory: a Redis at its ``maxmemory`` with ``noeviction`` (the private server's policy,
storage/redis_server.py) refuses writes instead of dropping data. A client from
``connect`` then waits and sends the refused write again, logging once that it waits,
until ``memory_wait_s`` has passed (``RedisFull``). Acknowledging and deleting are never
refused, so consumers keep freeing memory meanwhile.

Outages: a dropped connection is retried with jittered backoff until
``reconnect_timeout_s`` has passed, then ``RedisUnavailable`` names the (redacted)
URL and how long it waited. A Redis that comes back *empty* (restarted without
persistence) makes group reads fail with ``GroupMissing``; consumers then wait for
the driver to recreate the groups (``wait_for_group``) instead of recreating them
themselves, so that only the driver decides what the new streams hold.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError
from redis.retry import Retry

from polydistill.storage.keys import JobKeys

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"m"
# A dead letter keeps the first bytes of the payload it stands for, never the payload itself.
DEAD_LETTER_HEAD_FIELD = b"payload_head"
DEAD_LETTER_SIZE_FIELD = b"payload_bytes"
DEAD_LETTER_BATCH_FIELD = b"batch"  # "epoch batch_id samples"
DEFAULT_DEAD_LETTER_MAXLEN = 10_000
# Library defaults; jobs pass their transport section (connect_job, JobStreams).
DEFAULT_RECONNECT_TIMEOUT_S = 60.0  # transport.reconnect_timeout_s
DEFAULT_MEMORY_WAIT_S = 600.0  # transport.backpressure_timeout_s
DEFAULT_DEAD_LETTER_PAYLOAD_BYTES = 1024  # transport.dead_letter_payload_bytes
_UNLINK_BATCH = 500
_MEMORY_RETRY_FIRST_S = 0.05
_MEMORY_RETRY_MAX_S = 1.0

T = TypeVar("T")

Entry = tuple[str, bytes]  # (stream entry id, payload)


class BackpressureTimeout(TimeoutError):
    """A producer waited too long for consumers to drain a stream."""


class RedisUnavailable(redis.ConnectionError):
    """Redis stayed unreachable for longer than the reconnect budget; the message names the URL."""


class GroupMissing(RuntimeError):
    """A stream's consumer group is gone: Redis lost its data (or the job's streams were reset)."""


class RedisFull(OutOfMemoryError):
    """Redis refused a write for memory (maxmemory, noeviction) for longer than the client waits."""


@dataclass(frozen=True)
class Published:
    """Outcome of publish_and_ack.

    ``input_was_pending`` is False when the input entry had already been
    acknowledged, i.e. another consumer reclaimed and finished it first: the
    output just published is then a duplicate that readers must tolerate.
    """

    entry_id: str
    input_was_pending: bool


# --------------------------------------------------------------------------- #
# Connecting
# --------------------------------------------------------------------------- #


def connect(
    url: str,
    *,
    password: str | None = None,
    username: str | None = None,
    tls_ca_file: str | None = None,
    socket_timeout: float = 30,
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
    memory_wait_s: float = DEFAULT_MEMORY_WAIT_S,
) -> redis.Redis:
    """A client for ``redis://`` or ``rediss://`` (TLS) URLs, returning raw bytes.

    Dropped connections and timeouts are retried with jittered exponential
    backoff (capped at 4 s, so replicas do not reconnect in lock-step) until
    ``reconnect_timeout_s`` has passed; then ``RedisUnavailable`` says which
    (redacted) URL was unreachable and for how long. A rejected password fails at
    once. Because a retried write may have reached the server before the
    connection dropped, writes are at-least-once: readers must tolerate duplicates.

    A write that Redis refuses for memory (at ``maxmemory`` with ``noeviction``) is sent again
    until it goes through, for up to ``memory_wait_s`` (then ``RedisFull``): a refused command or
    transaction changed nothing, and of a plain pipeline only the refused commands are sent again.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"Redis URL {redact_url(url)!r} must start with redis:// or rediss:// (TLS) "
            "(transport.redis_url)"
        )
    if password is not None and (parts.password or "password" in dict(parse_qsl(parts.query))):
        raise ValueError(
            "the Redis password is given both in the URL and as an argument; give it in one place"
        )
    if username is not None and parts.username:
        raise ValueError(
            "the Redis user is given both in the URL and as transport.username; give it in one place"
        )
    if tls_ca_file is not None and parts.scheme != "rediss":
        raise ValueError(
            f"tls_ca_file is set but {redact_url(url)!r} is not a TLS URL; use rediss:// "
            "or drop the CA file"
        )
    if socket_timeout <= 0:
        raise ValueError(f"socket_timeout must be positive seconds, got {socket_timeout}")
    if reconnect_timeout_s <= 0:
        raise ValueError(f"reconnect_timeout_s must be positive seconds, got {reconnect_timeout_s}")
    if memory_wait_s <= 0:
        raise ValueError(f"memory_wait_s must be positive seconds, got {memory_wait_s}")

    options: dict[str, Any] = {
        "decode_responses": False,  # payloads are msgpack bytes, not text
        # RESP2 reply shapes are the same across redis-py 5..8; redis-py 8 would
        # otherwise negotiate RESP3, whose XREADGROUP replies are shaped differently.
        "protocol": 2,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, 10),
        "socket_keepalive": True,
        # PING a connection idle this long before reusing it, so a dead socket
        # (Redis restarted, NAT timeout) is found before a command is lost on it.
        "health_check_interval": 15,
        "retry": _RetryConnectionDrops(
            EqualJitterBackoff(cap=4.0, base=0.1), reconnect_timeout_s, redact_url(url)
        ),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if password is not None:
        options["password"] = password
    if username is not None:
        options["username"] = username
    if tls_ca_file is not None:
        options["ssl_ca_certs"] = tls_ca_file
    client = _WaitsForMemory.from_url(url, **options)
    client.memory_wait = _MemoryWait(memory_wait_s, redact_url(url))
    return client


def connect_job(url: str, transport: Any) -> redis.Redis:
    """A client with every connection setting of a job's ``transport`` config section."""
    return connect(
        url,
        password=transport.password,
        username=transport.username,
        tls_ca_file=transport.tls_ca_file,
        reconnect_timeout_s=transport.reconnect_timeout_s,
        memory_wait_s=transport.backpressure_timeout_s,
    )


class _MemoryWait:
    """Sends a write again while Redis refuses it for memory, with a growing pause, for a bounded time.

    A refused write changed nothing, so sending it again is safe; the consumers free memory
    meanwhile (acknowledging and deleting are never refused), and the producer goes on once they
    have. One warning when the wait begins and one line when it ends keep the log readable.
    """

    def __init__(self, timeout_s: float, where: str) -> None:
        self.timeout_s = timeout_s
        self.where = where

    def run(self, attempt: Callable[[], T], what: str) -> T:
        started = None
        pause = _MEMORY_RETRY_FIRST_S
        while True:
            try:
                result = attempt()
            except OutOfMemoryError as refused:
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning(
                        "Redis at %s is at its memory limit (maxmemory, noeviction) and refused a write (%s): "
                        "waiting for consumers to free memory, for up to %g s (transport.backpressure_timeout_s)",
                        self.where, what, self.timeout_s)
                waited = now - started
                if waited >= self.timeout_s:
                    raise RedisFull(
                        f"Redis at {self.where} refused writes ({what}) for memory for {waited:.1f} s "
                        f"(transport.backpressure_timeout_s={self.timeout_s:g}): its consumers are not freeing "
                        "any. Check that they run; give Redis more memory (its maxmemory; for the private server "
                        "transport.private_redis_maxmemory), or lower transport.max_work_backlog_bytes and "
                        "max_knowledge_backlog_bytes so that the streams stay well below it"
                    ) from refused
                time.sleep(min(pause, self.timeout_s - waited))
                pause = min(2 * pause, _MEMORY_RETRY_MAX_S)
                continue
            if started is not None:
                log.warning("Redis at %s accepted the write (%s) after %.1f s at its memory limit",
                            self.where, what, time.monotonic() - started)
            return result


class _WaitsForMemory(redis.Redis):
    """A client whose writes wait out a Redis at its memory limit (``_MemoryWait``)."""

    memory_wait: _MemoryWait

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self.memory_wait.run(lambda: super(_WaitsForMemory, self).execute_command(*args, **options),
                                    _command_name(args))

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipeline = _MemoryWaitingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipeline.memory_wait = self.memory_wait
        return pipeline

    def refusing_when_full(self) -> redis.Redis:
        """A client on the same connections whose writes fail at once when Redis is full, for writes
        that must not hold their caller up (dead letters, kept only for inspection)."""
        return redis.Redis(connection_pool=self.connection_pool)


class _MemoryWaitingPipeline(Pipeline):
    """A pipeline that sends again what Redis refused for memory: a whole transaction (a refused one
    changed nothing), or of a plain pipeline only the refused commands (the others went through)."""

    memory_wait: _MemoryWait

    def execute(self, raise_on_error: bool = True) -> list:
        commands = list(self.command_stack)
        if self.watching or not commands:  # a WATCH cannot be replayed: its caller retries
            return super().execute(raise_on_error)
        what = ", ".join(dict.fromkeys(_command_name(args) for args, _ in commands))
        if self.transaction or self.explicit_transaction:
            def run_transaction() -> list:
                self.command_stack = list(commands)  # execute() leaves the stack empty, refused or not
                return super(_MemoryWaitingPipeline, self).execute(raise_on_error)

            return self.memory_wait.run(run_transaction, f"MULTI {what}")
        replies: list = [None] * len(commands)
        unsent = list(range(len(commands)))

        def run_refused() -> list:
            nonlocal unsent
            self.command_stack = [commands[index] for index in unsent]
            answers = super(_MemoryWaitingPipeline, self).execute(raise_on_error=False)
            refused = [index for index, answer in zip(unsent, answers) if isinstance(answer, OutOfMemoryError)]
            for index, answer in zip(unsent, answers):
                replies[index] = answer
            unsent = refused
            if refused:
                raise replies[refused[0]]
            return replies

        self.memory_wait.run(run_refused, what)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies


def _command_name(args: Sequence[Any]) -> str:
    name = args[0] if args else "?"
    return (name.decode() if isinstance(name, bytes) else str(name)).upper()


def without_memory_wait(client: redis.Redis) -> redis.Redis:
    """``client``, or for a client from ``connect`` one on its connections that does not wait for memory."""
    return client.refusing_when_full() if isinstance(client, _WaitsForMemory) else client


class _RetryConnectionDrops(Retry):
    """Retry dropped connections and timeouts for a bounded time, but not a rejected password.

    The budget is time, not a number of attempts: redis-py nests retries (a command's
    retry wraps a connect that has its own), and a deadline bounds the total wait
    however deep the nesting, where attempt counts would multiply. redis-py makes
    AuthenticationError a subclass of ConnectionError, so a plain Retry would spend
    its whole budget before reporting a wrong password.
    """

    def __init__(self, backoff: Any, timeout_s: float, where: str) -> None:
        super().__init__(backoff, retries=-1)
        self.timeout_s = timeout_s
        self.where = where

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        self._backoff.reset()
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError, RedisUnavailable):
                raise  # a wrong password, or an inner retry that already spent the budget
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                waited = time.monotonic() - started
                if waited >= self.timeout_s:
                    raise RedisUnavailable(
                        f"Redis at {self.where} was unreachable for {waited:.1f} s ({failures} attempts; "
                        f"transport.reconnect_timeout_s={self.timeout_s:g}); last error: {error}. Check that "
                        "the server runs and is reachable from this node, or raise "
                        "transport.reconnect_timeout_s to ride out longer outages"
                    ) from error
                time.sleep(min(self._backoff.compute(failures), self.timeout_s - waited))


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# --------------------------------------------------------------------------- #
# Stream commands for one job
# --------------------------------------------------------------------------- #


def parse_entry_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ("1700000000000-3") as a pair that orders like Redis orders ids."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw_entries: Iterable[Any]) -> list[tuple[str, dict | None]]:
    """(id, fields) pairs; fields is None or {} when the entry was deleted."""
    return [(_text(entry_id), fields) for entry_id, fields in raw_entries if entry_id is not None]


def _xreadgroup_entries(reply: Any) -> list[tuple[str, dict | None]]:
    """Entries of the single stream read, from either RESP2 or RESP3 reply shape."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [[entries...]]}
        (entries,) = reply.values()
        if entries and isinstance(entries[0], list):
            (entries,) = entries
    else:  # RESP2: [[stream, [entries...]]]
        ((_, entries),) = reply
    return _entries(entries)


def _group_errors(stream: str, group: str) -> Any:
    """Turns Redis' NOGROUP reply into GroupMissing, which callers handle (wait for the driver); so too
    UNBLOCKED, the reply of a read that was waiting on the stream when it was deleted."""
    return _GroupErrors(stream, group)


class _GroupErrors:
    def __init__(self, stream: str, group: str) -> None:
        self.stream, self.group = stream, group

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if isinstance(error, redis.ResponseError) and str(error).startswith(("NOGROUP", "UNBLOCKED")):
            raise GroupMissing(
                f"consumer group {self.group!r} of stream {self.stream} does not exist (Redis lost its data, "
                "or the job's streams were reset)"
            ) from error
        return False


def _payload(fields: dict) -> bytes:
    # An entry without our field was written by someone else; hand back empty
    # bytes so the caller's decode fails and the entry is dead-lettered.
    return fields.get(PAYLOAD_FIELD, b"")


# XACK and XDEL in one atomic step. No shebang flags, so that Redis before 7 runs it too: Redis runs such
# a script at its memory limit and refuses only the commands in it that may grow memory, which these two
# never do.
_ACK_AND_DELETE = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return acked
"""


# XCLAIM ... JUSTID of one pending entry, only while this consumer still owns it: a heartbeat that resets
# the entry's idle time without counting a delivery, and that never takes back an entry another consumer
# has reclaimed meanwhile. Returns 1 when the claim was renewed.
_RENEW_CLAIM = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class DeadLetterRecord:
    """One record of the dead-letter stream, as ``read_dead_letters`` returns it: why, and the batch it
    held when the message was read far enough to tell ((epoch, batch id) and its samples; else None)."""

    reason: str
    source_stream: str
    batch: tuple[int, int] | None
    samples: int


class JobStreams:
    """The stream operations of one job, on top of a client from ``connect``."""

    def __init__(
        self,
        client: redis.Redis,
        keys: JobKeys,
        *,
        dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN,
        dead_letter_payload_bytes: int = DEFAULT_DEAD_LETTER_PAYLOAD_BYTES,
    ) -> None:
        if dead_letter_payload_bytes < 0:
            raise ValueError(f"dead_letter_payload_bytes must be 0 or more, got {dead_letter_payload_bytes} "
                             "(transport.dead_letter_payload_bytes)")
        self.client = client
        self.keys = keys
        self.dead_letter_maxlen = dead_letter_maxlen
        self.dead_letter_payload_bytes = dead_letter_payload_bytes
        self._ack_and_delete_script = client.register_script(_ACK_AND_DELETE)
        self._renew_claim_script = client.register_script(_RENEW_CLAIM)

    @classmethod
    def of_job(cls, client: redis.Redis, keys: JobKeys, transport: Any) -> "JobStreams":
        """The streams of a job with the settings of its ``transport`` config section."""
        return cls(client, keys, dead_letter_payload_bytes=transport.dead_letter_payload_bytes)

    # -- groups and sizes --------------------------------------------------- #

    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and the stream) if missing.

        Starting at id 0 lets a group created after the producer started still
        see every entry already in the stream.
        """
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def backlog(self, stream: str) -> int:
        """Entries still in the stream: undelivered plus delivered-but-unacknowledged."""
        return int(self.client.xlen(stream))

    def backlog_bytes(self, stream: str) -> int:
        """The stream's memory in Redis: its entries' payloads and their framing, and its groups' pending lists.

        MEMORY USAGE with SAMPLES 0 walks every node of the stream, a few per hundred small entries
        and one per large one, so it is cheap at the sizes backpressure allows.
        """
        return int(self.client.memory_usage(stream, samples=0) or 0)

    def backlog_size(self, stream: str) -> tuple[int, int]:
        """(entries, bytes) of ``backlog`` and ``backlog_bytes`` in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.memory_usage(stream, samples=0)
        entries, size = pipe.execute()
        return int(entries), int(size or 0)

    def wait_for_room(
        self,
        stream: str,
        max_backlog: int,
        *,
        max_bytes: int | None = None,
        timeout_s: float,
        poll_s: float = 0.05,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Block while the backlog is at or above ``max_backlog`` entries or ``max_bytes`` bytes
        (``backlog_bytes``; None: no byte limit).

        Returns True when there is room, False if ``should_stop()`` turned true
        while waiting. Raises BackpressureTimeout after ``timeout_s``.
        """
        entries_setting, bytes_setting = self._backlog_settings(stream)
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be at least 1, got {max_backlog} ({entries_setting})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes} ({bytes_setting})")
        deadline = time.monotonic() + timeout_s
        while True:
            if max_bytes is None:
                backlog, size = self.backlog(stream), None
            else:
                backlog, size = self.backlog_size(stream)
            if backlog < max_backlog and (size is None or size < max_bytes):
                return True
            if should_stop is not None and should_stop():
                return False
            if time.monotonic() >= deadline:
                full = (f"{backlog} entries, at or above {entries_setting}={max_backlog}" if backlog >= max_backlog
                        else f"{size:,} bytes, at or above {bytes_setting}={max_bytes}")
                raise BackpressureTimeout(
                    f"stream {stream} still holds {full} after {timeout_s:g} s: its consumers are not "
                    f"acknowledging. Check that they are running, or raise {entries_setting} and "
                    f"{bytes_setting} if they are just slow"
                )
            time.sleep(poll_s)

    def _backlog_settings(self, stream: str) -> tuple[str, str]:
        """The settings that bound ``stream``, for messages that say what to change."""
        kind = "work" if self.keys.carries_work(stream) else "knowledge"
        return f"transport.max_{kind}_backlog", f"transport.max_{kind}_backlog_bytes"

    # -- writing ------------------------------------------------------------ #

    def add(self, stream: str, payload: bytes, *, pipeline: Pipeline | None = None) -> str | None:
        """Append one message; returns its entry id (None when queued on a pipeline)."""
        target = pipeline if pipeline is not None else self.client
        entry_id = target.xadd(stream, {PAYLOAD_FIELD: payload})
        return None if pipeline is not None else _text(entry_id)

    def ack_and_delete(
        self, stream: str, group: str, entry_ids: Sequence[str], *, pipeline: Pipeline | None = None
    ) -> int | None:
        """Acknowledge and delete entries; returns how many were still pending.

        Deleting keeps XLEN equal to the backlog. It also removes the entry for
        every other group on the stream, so use it only on streams that a single
        group reads. On its own (no pipeline) the two commands run as one script, not
        a MULTI/EXEC: a Redis at its memory limit refuses every transaction, but
        never this, which is how consumers free memory.
        """
        if not entry_ids:
            return 0 if pipeline is None else None
        if pipeline is not None:
            pipeline.xack(stream, group, *entry_ids)
            pipeline.xdel(stream, *entry_ids)
            return None
        return int(self._ack_and_delete_script(keys=[stream], args=[group, *entry_ids]))

    def ack_and_trim(self, stream: str, group: str, entry_ids: Sequence[str]) -> int:
        """Acknowledge entries of a stream that several groups read; returns how many were pending.

        The entry stays for the other groups; ``trim_consumed`` then drops what every group has
        acknowledged, so that XLEN stays "not yet acknowledged by the slowest group" and the
        producer's backpressure waits for the slowest reader.
        """
        if not entry_ids:
            return 0
        acked = int(self.client.xack(stream, group, *entry_ids))
        self.trim_consumed(stream)
        return acked

    def trim_consumed(self, stream: str) -> int:
        """Delete the entries that every consumer group of ``stream`` has read and acknowledged.

        Each group's floor is its oldest pending entry, or just past its last delivered entry when it
        has none pending; everything below the lowest floor is done for all. State read a moment ago
        can only be older (floors only rise), so a stale reading trims less, never too much.
        """
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:  # no such key: nothing to trim
            return 0
        if not groups:
            return 0
        floors = []
        for info in groups:
            name = _text(info["name"])
            oldest_pending = self.client.xpending(stream, name)["min"] if int(info["pending"]) else None
            if oldest_pending is not None:
                floors.append(parse_entry_id(oldest_pending))
            else:  # none pending (or all acknowledged since the XINFO): done up to its last delivery
                ms, seq = parse_entry_id(info["last-delivered-id"])
                floors.append((ms, seq + 1))
        ms, seq = min(floors)
        if (ms, seq) <= (0, 0):
            return 0
        return int(self.client.xtrim(stream, minid=f"{ms}-{seq}", approximate=False))

    def publish_and_ack(
        self,
        out_stream: str,
        payload: bytes,
        in_stream: str,
        group: str,
        entry_id: str,
        *,
        pipeline: Pipeline | None = None,
    ) -> Published | None:
        """Publish a result and acknowledge its input in one MULTI/EXEC.

        A teacher that dies between the two steps would otherwise either lose the
        batch (acked, not published) or publish it twice (published, not acked,
        reclaimed). Pass a transactional pipeline to add more commands (counters)
        to the same transaction; the result is then None.
        """
        transaction = pipeline if pipeline is not None else self.client.pipeline(transaction=True)
        transaction.xadd(out_stream, {PAYLOAD_FIELD: payload})
        transaction.xack(in_stream, group, entry_id)
        transaction.xdel(in_stream, entry_id)
        if pipeline is not None:
            return None
        new_id, acked, _deleted = transaction.execute()
        return Published(entry_id=_text(new_id), input_was_pending=bool(acked))

    def dead_letter(
        self,
        entry_id: str,
        payload: bytes,
        reason: str,
        source_stream: str,
        *,
        batch: tuple[int, int, int] | None = None,
        pipeline: Pipeline | None = None,
    ) -> str | None:
        """Record a message that could not be used: why, where it came from, its size and its first
        ``dead_letter_payload_bytes`` bytes (enough to tell what it was, never the payload itself).
        ``batch``: (epoch, batch id, samples) of the batch it carried, when it decoded far enough to tell:
        what the driver counts as dead-lettered rather than lost.

        The caller still acknowledges the original entry (same pipeline, ideally).
        The dead-letter stream has no consumers, so it is capped (approximately,
        which is cheap) at ``dead_letter_maxlen`` to survive a peer that sends
        nothing but garbage. Without a pipeline the record is for inspection only
        and must not hold its caller up: when Redis is full it is not kept (an error
        says so, with the same facts) and None is returned.
        """
        fields = {
            b"reason": reason.encode(),
            b"source_stream": source_stream.encode(),
            b"source_id": _text(entry_id).encode(),
            DEAD_LETTER_SIZE_FIELD: str(len(payload)).encode(),
            DEAD_LETTER_HEAD_FIELD: bytes(payload[: self.dead_letter_payload_bytes]),
        }
        if batch is not None:
            fields[DEAD_LETTER_BATCH_FIELD] = " ".join(str(int(number)) for number in batch).encode()
        if pipeline is not None:
            pipeline.xadd(self.keys.dead_letter_stream, fields, maxlen=self.dead_letter_maxlen, approximate=True)
            return None
        try:
            new_id = without_memory_wait(self.client).xadd(
                self.keys.dead_letter_stream, fields, maxlen=self.dead_letter_maxlen, approximate=True)
        except OutOfMemoryError:
            log.error("Redis is full: the dead letter of entry %s of %s (%d bytes: %s) is not kept",
                      _text(entry_id), source_stream, len(payload), reason)
            return None
        return _text(new_id)

    def delete_job_keys(self) -> int:
        """Remove every key of this job (and no other job's); returns how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=self.keys.pattern, count=_UNLINK_BATCH):
            batch.append(key)
            if len(batch) >= _UNLINK_BATCH:
                deleted += int(self.client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(self.client.unlink(*batch))
        return deleted

    # -- reading ------------------------------------------------------------ #

    def read(self, stream: str, group: str, consumer: str, *, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer; waits up to ``block_ms`` (0 = do not wait)."""
        self._check_block_fits_socket_timeout(block_ms)
        with _group_errors(stream, group):
            reply = self.client.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=block_ms if block_ms > 0 else None
            )
        return [(entry_id, _payload(fields or {})) for entry_id, fields in _xreadgroup_entries(reply)]

    def read_pending(self, stream: str, group: str, consumer: str, count: int) -> list[Entry]:
        """Entries delivered to this consumer but not acknowledged (e.g. before a restart).

        They are returned again on every call until acknowledged. An entry
        deleted from the stream while still pending has no payload left to
        process, so it is acknowledged here and skipped.
        """
        with _group_errors(stream, group):
            reply = self.client.xreadgroup(group, consumer, {stream: "0"}, count=count)
        entries: list[Entry] = []
        gone: list[str] = []
        for entry_id, fields in _xreadgroup_entries(reply):
            if fields:
                entries.append((entry_id, _payload(fields)))
            else:
                gone.append(entry_id)
        if gone:
            self.client.xack(stream, group, *gone)
        return entries

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over up to ``count`` entries that other consumers left pending for ``min_idle_ms``.

        Redis 7 drops deleted entries from the pending list itself during
        XAUTOCLAIM; older servers report them with no fields, which are skipped.
        """
        claimed: list[Entry] = []
        cursor = "0-0"
        while len(claimed) < count:
            with _group_errors(stream, group):
                reply = self.client.xautoclaim(
                    stream, group, consumer, min_idle_ms, start_id=cursor, count=count - len(claimed)
                )
            cursor, raw_entries = _text(reply[0]), reply[1]
            claimed.extend(
                (entry_id, _payload(fields)) for entry_id, fields in _entries(raw_entries) if fields
            )
            if cursor == "0-0":  # scanned the whole pending list
                break
        return claimed

    def delivery_counts(self, stream: str, group: str, entry_ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry has been delivered (XPENDING); absent when not pending."""
        if not entry_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        with _group_errors(stream, group):
            replies = pipe.execute()
        counts: dict[str, int] = {}
        for reply in replies:
            for info in reply:
                counts[_text(info["message_id"])] = int(info["times_delivered"])
        return counts

    def claim_again(self, stream: str, group: str, consumer: str, entry_id: str) -> bytes | None:
        """Deliver this consumer's own pending entry to it once more (XCLAIM, which counts a delivery):
        a retry. None when the entry is no longer pending or its payload is gone."""
        with _group_errors(stream, group):
            reply = self.client.xclaim(stream, group, consumer, 0, [entry_id])
        for _entry_id, fields in _entries(reply):
            if fields:
                return _payload(fields)
        return None

    def renew_claim(self, stream: str, group: str, consumer: str, entry_id: str) -> bool:
        """Reset the idle time of an entry this consumer is working on, without counting a delivery, so
        that XAUTOCLAIM (``reclaim``) leaves it alone; False when the consumer no longer owns it."""
        return bool(self._renew_claim_script(keys=[stream], args=[group, consumer, _text(entry_id)]))

    def keep_claimed(self, stream: str, group: str, consumer: str, entry_id: str, every_s: float) -> "ClaimKeeper":
        """A context in which a background thread renews this consumer's claim on ``entry_id`` every
        ``every_s`` seconds: a batch that computes longer than ``transport.reclaim_idle_ms`` stays with the
        consumer that is working on it, and only one that stopped working loses its batch."""
        return ClaimKeeper(lambda: self.renew_claim(stream, group, consumer, entry_id), every_s)

    def read_dead_letters(self) -> list[DeadLetterRecord]:
        """Every record of the job's dead-letter stream (capped at ``dead_letter_maxlen``)."""
        records = []
        for _entry_id, fields in _entries(self.client.xrange(self.keys.dead_letter_stream)):
            batch, samples = None, 0
            if fields.get(DEAD_LETTER_BATCH_FIELD):
                epoch, batch_id, samples = (int(part) for part in fields[DEAD_LETTER_BATCH_FIELD].split())
                batch = (epoch, batch_id)
            records.append(DeadLetterRecord(_text(fields.get(b"reason", b"")), _text(fields.get(b"source_stream", b"")),
                                            batch, samples))
        return records

    def has_group(self, stream: str, group: str) -> bool:
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:  # no such key
            return False
        return any(_text(info.get("name", info.get(b"name", b""))) == group for info in groups)

    def wait_for_group(
        self,
        stream: str,
        group: str,
        *,
        timeout_s: float,
        poll_s: float = 0.2,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Wait until the driver has recreated a group that vanished (see ``GroupMissing``).

        Returns True once it exists, False if ``should_stop()`` turned true first;
        raises GroupMissing after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.has_group(stream, group):
            if should_stop is not None and should_stop():
                return False
            if time.monotonic() >= deadline:
                raise GroupMissing(
                    f"consumer group {group!r} of stream {stream} was still missing after {timeout_s:g} s: "
                    "Redis lost its data and nothing recreated the job's streams. Is the driver still "
                    "running? (it recreates them and re-enqueues every batch the student has not applied)"
                )
            time.sleep(poll_s)
        return True

    def reset(self, groups: Sequence[tuple[str, str]], *, pipeline: Pipeline | None = None) -> None:
        """Empty the given streams and recreate their (stream, group) pairs in one MULTI/EXEC.

        Consumers never see a stream without its group, and an XACK of an entry of
        the old stream is a no-op on the new one. Pass a transactional pipeline to
        add commands (the control fields of the new run) to the same transaction.
        """
        transaction = pipeline if pipeline is not None else self.client.pipeline(transaction=True)
        for stream in dict.fromkeys(stream for stream, _ in groups):
            transaction.delete(stream)
        for stream, group in groups:
            transaction.xgroup_create(stream, group, id="0", mkstream=True)
        if pipeline is None:
            transaction.execute()

    def _check_block_fits_socket_timeout(self, block_ms: int) -> None:
        # A blocking read that outlasts the socket timeout fails as a timeout.
        socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        if block_ms > 0 and socket_timeout and block_ms / 1000 >= socket_timeout:
            raise ValueError(
                f"block_ms={block_ms} must be shorter than the client's socket_timeout "
                f"({socket_timeout} s); lower block_ms or connect with a larger socket_timeout"
            )


class ClaimKeeper:
    """Renews a claim every ``every_s`` seconds on a daemon thread while the ``with`` block runs (see
    ``JobStreams.keep_claimed``). A renewal that fails (Redis briefly away) is logged and tried again at
    the next tick: the worst outcome is the reclaim this prevents."""

    def __init__(self, renew: Callable[[], bool], every_s: float) -> None:
        if every_s <= 0:
            raise ValueError(f"a claim is renewed every positive interval, not {every_s} s")
        self._renew, self._every_s = renew, every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-keeper", daemon=True)
        self.renewals = 0

    def __enter__(self) -> "ClaimKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            try:
                if not self._renew():
                    return  # acknowledged, or taken over: nothing of ours to keep
                self.renewals += 1
            except redis.RedisError as exc:
                log.warning("could not renew a claim (%s); trying again in %g s", exc, self._every_s)
