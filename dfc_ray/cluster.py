"""Ray clusters: joining or starting one safely, and offline checks of cluster launcher files
(`dfc-ray cluster validate FILE`).

Ray's own autoscaler schema catches structural mistakes; on top of it we check the habits a
dfc-ray cluster depends on: the head schedules no work, and the dashboard is never exposed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
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
    import jsonschema  # deferred: jsonschema and Ray's autoscaler load only for an offline check
    from ray.autoscaler._private.util import prepare_config, validate_config  # deferred: as above

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
            _check_bind_addresses(path, field, command)
    for name, node_type in config["available_node_types"].items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if low > high:
            raise ValueError(
                f"{path}: field available_node_types.{name}.min_workers is {low}, "
                f"more than max_workers {high}"
            )
    return config


BIND_OPTIONS = ("--dashboard-host",)
"""`ray start` options that name an address to listen on: only a loopback address is accepted (the
dashboard is reached through `ray dashboard FILE`, an SSH tunnel)."""


def _check_bind_addresses(path: Path, field: str, command: str) -> None:
    """Refuse a bind address that is not loopback, parsed as an IP (0.0.0.0, ::, ::0, a public IP),
    and Ray's debugger opened to the network."""
    words = shlex.split(command.replace(";", " "))
    for i, word in enumerate(words):
        option, _, value = word.partition("=")
        if option in BIND_OPTIONS:
            value = value or (words[i + 1] if i + 1 < len(words) else "")
            try:
                loopback = value == "localhost" or ipaddress.ip_address(value.strip("[]")).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(f"{path}: field {field} binds {option} to {value!r}; expected a loopback address "
                                 "(127.0.0.1 or ::1) and `ray dashboard FILE` to reach it")
        if option == "--ray-debugger-external":
            raise ValueError(f"{path}: field {field} opens Ray's debugger to the network (--ray-debugger-external); "
                             "expected it left off")


LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's single-machine switch. Ray binds every server of a node (GCS, raylet, each worker's gRPC
server, the dashboard and runtime-env agents) to the node's IP, or to the loopback when that IP is
the loopback; but `ray.init(_node_ip_address="127.0.0.1")` and `ray start --node-ip-address` rewrite a
loopback IP to the machine's routable one, except in single-machine mode (Ray's default on macOS and
Windows, where it avoids firewall prompts), which this variable set to 0 turns on. docs/cluster.md."""


def loopback_only() -> None:
    """Make the next local cluster this process starts a single-machine one: its node IP is the
    loopback, so every Ray server listens on 127.0.0.1 only. Child processes inherit the variable;
    this process already read it when `ray` was imported, so its cached copy is set too."""
    from ray._private import ray_constants  # deferred with ray; the constant Ray read at import

    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one on 127.0.0.1.

    A local cluster listens on the loopback only (`loopback_only`) and runs no dashboard unless
    RAY_DASHBOARD=1: nothing is exposed beyond this machine without the user asking.
    """
    import ray  # deferred: `cluster validate` needs no running Ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    loopback_only()
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=False,
             include_dashboard=os.environ.get("RAY_DASHBOARD") == "1", dashboard_host="127.0.0.1")
