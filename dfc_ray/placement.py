"""Can some node hold each kind of actor a spec asks for? Checked offline against a cluster file
(`dfc-ray cluster validate FILE --spec SPEC`) and at submission against the running cluster, so a
request no node can meet fails with one line instead of waiting forever.

A sweep starts three kinds of actors: `trial` (one Tune trial), `judge` (an evaluator or steering
replica) and `harvest` (a Ray Data actor hosting the pair). Besides CPUs and GPUs, a spec can send
each kind to a node type through the custom resources its cluster file declares, in one field:

    resources:
      custom: {trial: {trial_gpu: 0.25}, judge: {trial_gpu: 1}, harvest: {harvest_gpu: 1}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

ActorKind = Literal["trial", "judge", "harvest"]
KINDS: tuple[ActorKind, ...] = ("trial", "judge", "harvest")
BOOTSTRAP = Path.home() / "ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster file on the head node (the autoscaler's config): the node types
a job's driver may still get, beyond the nodes alive now."""


def custom_requests(spec) -> dict[ActorKind, dict[str, float]]:
    """`resources.custom` of a spec, checked: kind → {custom resource: amount per actor}."""
    custom = spec.resources.custom
    out: dict[ActorKind, dict[str, float]] = {}
    for kind, requests in custom.items():
        where = f"{spec.source}: field resources.custom.{kind}"
        if kind not in KINDS:
            raise ValueError(f"{spec.source}: field resources.custom has {kind!r}; expected one of {list(KINDS)}")
        if not isinstance(requests, dict):
            raise ValueError(f"{where} is {requests!r}; expected a mapping of resource name to amount")
        for name, amount in requests.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"{where}.{name} is {amount!r}; expected a positive number")
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"{where}.{name}: CPUs and GPUs have their own fields (resources.cpu, gpu, "
                                 "evaluator_cpu, evaluator_gpu); expected a custom resource name")
        out[kind] = {name: float(amount) for name, amount in requests.items()}
    if "harvest" in out and spec.harvest.executor != "ray":
        raise ValueError(f"{spec.source}: field resources.custom.harvest asks for harvest actors, but harvest.executor "
                         f"is {spec.harvest.executor!r} (the driver computes the rows); expected executor 'ray' "
                         "or no resources.custom.harvest")
    return out


def actor_requests(spec, evaluate: bool = True) -> dict[ActorKind, dict[str, float]]:
    """What one actor of each kind asks of its node (amounts > 0 only)."""
    res, custom = spec.resources, custom_requests(spec)
    harvest_gpus = max(0.0, float(spec.harvest.gpus_per_actor))  # -1 (auto) asks for none up front
    kinds: dict[ActorKind, dict[str, float]] = {
        "trial": {"CPU": res.cpu, "GPU": res.gpu},
        "judge": {"CPU": res.evaluator_cpu, "GPU": res.evaluator_gpu},
        "harvest": {"GPU": harvest_gpus}}
    if not evaluate:
        del kinds["judge"]
    return {kind: {k: float(v) for k, v in (amounts | custom.get(kind, {})).items() if v}
            for kind, amounts in kinds.items()}


def unplaceable(requests: dict[ActorKind, dict[str, float]], offers: dict[str, dict[str, float]],
                declared_only: bool) -> list[str]:
    """One line per actor kind that no node (type) in `offers` can hold. With `declared_only`, a CPU or
    GPU count a node type leaves out counts as unknown (a cloud instance type sets it), not as 0."""
    def holds(offer: dict[str, float], name: str, amount: float) -> bool:
        return offer.get(name, 0) >= amount - 1e-9 or (declared_only and name in ("CPU", "GPU") and name not in offer)

    problems = []
    for kind, wants in requests.items():
        if not any(all(holds(offer, name, amount) for name, amount in wants.items()) for offer in offers.values()):
            missing = [f"{name}={amount:g}" for name, amount in wants.items()
                       if not any(holds(offer, name, amount) for offer in offers.values())] or \
                      [f"{name}={amount:g}" for name, amount in wants.items()]
            problems.append(f"{kind} actors request {', '.join(missing)} and no node offers it "
                            f"(nodes: {', '.join(f'{n} {_fmt(o)}' for n, o in offers.items()) or 'none'})")
    return problems


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def node_type_offers(config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Node type → the resources it declares, from a (prepared) cluster launcher config."""
    return {name: {k: float(v) for k, v in node.get("resources", {}).items()}
            for name, node in config["available_node_types"].items()}


def live_offers() -> dict[str, dict[str, float]]:
    """Resources of the nodes alive now, plus the node types the autoscaler may still start (when this
    driver runs on the head of a `ray up` cluster)."""
    import ray  # deferred: the offline check (cluster validate --spec) needs no Ray

    offers = {f"node {n['NodeID'][:8]}": {k: float(v) for k, v in n["Resources"].items()
                                          if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
              for n in ray.nodes() if n["Alive"]}
    bootstrap = (yaml.safe_load(BOOTSTRAP.read_text()) if BOOTSTRAP.is_file() else None) or {}
    if "available_node_types" in bootstrap:
        offers |= {f"type {name}": resources for name, resources in node_type_offers(bootstrap).items()}
    return offers


def check_placeable(spec, evaluate: bool = True) -> None:
    """Refuse, with one line naming the resource, a spec whose actors no node of this cluster (alive,
    or a type its autoscaler may start) can hold; Ray would otherwise leave them pending forever."""
    problems = unplaceable(actor_requests(spec, evaluate), live_offers(), declared_only=BOOTSTRAP.is_file())
    if problems:
        raise ValueError(f"{spec.source}: {problems[0]}; expected resources this cluster offers")
