"""`dfc-ray cluster validate`: check a Ray cluster launcher file offline."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from dfc_ray.cluster import documentation_addresses, validate_cluster_file
from dfc_ray.placement import actor_requests, node_type_offers, unplaceable
from dfc_ray.spaces import load_spec


def _validate_command(args: argparse.Namespace) -> int:
    config = validate_cluster_file(args.file)
    provider = config["provider"]
    where = provider.get("region") or provider.get("head_ip") or provider.get("coordinator_address", "")
    table = Table(title=f"{args.file}: valid ({provider['type']}, {where})")
    for column in ("node type", "instance", "min", "max", "resources", "market"):
        table.add_column(column)
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        if "hosts" in node_type:  # on-prem: the machines themselves
            instance, market = ", ".join(node_type["hosts"]), "on-prem"
        else:
            instance = str(node_config.get("InstanceType", node_config.get("machineType", "?")))
            market = node_config.get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        table.add_row(
            name + (" (head)" if name == config["head_node_type"] else ""),
            instance,
            str(node_type.get("min_workers", 0)),
            str(node_type.get("max_workers", 0)),
            str(node_type.get("resources", {})),
            market,
        )
    Console().print(table)
    if placeholders := documentation_addresses(config):
        Console().print(f"note: {', '.join(placeholders)} are placeholders (192.0.2.0/24 is reserved for "
                        "documentation): put your machines' addresses in provider.head_ip and worker_ips")
    if args.spec:
        _check_spec_placement(args.file, config, args.spec)
    return 0


def _check_spec_placement(file: str, config: dict, spec_name: str) -> None:
    """Which node types can hold each kind of actor the spec starts; ValueError when none can."""
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
