"""Which run owns a job's Redis keys: a token on the job's owner key, held with a lease.

Job ids are names (by default the output folder's basename), so two runs on one shared Redis can
pick the same one; without an owner, the second run's start would delete the first one's streams.
A run takes the job when it starts (``JobOwnership.claim``: SET NX with a lease); a second run
with the same id is refused (``JobInUse``) while the lease lasts. The owner renews the lease while
it runs (``JobOwnership.renewed``); a run that crashed stops renewing, and once its lease has run
out the next run with the same id takes the job over.

Every deletion of the job's keys checks the token inside the script that deletes them, so a run
that lost the job (its lease ran out while it was paused, and another run took over) deletes
nothing of its successor's. The owner key lives under the job's prefix like every other key, so a
Redis user confined to that prefix by an ACL can take and keep it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from polydistill.storage.keys import JobKeys

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a crashed run's job can be taken over this long after its last renewal
RENEW_EVERY_S = 5.0  # several renewals fit in a lease, so a slow or retried one does not lose it
_SCAN_BATCH = 500
NOBODY = ""  # the token of a caller that owns no job: it may delete only keys that nobody owns

# KEYS[1]: the owner key, KEYS[2..]: keys to delete; ARGV[1]: the caller's token (NOBODY: only while
# nobody owns the job), ARGV[2]: its lease in ms. An owner key that is gone (Redis came back without
# its data, or the lease ran out unrenewed) is taken again, as a renewal would. Returns how many keys
# went, or -1 when the job is another run's.
_DELETE_IF_OWNER = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
elseif owner ~= ARGV[1] then
  return -1
end
if #KEYS < 2 then return 0 end
return redis.call('UNLINK', unpack(KEYS, 2))
"""

# Renews the caller's lease, or takes the job again when the owner key is gone (Redis came back
# without its data, or every renewal failed for a whole lease and nobody took the job over).
# Returns 1 when the job is the caller's, 0 when another run holds it.
_RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobInUse(RuntimeError):
    """Another run holds the job id; the message names the job and what to change."""

    def __init__(self, job_id: str, holder: str, lease_left_s: float | None):
        ends = f"; its lease ends in {lease_left_s:.0f} s if it has stopped" if lease_left_s is not None else ""
        super().__init__(
            f"job {job_id!r} is in use by another run on the same Redis ({holder}{ends}): set job_id, or use "
            "another output folder (the default job_id is its name)"
        )
        self.job_id = job_id
        self.holder = holder
        self.lease_left_s = lease_left_s


class OwnershipLost(RuntimeError):
    """Another run took the job over (this run's lease ran out): its keys are no longer this run's."""


def run_token() -> str:
    """A token naming this run: who holds a job is then readable in the refusal of the next."""
    return f"pid {os.getpid()} on {socket.gethostname()}, run {secrets.token_hex(8)}"


def delete_job_keys(client: redis.Redis, keys: JobKeys, token: str = NOBODY, lease_s: float = LEASE_S) -> int:
    """Removes the job's keys, all but its owner key, while the job is ``token``'s; returns how many.

    Each batch checks the owner in the script that deletes it, so a run that took the job over
    between two batches loses none of its keys. Raises ``OwnershipLost`` when the job is not ``token``'s."""
    delete = client.register_script(_DELETE_IF_OWNER)
    owner_key = keys.owner.encode()
    deleted = 0
    batch: list[bytes] = []

    def flush() -> None:
        nonlocal deleted
        gone = int(delete(keys=[owner_key, *batch], args=[token, int(lease_s * 1000)]))
        if gone < 0:
            raise OwnershipLost(f"job {keys.job_id!r} belongs to another run now: its keys are left to it")
        deleted += gone
        batch.clear()

    for key in client.scan_iter(match=keys.pattern, count=_SCAN_BATCH):
        if key != owner_key:
            batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            flush()
    flush()  # also with nothing to delete: says whether the job is still the caller's
    return deleted


@dataclass
class JobOwnership:
    """This run's hold on a job's keys (``claim``), released by ``end``."""

    client: redis.Redis
    keys: JobKeys
    token: str
    lease_s: float = LEASE_S

    @classmethod
    def claim(cls, client: redis.Redis, keys: JobKeys, lease_s: float = LEASE_S) -> "JobOwnership":
        """Takes the job, or raises ``JobInUse`` while another run's lease lasts."""
        token = run_token()
        if not client.set(keys.owner, token, nx=True, px=int(lease_s * 1000)):
            holder, left_ms = client.get(keys.owner), client.pttl(keys.owner)
            if holder is None:  # its lease ran out between the two commands: take the job now
                return cls.claim(client, keys, lease_s)
            raise JobInUse(keys.job_id, holder.decode(errors="replace"), left_ms / 1000 if left_ms >= 0 else None)
        return cls(client, keys, token, lease_s)

    def renew(self, client: redis.Redis | None = None) -> bool:
        """Extends the lease (on ``client``, default: the claim's); False when another run holds the job now."""
        renew = (client or self.client).register_script(_RENEW)
        return bool(renew(keys=[self.keys.owner], args=[self.token, int(self.lease_s * 1000)]))

    def delete_job_keys(self) -> int:
        """Removes the job's keys while the job is this run's (``OwnershipLost`` otherwise)."""
        return delete_job_keys(self.client, self.keys, self.token, self.lease_s)

    @contextmanager
    def renewed(self, client: redis.Redis | None = None, every_s: float = RENEW_EVERY_S) -> Iterator[None]:
        """Renews the lease from a thread while the block runs, on ``client`` (default: the claim's)."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(every_s):
                try:
                    if not self.renew(client):
                        log.error("job %s: another run took the job over; this run will not remove its keys",
                                  self.keys.job_id)
                        return
                except redis.RedisError as exc:  # an outage: the next renewal, or the lease, decides
                    log.warning("job %s: could not renew the hold on its keys (%s)", self.keys.job_id, exc)

        keeper = threading.Thread(target=keep, name=f"lease {self.keys.job_id}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()  # no renewal may take the job again once it is given up

    def end(self) -> None:
        """Removes the job's keys and gives the job up, if it is still this run's. A Redis error is
        logged, not raised: it must not hide how the job ended."""
        try:
            self.delete_job_keys()
            self.client.register_script(_RELEASE)(keys=[self.keys.owner], args=[self.token])
        except OwnershipLost as lost:
            log.warning("%s", lost)
        except redis.RedisError as exc:
            log.warning("job %s: could not remove its keys (%s); the next run of this job id removes them",
                        self.keys.job_id, exc)
