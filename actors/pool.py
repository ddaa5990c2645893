"""Named pools of model-hosting replicas (evaluators, steerers) shared by every Tune trial.

Replicas are NAMED actors (`<name>-<i>` in a namespace), so a trial finds them with
`ReplicaPool.connect(cfg)` (`ray.get_actor`) instead of loading its own copy of the pair. Each is
created with `max_restarts` and `max_task_retries`: when a replica's process dies, Ray restarts it
(re-running its constructor, i.e. reloading the pair from the spec) and re-sends the requests it
was serving, so a trial's request completes instead of failing. Requests carry checkpoint PATHS,
never weights.

Dispatch: `least_busy` sends to the replica with the least load, a replica's load being whether it is
running a trial's request now (`PairReplica.busy`, answered from its own thread beside that request) plus
THIS caller's requests in flight to it (requests queued behind a running one cannot be seen); ties go to a
random replica, so callers that know nothing of each other spread out. `round_robin` cycles.
(Each Tune trial connects its own handle: a per-caller count alone sent every trial's first request to
replica 0, so a pool of two judged with one.)
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any, Sequence

import ray
from ray.actor import ActorClass, ActorHandle

from dfc_ray.config import PoolConfig

UNAVAILABLE_S = 120.0
"""How long a caller waits on a replica that is not alive (restarting after its node was lost, or not
placed yet) before giving up (see `wait_any`)."""


BUSY_WAIT_S = 2.0
"""How long `least_busy` waits for the replicas' `busy()` answers."""


class ReplicaPool:
    """Handles to a pool's replicas plus a dispatcher."""

    def __init__(self, cfg: PoolConfig, handles: Sequence[ActorHandle]):
        self.cfg, self.handles = cfg, list(handles)
        self._in_flight: list[list[ray.ObjectRef]] = [[] for _ in self.handles]
        self._turn = itertools.cycle(range(len(self.handles)))

    @classmethod
    def create(cls, actor_class: ActorClass, cfg: PoolConfig, *args: Any, **kwargs: Any) -> "ReplicaPool":
        """Start the replicas (or attach to those already running under these names)."""
        options = dict(namespace=cfg.namespace, get_if_exists=True, max_restarts=cfg.max_restarts,
                       max_task_retries=cfg.max_task_retries, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                       resources=dict(cfg.resources))
        if cfg.detached:
            options["lifetime"] = "detached"
        handles = [actor_class.options(name=cfg.replica_name(i), **options).remote(*args, **kwargs)
                   for i in range(cfg.replicas)]
        return cls(cfg, handles)

    @classmethod
    def connect(cls, cfg: PoolConfig) -> "ReplicaPool":
        """The running replicas of the pool `cfg` names (from any driver or trial of the cluster)."""
        handles = []
        for i in range(cfg.replicas):
            try:
                handles.append(ray.get_actor(cfg.replica_name(i), namespace=cfg.namespace))
            except ValueError:
                raise PoolMissingError(f"pool {cfg.name!r}: no actor {cfg.replica_name(i)!r} in namespace "
                                 f"{cfg.namespace!r}; expected a pool created with ReplicaPool.create") from None
        return cls(cfg, handles)

    def _pick(self) -> int:
        if self.cfg.dispatch == "round_robin":
            return next(self._turn)
        for i, refs in enumerate(self._in_flight):
            if refs:
                self._in_flight[i] = ray.wait(refs, num_returns=len(refs), timeout=0)[1]
        load = [len(refs) + busy for refs, busy in zip(self._in_flight, self._busy())]
        least = min(load)
        return random.choice([i for i, n in enumerate(load) if n == least])

    def _busy(self) -> list[float]:
        """Each replica's `busy()` (a replica that does not answer within BUSY_WAIT_S, e.g. restarting, counts
        as busy; an actor class without the method as idle)."""
        if len(self.handles) == 1:
            return [0.0]
        refs = [h.busy.remote() if hasattr(h, "busy") else None for h in self.handles]
        asked = [r for r in refs if r is not None]
        ready = set(ray.wait(asked, num_returns=len(asked), timeout=BUSY_WAIT_S)[0]) if asked else set()
        return [0.0 if r is None else float(ray.get(r)) if r in ready else 1.0 for r in refs]

    def submit(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Send `method(*args)` to one replica; returns its ObjectRef."""
        i = self._pick()
        ref = getattr(self.handles[i], method).remote(*args, **kwargs)
        self._in_flight[i].append(ref)
        return ref

    def submit_in_turn(self, calls: Sequence[tuple[str, tuple]]) -> list[ray.ObjectRef]:
        """Send `calls` ((method, args) pairs) to ONE replica, where they run one after the other (Ray runs a
        caller's requests to an actor in the order sent). A trial's steering and localisation go this way: sent
        apart, they took both replicas, and the other trial's steering queued behind a long localisation while
        a core idled (docs/BENCHMARKS.md, "organism48 end to end")."""
        i = self._pick()
        refs = [getattr(self.handles[i], method).remote(*args) for method, args in calls]
        self._in_flight[i] += refs
        return refs

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`submit` and wait for the result."""
        return ray.get(self.submit(method, *args, **kwargs))

    def map(self, method: str, calls: Sequence[tuple]) -> list[Any]:
        """Spread many calls (argument tuples) over the replicas; results in call order."""
        return ray.get([self.submit(method, *args) for args in calls])

    def restarts(self) -> int:
        """How often Ray has restarted this pool's replicas (the GCS's count; a dead replica's restarts stay
        counted). The run's report shows it: a judge that kept dying cost time even when every trial ended."""
        return sum(int(ray._private.state.actors(actor_id=h._actor_id.hex()).get("NumRestarts", 0))
                   for h in self.handles)

    def shutdown(self) -> None:
        """Kill every replica for good (no restart)."""
        for handle in self.handles:
            ray.kill(handle, no_restart=True)


class PoolMissingError(ValueError):
    """A pool's replica is not in the cluster (a ValueError, as `ray.get_actor` raises). Inside a trial it means
    the judges vanished (their driver ended, another driver shut them down): the cluster lost the trial, which
    is run again (dfc_ray/failures.py), never the trial's own failure."""


class ReplicaUnavailable(RuntimeError):
    """A replica a caller waits on has not been alive for `UNAVAILABLE_S`."""


def replica_state(handle: ActorHandle) -> str:
    """The replica's state in the GCS: ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY or DEAD.
    Read from the GCS directly (Ray's debugging accessor), so it works without a dashboard."""
    return ray._private.state.actors(actor_id=handle._actor_id.hex()).get("State", "UNKNOWN")


def wait_any(pools: Sequence[ReplicaPool], refs: list[ray.ObjectRef], unavailable_s: float = UNAVAILABLE_S,
             poll_s: float = 10.0) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
    """`ray.wait(refs, num_returns=1)`, but raise ReplicaUnavailable once some replica of `pools` has not
    been alive for `unavailable_s`. A Tune trial waiting on a judge holds its CPUs and GPUs: after a
    node is lost, the judge's replica may need exactly those to restart, and both would wait forever.
    Failing the trial frees them; Tune retries it (FailureConfig) once the replica is back."""
    down_since: float | None = None
    while True:
        ready, pending = ray.wait(refs, num_returns=1, timeout=poll_s)
        if ready:
            return ready, pending
        states = {f"{pool.cfg.name}[{i}]": replica_state(handle)
                  for pool in pools for i, handle in enumerate(pool.handles)}
        down = {name: state for name, state in states.items() if state != "ALIVE"}
        if not down:
            down_since = None
            continue
        down_since = down_since or time.monotonic()
        if time.monotonic() - down_since > unavailable_s:
            name, state = next(iter(down.items()))
            raise ReplicaUnavailable(f"judge replica {name} not alive for {unavailable_s:.0f} s (state {state}); "
                                     "giving up this request so its caller's resources are freed")
