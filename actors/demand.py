"""The cluster-wide resource request, shared by every job's teacher pools through Ray's KV store.

Each pool keeps its own demand under a key of its own (job, namespace and teacher) with a lease;
whenever it changes or renews its demand, it reads every live pool's and sends their sum to the
autoscaler (``standing_request``, a pure function in ``cluster/autoscaling.py``). A pool that
ends deletes its key and sends the sum without it; a pool that dies stops renewing, and the next
pool to send leaves it out once its lease has expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack

from polydistill.cluster.autoscaling import Bundle, PoolDemand, standing_request

KEY_PREFIX = b"polydistill/demand/"
KV_NAMESPACE = "polydistill"
DEFAULT_LEASE_S = 60.0


def _request_from_autoscaler(bundles: list[Bundle]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class ClusterDemand:
    """One pool's share of the standing request. ``send`` receives the cluster-wide sum."""

    def __init__(self, pool_key: str, *, send: Callable[[list[Bundle]], None] | None = None,
                 lease_s: float = DEFAULT_LEASE_S, clock: Callable[[], float] = time.time):
        self.key = KEY_PREFIX + pool_key.encode()
        self.send = send or _request_from_autoscaler
        self.lease_s = lease_s
        self.clock = clock  # wall-clock: leases are compared across processes and nodes
        self._bundles: list[Bundle] = []
        self._renewed_at: float | None = None

    def set(self, bundles: list[Bundle]) -> None:
        """This pool now needs ``bundles``; the autoscaler gets every live pool's needs."""
        self._bundles = [dict(bundle) for bundle in bundles]
        self._publish()

    def renew(self) -> None:
        """Keeps the lease alive (called on every pool tick; writes only once a third of it has passed)."""
        if self._bundles and (self._renewed_at is None or self.clock() - self._renewed_at > self.lease_s / 3):
            self._publish()

    def clear(self) -> None:
        """The pool has ended: its demand leaves the sum."""
        self._bundles = []
        self._publish()

    def _publish(self) -> None:
        from ray.experimental import internal_kv

        now = self.clock()
        if self._bundles:
            record = {"bundles": self._bundles, "expires_at": now + self.lease_s}
            internal_kv._internal_kv_put(self.key, msgpack.packb(record), overwrite=True, namespace=KV_NAMESPACE)
            self._renewed_at = now
        else:
            internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)
            self._renewed_at = None
        demands = {}
        for key in internal_kv._internal_kv_list(KEY_PREFIX, namespace=KV_NAMESPACE):
            raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            if raw is None:  # deleted between the listing and the read
                continue
            record = msgpack.unpackb(raw)
            demand = PoolDemand.of(record["bundles"], float(record["expires_at"]))
            if demand.expires_at <= now:  # its pool stopped renewing: it is gone
                internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
                continue
            demands[key.decode()] = demand
        self.send(standing_request(demands, now))
