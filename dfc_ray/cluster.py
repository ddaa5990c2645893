"""Ray clusters: joining or starting one safely, and offline checks of cluster launcher files
(`dfc-ray cluster validate FILE`).

Ray's own autoscaler schema catches structural mistakes; on top of it we check the habits a
dfc-ray cluster depends on: the head schedules no work, and the dashboard is never exposed (also when
`ray start` runs inside `bash -c '…'`). For Ray's on-prem provider (cluster-onprem.yaml) the node types
are read from the `ray start` commands.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dfc_ray.yamlio import load_yaml


def _path_of(error: Any) -> str:
    """`available_node_types.gpu_1x.min_workers` from a jsonschema error's path."""
    return ".".join(str(part) for part in error.absolute_path) or "(top level)"


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster YAML against Ray's autoscaler schema and dfc-ray's rules.

    Returns the prepared config (defaults filled in). For Ray's on-prem provider (`type: local`),
    whose machines all run the same start commands, `available_node_types` is dfc-ray's view of it:
    `head` and `worker`, with the resources their `ray start` commands declare (`local_node_types`).
    Raises ValueError with one line naming the file, the field and what was expected.
    """
    import jsonschema  # deferred: jsonschema and Ray's autoscaler load only for an offline check
    from ray.autoscaler._private.util import prepare_config, validate_config  # deferred: as above

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cluster file")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    local = isinstance(raw.get("provider"), dict) and raw["provider"].get("type") == "local"
    if local:  # before Ray's own preparation, which aborts with a message of its own
        _check_local_provider(path, raw)

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        config = prepare_config(raw)
        validate_config(config)
    except jsonschema.ValidationError as err:
        raise ValueError(f"{path}: field {_path_of(err)}: {err.message}") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

    if local:
        config = config | {"available_node_types": local_node_types(path, config), "head_node_type": "head"}
    head_type = config["head_node_type"]
    head_cpus = config["available_node_types"][head_type].get("resources", {}).get("CPU")
    if head_cpus != 0:
        found = (f"head_start_ray_commands sets --num-cpus={head_cpus:g}" if head_cpus is not None else
                 "head_start_ray_commands has no --num-cpus") if local else \
            f"available_node_types.{head_type}.resources.CPU is {head_cpus!r}"
        raise ValueError(f"{path}: field {found}; expected {'--num-cpus=' if local else ''}0 so that no trial or "
                         "actor is scheduled on the head node")
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


LOCAL_NODE_TYPE = "local.cluster.node"
"""The one node type Ray's local provider makes for every machine (`prepare_local`); a config that
already has it was prepared by `ray up` (the head's ~/ray_bootstrap_config.yaml)."""


def _check_local_provider(path: Path, raw: dict[str, Any]) -> None:
    """The on-prem provider's own fields: the machines (`head_ip`, `worker_ips`, unless a
    `coordinator_address` hands them out), and no node types (Ray refuses them for this provider)."""
    provider = raw["provider"]
    for field in ("available_node_types", "head_node", "worker_nodes"):
        if raw.get(field) and not (field == "available_node_types" and LOCAL_NODE_TYPE in raw[field]):
            raise ValueError(f"{path}: field {field} is not taken by Ray's local (on-prem) provider; expected the "
                             "machines' resources in head_start_ray_commands and worker_start_ray_commands "
                             "(ray start --num-cpus, --num-gpus, --resources)")
    if "coordinator_address" in provider:
        return
    head, workers = provider.get("head_ip"), provider.get("worker_ips")
    if not isinstance(head, str) or not head.strip():
        raise ValueError(f"{path}: field provider.head_ip is {head!r}; expected the head machine's IP address or "
                         "host name (or a provider.coordinator_address)")
    if not isinstance(workers, list) or not workers:
        raise ValueError(f"{path}: field provider.worker_ips is {workers!r}; expected a list of at least one worker "
                         "machine's IP address or host name (the head schedules no work)")
    for i, worker in enumerate(workers):
        problem = "not an address" if not isinstance(worker, str) or not worker.strip() else \
            "the head_ip" if worker == head else "listed twice" if worker in workers[:i] else ""
        if problem:
            raise ValueError(f"{path}: field provider.worker_ips[{i}] is {worker!r} ({problem}); expected the "
                             "address of a worker machine other than the head, each once")


def local_node_types(path: Path, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head and the workers of a prepared on-prem config as node types: the resources their
    `ray start` commands declare (a CPU or GPU count left out is Ray's to detect on each machine),
    the workers' min/max as Ray's local provider set them, and the machines (`hosts`)."""
    provider, workers = config["provider"], config["available_node_types"][LOCAL_NODE_TYPE]
    return {"head": {"resources": _start_resources(path, "head_start_ray_commands", config),
                     "min_workers": 0, "max_workers": 0, "hosts": [provider.get("head_ip", "(coordinator)")]},
            "worker": {"resources": _start_resources(path, "worker_start_ray_commands", config),
                       "min_workers": workers.get("min_workers", 0), "max_workers": workers.get("max_workers", 0),
                       "hosts": list(provider.get("worker_ips", ["(coordinator)"]))}}


DOCUMENTATION_NETWORKS = tuple(ipaddress.ip_network(net) for net in ("192.0.2.0/24", "198.51.100.0/24",
                                                                      "203.0.113.0/24", "2001:db8::/32"))
"""Address ranges reserved for documentation (RFC 5737, RFC 3849): no real machine has one, so an
example file's placeholders cannot reach anybody's machine by accident."""


def documentation_addresses(config: dict[str, Any]) -> list[str]:
    """The on-prem machines of a config that are still documentation placeholders."""
    provider = config["provider"]
    found = []
    for host in [provider.get("head_ip"), *provider.get("worker_ips", [])]:
        try:
            if any(ipaddress.ip_address(str(host)) in net for net in DOCUMENTATION_NETWORKS):
                found.append(str(host))
        except ValueError:  # a host name, or no address at all
            continue
    return found


COUNT_OPTIONS = {"--num-cpus": "CPU", "--num-gpus": "GPU"}
"""`ray start` options that set a node's CPU and GPU counts."""


def _start_resources(path: Path, field: str, config: dict[str, Any]) -> dict[str, float]:
    """What the `ray start` commands of `field` offer: --num-cpus, --num-gpus, --resources '{JSON}'."""
    starts = [words for command in config.get(field, []) for words in _shell_commands(path, field, command)
              if words[:2] == ["ray", "start"]]
    if not starts:
        raise ValueError(f"{path}: field {field} has no `ray start` command; expected one")
    resources: dict[str, float] = {}
    for words in starts:
        for option, value in _options(words):
            where = f"{path}: field {field}: {option}"
            if option in COUNT_OPTIONS:
                try:
                    resources[COUNT_OPTIONS[option]] = float(value)
                except ValueError:
                    raise ValueError(f"{where} is {value!r}; expected a number (or leave it out: Ray counts "
                                     "the machine's own)") from None
            elif option == "--resources":
                resources |= _custom_resources(where, value)
    return resources


def _custom_resources(where: str, value: str) -> dict[str, float]:
    """`ray start --resources` JSON: custom resource name → amount."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is {value!r}, not valid JSON ({err.msg} at column {err.colno}); expected an "
                         """object such as '{"trial_gpu": 4}'""") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} is {value!r}; expected a JSON object of resource name to amount")
    for name, amount in parsed.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"{where} names {name}; expected --num-cpus/--num-gpus for it, custom resources here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"{where}: {name} is {amount!r}; expected a number >= 0")
    return {name: float(amount) for name, amount in parsed.items()}


SHELLS = {"bash", "sh", "dash", "zsh", "ksh"}
"""Shells whose `-c SCRIPT` runs SCRIPT: its commands are checked as if written directly."""
WRAPPERS = {"exec", "nohup", "env"}
"""Words that run the command after them (their flags and VAR=value assignments skipped)."""


def _unwrapped(words: list[str]) -> list[str]:
    """The command a line runs once leading wrappers (`exec`, `nohup`, `env X=1`, …) are skipped."""
    while words and os.path.basename(words[0]) in WRAPPERS:
        words = words[1:]
        while words and (words[0].startswith("-") or "=" in words[0]):
            words = words[1:]
    return words


def _shell_commands(path: Path, field: str, command: str, depth: int = 0) -> list[list[str]]:
    """The simple commands of a shell line (split at ;, &&, ||, |), each as its words, leading
    `VAR=value` assignments and wrappers dropped; a shell's `-c SCRIPT` contributes SCRIPT's commands."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as err:
        raise ValueError(f"{path}: field {field}: {command!r} is not a shell command ({err}); expected one "
                         "that a shell can run") from None
    commands: list[list[str]] = [[]]
    for token in tokens:
        if set(token) <= set(";&|"):
            commands.append([])
        elif commands[-1] or "=" not in token or token.startswith("-"):
            commands[-1].append(token)
    found = []
    for words in (_unwrapped(words) for words in commands):
        script = _shell_script(words)
        if script is not None and depth < 8:  # nested `bash -c "bash -c …"` a few levels deep at most
            found += _shell_commands(path, field, script, depth + 1)
        elif words:
            found.append(words)
    return found


def _shell_script(words: list[str]) -> str | None:
    """SCRIPT of `bash -c SCRIPT` (or `sh -lc SCRIPT`, …), else None."""
    if not words or os.path.basename(words[0]) not in SHELLS:
        return None
    rest = iter(words[1:])
    for word in rest:
        if word.startswith("--"):  # --login, --norc
            continue
        if not word.startswith(("-", "+")):
            return None  # a script file, not -c
        if word in ("-o", "+o", "-O", "+O"):  # an option name follows
            next(rest, None)
        elif "c" in word[1:]:
            return next(rest, None)
    return None


def _options(words: list[str]) -> list[tuple[str, str]]:
    """(--option, value) of a command's words, for `--option=value` and `--option value`."""
    out = []
    for i, word in enumerate(words):
        if word.startswith("--"):
            option, equals, value = word.partition("=")
            if not equals and i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
            out.append((option, value))
    return out


BIND_OPTIONS = ("--dashboard-host",)
"""`ray start` options that name an address to listen on: only a loopback address is accepted (the
dashboard is reached through `ray dashboard FILE`, an SSH tunnel)."""


def _check_bind_addresses(path: Path, field: str, command: str) -> None:
    """Refuse a bind address that is not loopback, parsed as an IP (0.0.0.0, ::, ::0, a public IP),
    and Ray's debugger opened to the network."""
    for words in _shell_commands(path, field, command):
        for option, value in _options(words):
            if option in BIND_OPTIONS:
                try:
                    loopback = value == "localhost" or ipaddress.ip_address(value.strip("[]")).is_loopback
                except ValueError:
                    loopback = False
                if not loopback:
                    raise ValueError(f"{path}: field {field} binds {option} to {value!r}; expected a loopback "
                                     "address (127.0.0.1 or ::1) and `ray dashboard FILE` to reach it")
            if option == "--ray-debugger-external":
                raise ValueError(f"{path}: field {field} opens Ray's debugger to the network "
                                 "(--ray-debugger-external); expected it left off")


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


CONNECT_S = 5.0
"""Seconds to open a TCP connection to a Ray address before calling it unreachable."""
HANDSHAKE_S = 10.0
"""Seconds for the server there to complete a gRPC (HTTP/2) handshake, as a Ray GCS does at once."""


def check_address(address: str, source: str = "--address") -> None:
    """Refuse, in one line and within ~15 s, a Ray address where no cluster answers: nothing listening, or a
    server that is not Ray's (an HTTP server, the dashboard). `ray.init` would wait minutes for either.
    `source` names where the address came from (--address or RAY_ADDRESS). "local" passes; "auto" must find a
    running cluster on this machine (`_auto_address`), whose address is then checked like any other. A Ray Client
    address (ray://) is refused: the driver needs the cluster's GCS (its job and cluster ids, Tune's driver)."""
    if address == "local":
        return
    where = f"{source} {address!r}"
    if address == "auto":
        address = _auto_address(where)
        where = f"{where} (found {address!r})"
    if address.startswith(("http://", "https://")):
        raise ValueError(f"{where}: an HTTP address (the dashboard's, for `ray job submit`); expected the cluster's "
                         "GCS address host:port (port 6379 by default), or submit the sweep as a Ray job")
    if address.startswith("ray://"):
        raise ValueError(f"{where}: a Ray Client address, which dfc-ray's driver cannot use (it joins the cluster's "
                         "GCS); expected the head's GCS address host:port (port 6379 by default), or submit the "
                         "sweep as a Ray job")
    target = address
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"{where}: expected host:port of a running Ray cluster (e.g. 10.0.0.5:6379)")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{where}: invalid port {port}; expected a port from 1 to 65535 (a Ray GCS listens on "
                         "6379 by default)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S).close()
    except OSError as err:
        raise ValueError(f"{where}: nothing answers there ({err.strerror or err}); expected a running Ray "
                         "cluster's address (`ray start --head` prints it)") from None
    import grpc  # deferred: installed with Ray, needed only to check an address

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=HANDSHAKE_S)
    except grpc.FutureTimeoutError:
        raise ValueError(f"{where}: a server answers there, but not Ray's (no gRPC handshake within "
                         f"{HANDSHAKE_S:g} s); expected the head's GCS address (port 6379 by default), not the "
                         "dashboard's or another service's") from None
    finally:
        channel.close()


def _auto_address(where: str) -> str:
    """The address "auto" means here (RAY_ADDRESS, else the cluster `ray start` last started on this machine,
    else any running one); one line when there is none (Ray would raise a ConnectionError only after the run
    folder was written)."""
    from ray._private.services import get_ray_address_from_environment  # deferred: Ray loads only to join one

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise ValueError(f"{where}: no running Ray cluster found on this machine; expected one started with "
                         "`ray start --head`, an address host:port, or no --address for a local cluster of its own")
    return found


def cluster_identity() -> tuple[str, str]:
    """(Ray job id, cluster id) of this driver, in hex; a job id means something only on its own cluster."""
    import ray  # deferred: as in `connect`

    return ray.get_runtime_context().get_job_id(), ray._private.worker.global_worker.node.cluster_id.hex()


def job_ended(job_id: str) -> bool:
    """Whether the GCS of the cluster this process joined lists Ray job `job_id` (hex) as ended."""
    import ray  # deferred: as in `connect`

    return any(job["JobID"] == job_id and job["IsDead"] for job in ray._private.state.jobs())


def connect(address: str | None = None, num_cpus: int | None = None, metadata: dict[str, str] | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one on 127.0.0.1. An address
    where no Ray cluster answers is refused in one line within seconds (`check_address`). `metadata`: the
    Ray job's (the dashboard's job page and `ray list jobs --detail` show it, e.g. the sweep's spec and run).

    A local cluster listens on the loopback only (`loopback_only`) and runs no dashboard unless
    RAY_DASHBOARD=1: nothing is exposed beyond this machine without the user asking.
    """
    import ray  # deferred: `cluster validate` needs no running Ray
    from ray.job_config import JobConfig  # deferred with Ray

    if ray.is_initialized():
        return
    job = JobConfig(metadata=metadata or {})
    if address or os.environ.get("RAY_ADDRESS"):
        check_address(address or os.environ["RAY_ADDRESS"], "--address" if address else "RAY_ADDRESS")
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False, job_config=job)
        return
    loopback_only()
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=False, job_config=job,
             include_dashboard=os.environ.get("RAY_DASHBOARD") == "1", dashboard_host="127.0.0.1")
    start_reaper()


def start_reaper() -> None:
    """Start dfc_ray/reaper.py beside the local cluster this driver just started: if the driver is killed
    (kill -9) its Ray agents and workers are gone within a second, not a minute later."""
    import ray  # deferred: as in `connect`

    processes = ray._private.worker.global_worker.node.all_processes
    pids = [str(info.process.pid) for infos in processes.values() for info in infos if info.process]
    subprocess.Popen([sys.executable, str(Path(__file__).with_name("reaper.py")), *pids], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
