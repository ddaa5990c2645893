"""Ray clusters: joining or starting one safely, and offline checks of cluster launcher files
(`dfc-ray cluster validate FILE`).

Ray's own autoscaler schema catches structural mistakes; on top of it we check the habits a
dfc-ray cluster depends on: the head schedules no work, and the dashboard is never exposed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml


def _path_of(error: Any) -> str:
    """`available_node_types.gpu_1x.min_workers` from a jsonschema error's path."""
    return ".".join(str(part) for part in error.absolute_path) or "(top level)"


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster YAML against Ray's autoscaler schema and dfc-ray's rules.

    Returns the prepared config (defaults filled in). Raises ValueError with one line naming the
    file, the field and what was expected.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cluster file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        config = prepare_config(raw)
        validate_config(config)
    except jsonschema.ValidationError as err:
        raise ValueError(f"{path}: field {_path_of(err)}: {err.message}") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

    head_type = config["head_node_type"]
    head_cpus = config["available_node_types"][head_type].get("resources", {}).get("CPU")
    if head_cpus != 0:
        raise ValueError(
            f"{path}: field available_node_types.{head_type}.resources.CPU is {head_cpus!r}; "
            "expected 0 so that no trial or actor is scheduled on the head node"
        )
    for field in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(field, []):
            if "0.0.0.0" in command:
                raise ValueError(
                    f"{path}: field {field} binds to 0.0.0.0 ({command.strip()!r}); expected "
                    "--dashboard-host=127.0.0.1 and `ray dashboard FILE` to reach it"
                )
    for name, node_type in config["available_node_types"].items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if low > high:
            raise ValueError(
                f"{path}: field available_node_types.{name}.min_workers is {low}, "
                f"more than max_workers {high}"
            )
    return config


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one on 127.0.0.1.

    A local cluster binds to the loopback address and runs no dashboard unless RAY_DASHBOARD=1:
    nothing is exposed beyond this machine without the user asking.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=False,
             include_dashboard=os.environ.get("RAY_DASHBOARD") == "1", dashboard_host="127.0.0.1")


def _validate_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    config = validate_cluster_file(args.file)
    table = Table(title=f"{args.file}: valid ({config['provider']['type']}, {config['provider'].get('region', '')})")
    for column in ("node type", "instance", "min", "max", "resources", "market"):
        table.add_column(column)
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        market = node_config.get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        table.add_row(
            name + (" (head)" if name == config["head_node_type"] else ""),
            str(node_config.get("InstanceType", node_config.get("machineType", "?"))),
            str(node_type.get("min_workers", 0)),
            str(node_type.get("max_workers", 0)),
            str(node_type.get("resources", {})),
            market,
        )
    Console().print(table)
    if args.spec:
        _check_spec_placement(args.file, config, args.spec)
    return 0


def _check_spec_placement(file: str, config: dict[str, Any], spec_name: str) -> None:
    """Which node types can hold each kind of actor the spec starts; ValueError when none can."""
    from rich.console import Console

    from dfc_ray.placement import actor_requests, node_type_offers, unplaceable
    from dfc_ray.spaces import load_spec

    spec = load_spec(spec_name)
    offers = node_type_offers(config)
    requests = actor_requests(spec)
    problems = unplaceable(requests, offers, declared_only=True)
    if problems:
        raise ValueError(f"{file}: spec {spec.name}: {problems[0]}; expected a node type that offers it")
    for kind, wants in requests.items():
        holders = [name for name in offers if not unplaceable({kind: wants}, {name: offers[name]}, declared_only=True)]
        Console().print(f"{spec.name}: {kind} actors {wants} fit node types {', '.join(holders)}")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    cluster = subparsers.add_parser("cluster", help="Check Ray cluster launcher files offline.")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    validate = actions.add_parser("validate", help="Validate a cluster YAML (Ray's schema + dfc-ray's rules).")
    validate.add_argument("file", help="cluster YAML, e.g. cluster.yaml")
    validate.add_argument("--spec", help="also check that some node type can hold each kind of actor this sweep "
                                         "spec requests (trials, judges, harvest actors)")
    validate.set_defaults(func=_validate_command)
