"""A Ray cluster of several nodes on one machine, the way Ray's own tests build one: a head that
schedules nothing (`--num-cpus=0`, as in cluster.yaml) with the Jobs API on 127.0.0.1, worker
raylets that join it, and a moto S3 server, all on loopback.

Every node is its own process (`python tests/multinode.py NODE_JSON`, what `ray start --block`
does, minus its rewriting of 127.0.0.1 into the machine's address: like `ray.cluster_utils.Cluster`
it builds `ray._private.node.Node` with node_ip_address 127.0.0.1, so the GCS, raylets and
object managers listen on loopback) with its own scratch folder: Ray temp dir (sessions, logs, the
unpacked job working dir), TMPDIR, HOME and working directory. No node gets PYTHONPATH, so the code
that runs is the job's `--working-dir` package, and the only storage that nodes share is S3.
Killing a node's raylet (SIGKILL) takes the node down as a lost spot instance would: its node
process notices and ends the node's other processes.

Used by tests/test_multinode.py and by scripts/local_cluster.py (`up`/`down` by hand).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray.thirdparty_files import psutil  # Ray's own copy: the harness needs nothing Ray lacks

AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIADFCRAYTESTKEY0001", "AWS_SECRET_ACCESS_KEY": "dfc-ray-test-secret-do-not-leak",
           "AWS_DEFAULT_REGION": "us-east-1"}
"""Fake credentials for the loopback S3 server (recognizable, so tests can assert they never leak)."""
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray turns 127.0.0.1 into the machine's address when a process joins a cluster (ray.init(address=…),
the job agent, drivers), unless this variable is 0: then the node address stays the loopback one.
It only bars `ray start` of worker nodes (which this harness does not use), so every process of the
cluster (nodes and job drivers, which inherit the node's environment) stays on 127.0.0.1."""
NODE_PORTS = ("node_manager_port", "object_manager_port", "dashboard_agent_listen_port", "metrics_agent_port",
              "runtime_env_agent_port", "metrics_export_port")
"""Ports each node picks explicitly: Ray's defaults (e.g. the agent's 52365) collide between nodes of
one machine and with other Ray clusters on it."""


def free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """n distinct TCP ports free on every address and not in `avoid` (held together so they differ; bound,
    never listening): a port taken only on the machine's own address by another Ray cluster is not free for
    this one. A cluster takes all its ports from ONE call (`LocalCluster.up`): ports released by one call
    can come back from the next, and Ray refuses a node whose components were given the same port."""
    sockets: list[socket.socket] = []
    try:
        found: list[int] = []
        while len(found) < n:
            s = socket.socket()
            sockets.append(s)  # held, also when skipped: the next bind gets another port
            s.bind(("0.0.0.0", 0))
            if s.getsockname()[1] not in avoid:
                found.append(s.getsockname()[1])
        return found
    finally:
        for s in sockets:
            s.close()


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    """Poll `check()` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")


@dataclass
class Node:
    """One node process (head or worker) and its scratch folder."""

    name: str
    scratch: str
    ports: dict[str, int]
    pid: int = 0
    """The node process (leader of its own process group)."""


@dataclass
class LocalCluster:
    """Head + workers + moto S3 on loopback. `up()` starts everything, `down()` ends every process it
    started (by pid and process group, never by name: other Ray clusters may share the machine)."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dfcmn-"))
    """Scratch root; short, because Ray's unix socket paths live under it (108-byte limit)."""
    workers: int = 2
    worker_cpus: int = 2
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources every worker offers (e.g. {"trial_gpu": 1}, as a cluster.yaml node type)."""
    gcs_port: int = 0
    dashboard_port: int = 0
    s3_port: int = 0
    s3_pid: int = 0
    nodes: list[Node] = field(default_factory=list)
    planned: dict[str, dict[str, int]] = field(default_factory=dict)
    """Node name → the ports it is to use (`up` plans every node's at once)."""

    # ------------------------------------------------------------ addresses and environment

    @property
    def address(self) -> str:
        """The Jobs API (dashboard) address: what `ray job submit --address` and RAY_ADDRESS take."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def s3_env(self) -> dict[str, str]:
        return AWS_ENV | {"AWS_ENDPOINT_URL": self.s3_endpoint}

    def client_env(self) -> dict[str, str]:
        """Environment for a process outside the cluster (ray job submit, dfc-ray report)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        return env | self.s3_env() | {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}

    def _node_env(self, scratch: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RAY_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV_PROMPT")}
        for sub in ("tmp", "home"):
            (scratch / sub).mkdir(parents=True, exist_ok=True)
        # RAY_AUTH_MODE=disabled: a throwaway test cluster on loopback (Ray 2.60 otherwise writes a
        # token to ~/.ray); never set it on a real cluster.
        # RAY_TMPDIR: where "auto" looks up the cluster address (job drivers connect with "auto"); the
        # head writes it there, else Ray falls back to any GCS process running on the machine.
        return env | self.s3_env() | LOOPBACK | {"TMPDIR": str(scratch / "tmp"), "HOME": str(scratch / "home"),
                                                 "RAY_TMPDIR": str(Path(self.root) / "head"),
                                                 "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    # ------------------------------------------------------------ start and stop

    def up(self, timeout: float = 180) -> "LocalCluster":
        """Start S3, the head and the workers, every port from one `free_ports` call (so none is given twice);
        a node whose start fails (a port another process took meanwhile, or a raylet that missed Ray's start
        window) is started again on fresh ports."""
        names = ["head"] + [f"worker{i + 1}" for i in range(self.workers)]
        ports = iter(free_ports(3 + len(NODE_PORTS) * len(names)))
        self.s3_port, self.gcs_port, self.dashboard_port = next(ports), next(ports), next(ports)
        self.planned = {name: {port: next(ports) for port in NODE_PORTS} for name in names}
        try:
            self.start_s3()
            self.start_head()
            for name in names[1:]:  # one at a time: a loaded machine makes a raylet miss Ray's 30 s start window
                self.start_worker(name, timeout)
        except BaseException:
            self.down()
            raise
        return self

    def used_ports(self) -> set[int]:
        return {self.s3_port, self.gcs_port, self.dashboard_port} | \
            {port for ports in self.planned.values() for port in ports.values()}

    def _replan(self, name: str) -> None:
        """Fresh ports for node `name` after a failed start (the head's GCS and dashboard ports too)."""
        fresh = iter(free_ports(len(NODE_PORTS) + 2, avoid=self.used_ports()))
        self.planned[name] = {port: next(fresh) for port in NODE_PORTS}
        if name == "head":
            self.gcs_port, self.dashboard_port = next(fresh), next(fresh)

    def start_s3(self) -> None:
        if not self.s3_port:  # S3 alone (tests/test_s3_outage.py), without `up`
            self.s3_port = free_ports(1)[0]
        log = open(Path(self.root) / "moto.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.s3_pid = proc.pid
        wait_for("moto S3 server", lambda: _http_ok(self.s3_endpoint), 60)

    def create_bucket(self, name: str) -> str:
        """A new bucket on the cluster's S3 server; returns its s3:// URI."""
        import boto3  # deferred: only S3 users need it

        boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials()).create_bucket(Bucket=name)
        return f"s3://{name}"

    def _running(self, name: str) -> bool:
        """True while the node process runs; a RuntimeError with its log's last line once it ended."""
        node = self.node(name)
        if psutil.pid_exists(node.pid) and psutil.Process(node.pid).status() != psutil.STATUS_ZOMBIE:
            return True
        lines = (Path(self.root) / f"{name}.log").read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{name}: the node process ended: {lines[-1]}")

    def _start_node(self, name: str, params: dict) -> Node:
        scratch = Path(self.root) / name
        if name not in self.planned:  # a node added after `up` (scripts, tests growing the cluster)
            self._replan(name)
        ports = self.planned[name]
        params = params | ports | {"node_ip_address": "127.0.0.1", "temp_dir": str(scratch / "ray"),
                                   "min_worker_port": 0, "max_worker_port": 0}
        log = open(Path(self.root) / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, __file__, json.dumps(params)], cwd=self._workdir(scratch),
                                env=self._node_env(scratch), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        node = Node(name, str(scratch), ports, proc.pid)
        self.nodes.append(node)
        return node

    @staticmethod
    def _workdir(scratch: Path) -> Path:
        (scratch / "cwd").mkdir(parents=True, exist_ok=True)
        return scratch / "cwd"

    def start_head(self, attempts: int = 3) -> Node:
        return self._retried("head", lambda: self._head(), attempts)

    def _head(self) -> Node:
        node = self._start_node("head", {"head": True, "gcs_server_port": self.gcs_port, "num_cpus": 0, "num_gpus": 0,
                                         "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                         "dashboard_port": self.dashboard_port})
        wait_for("head node's Jobs API", lambda: self._running("head") and _http_ok(f"{self.address}/api/version"), 120)
        return node

    def start_worker(self, name: str, timeout: float = 180, attempts: int = 3) -> Node:
        """Start a worker and wait until the head sees it alive."""
        return self._retried(name, lambda: self._join(name, timeout), attempts)

    def _retried(self, name: str, start, attempts: int) -> Node:
        """`start()` node `name`; a start whose node process ended (a port taken meanwhile: Ray's port-conflict
        error; a raylet that missed Ray's 30 s registration window) is retried on fresh ports."""
        for _ in range(attempts - 1):
            try:
                return start()
            except RuntimeError as err:
                print(f"{name} did not start ({err}); again on fresh ports", flush=True)
                _signal_group(self.node(name).pid, signal.SIGKILL)  # what it left running (seen: its log monitor)
                self.nodes = [n for n in self.nodes if n.name != name]
                self._replan(name)
        return start()

    def _join(self, name: str, timeout: float) -> Node:
        node = self._start_node(name, {"head": False, "gcs_address": self.gcs_address, "num_cpus": self.worker_cpus,
                                       "num_gpus": 0, "resources": self.worker_resources})
        wait_for(f"{name} joined", lambda: self._running(name) and name in self.alive_workers(), timeout)
        return node

    def down(self) -> None:
        """End every process this cluster started: each node process and its descendants (the GCS,
        raylets, workers), then the S3 server. Bounded: SIGTERM, 20 s, then SIGKILL."""
        groups = [node.pid for node in reversed(self.nodes) if node.pid] + ([self.s3_pid] if self.s3_pid else [])
        procs = []
        for pid in groups:
            try:
                parent = psutil.Process(pid)
                procs += [parent] + parent.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for pid in groups:
            _signal_group(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for pid in groups:
            _signal_group(pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        self.nodes, self.s3_pid = [], 0

    # ------------------------------------------------------------ chaos

    def raylet_pid(self, node: Node) -> int:
        """The raylet of `node`, found by its node manager port among the node's own processes."""
        flag = f"--node_manager_port={node.ports['node_manager_port']}"
        for proc in psutil.Process(node.pid).children(recursive=True):
            try:
                if proc.name() == "raylet" and flag in proc.cmdline():
                    return proc.pid
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"{node.name}: no raylet with {flag}")

    def kill_raylet(self, node: Node) -> None:
        """SIGKILL the node's raylet: the node is lost, as a reclaimed spot instance is."""
        os.kill(self.raylet_pid(node), signal.SIGKILL)

    def pause_s3(self) -> None:
        """Freeze the S3 server (SIGSTOP): requests hang, as during a network outage; data is kept."""
        os.kill(self.s3_pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        if self.s3_pid:
            os.kill(self.s3_pid, signal.SIGCONT)

    # ------------------------------------------------------------ what is running where

    def ray_nodes(self) -> list[dict]:
        """The cluster's nodes as the dashboard lists them (node id, state, node manager port)."""
        with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=10) as answer:
            return json.loads(answer.read())["data"]["summary"]

    def alive_workers(self) -> dict[str, str]:
        """Worker name → node id for the workers the head sees alive."""
        try:
            nodes = self.ray_nodes()
        except OSError:
            return {}
        by_port = {n["raylet"]["nodeManagerPort"]: n["raylet"] for n in nodes if n["raylet"]["state"] == "ALIVE"}
        return {node.name: by_port[node.ports["node_manager_port"]]["nodeId"] for node in self.nodes
                if node.name != "head" and node.ports["node_manager_port"] in by_port}

    def node_ids(self) -> dict[str, str]:
        """Name → node id of every node ever started (dead ones included)."""
        by_port = {n["raylet"]["nodeManagerPort"]: n["raylet"]["nodeId"] for n in self.ray_nodes()}
        return {node.name: by_port[node.ports["node_manager_port"]] for node in self.nodes
                if node.ports["node_manager_port"] in by_port}

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    # ------------------------------------------------------------ for scripts/local_cluster.py

    def save(self, path: Path) -> None:
        state = asdict(self)
        path.write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, path: Path) -> "LocalCluster":
        state = json.loads(path.read_text())
        nodes = [Node(**node) for node in state.pop("nodes")]
        return cls(**state, nodes=nodes)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"], "region_name": AWS_ENV["AWS_DEFAULT_REGION"]}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_node(params: dict) -> None:
    """One node's process: start the node's Ray processes, then block until SIGTERM or until one of
    them dies (as `ray start --block` does), and end them all."""
    import threading

    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from ray._private.utils import write_ray_address

    head = params.pop("head")
    node = Node(RayParams(**params), head=head, shutdown_at_exit=False, spawn_reaper=False)
    if head:  # what `ray start --head` leaves for `ray.init(address="auto")`, in this cluster's own folder
        write_ray_address(node.gcs_address, params["temp_dir"])
    print(f"node up: {node.node_id} gcs {node.gcs_address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1):
        if dead := node.dead_processes():
            print(f"node process died: {dead[0][0]}; ending the node", flush=True)
            break
    node.kill_all_processes(check_alive=False, allow_graceful=stop.is_set())


if __name__ == "__main__":
    run_node(json.loads(sys.argv[1]))
