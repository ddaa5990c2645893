"""A caller waiting on a judge replica that cannot come back gives up (and so frees its own
resources) instead of waiting forever: the deadlock a lost node caused in the multi-node test."""

from __future__ import annotations

import pytest


def test_waiting_on_an_unplaceable_replica_fails_and_on_a_live_one_returns(ray_cluster):
    import ray

    from actors.pool import PoolConfig, ReplicaPool, ReplicaUnavailable, replica_state, wait_any

    @ray.remote
    class Echo:
        def echo(self, value):
            return value

    live = ReplicaPool.create(Echo, PoolConfig("test-live", num_cpus=0))
    stuck = ReplicaPool.create(Echo, PoolConfig("test-stuck", num_cpus=0, resources=(("no_such_node", 1.0),)))
    try:
        ready, pending = wait_any([live], [live.submit("echo", 7)], unavailable_s=5, poll_s=0.5)
        assert ray.get(ready) == [7] and pending == []
        ref = stuck.submit("echo", 8)
        with pytest.raises(ReplicaUnavailable, match=r"test-stuck\[0\] not alive for 2 s \(state PENDING_CREATION\)"):
            wait_any([live, stuck], [ref], unavailable_s=2, poll_s=0.5)
        assert replica_state(live.handles[0]) == "ALIVE"
    finally:
        live.shutdown()
        stuck.shutdown()
