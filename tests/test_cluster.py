"""Every shipped cluster YAML passes Ray's own autoscaler schema and dfc-ray's rules, offline."""

from pathlib import Path

import pytest
import yaml

from dfc_ray.cluster import validate_cluster_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.glob("cluster*.yaml"))


def test_a_cluster_file_is_shipped():
    assert SHIPPED, "expected cluster.yaml at the repository root"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_cluster_file_is_valid(path):
    config = validate_cluster_file(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    instance_types = [t["node_config"]["InstanceType"] for t in config["available_node_types"].values()]
    assert any(name.startswith(("g", "p")) for name in instance_types), "expected a GPU worker type"


def _write(tmp_path, mutate):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers="two"),
         "available_node_types.gpu_1x.min_workers"),
        (lambda c: c.update(unknown_field=1), "unknown_field"),
        (lambda c: c["available_node_types"]["head"].update(resources={}), "resources.CPU"),
        (lambda c: c.update(head_start_ray_commands=["ray start --head --dashboard-host=0.0.0.0"]), "0.0.0.0"),
        (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=9), "min_workers is 9"),
    ],
)
def test_invalid_cluster_file_names_file_and_field(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ValueError) as err:
        validate_cluster_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and expected in message


def test_cli_validate(capsys):
    from dfc_ray.cli import main

    assert main(["cluster", "validate", str(REPO / "cluster.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


LISTENERS = r"""
import json, os, sys, time
import ray
import psutil  # Ray ships it (ray/thirdparty_files), on sys.path once ray is imported

from dfc_ray.cluster import connect

connect(num_cpus=1)

@ray.remote
class Probe:
    def ping(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.ping.remote())  # a worker with its own gRPC server
me = psutil.Process()

def ours():
    return [p for p in me.children(recursive=True)]  # every Ray process this driver started

listening = []
for proc in [me] + ours():
    try:
        name = " ".join(proc.cmdline()[:2])[-80:]
        listening += [[proc.pid, name, c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        continue
started = [p.pid for p in ours()]
ray.shutdown()
deadline = time.time() + 60  # bounded: Ray's processes exit on their own after shutdown
while time.time() < deadline and any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                                     for pid in started):
    time.sleep(0.5)
alive = [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
print(json.dumps({"listening": listening, "alive": alive}))
"""


def test_local_cluster_listens_on_loopback_only_and_ends_with_the_driver(tmp_path):
    """A cluster started the way `dfc-ray sweep` starts one (cluster.connect): every socket its Ray
    processes listen on is a loopback address (GCS, raylet, driver, actor, agents), and none of
    those processes outlives ray.shutdown()."""
    import ipaddress
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", LISTENERS], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found["listening"]) >= 4, found  # GCS, raylet, driver, actor at least
    exposed = [entry for entry in found["listening"]
               if not ipaddress.ip_address(entry[2].removeprefix("::ffff:")).is_loopback]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert not found["alive"], f"Ray processes still running after ray.shutdown(): {found['alive']}"
