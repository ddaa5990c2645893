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
    if config["provider"]["type"] == "local":  # on-prem: the workers' ray start declares their GPUs
        assert config["available_node_types"]["worker"]["resources"].get("GPU", 0) > 0, "expected GPU workers"
        return
    instance_types = [t["node_config"]["InstanceType"] for t in config["available_node_types"].values()]
    assert any(name.startswith(("g", "p")) for name in instance_types), "expected a GPU worker type"


def _write(tmp_path, mutate, source: str = "cluster.yaml"):
    config = yaml.safe_load((REPO / source).read_text())
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


# ---------------------------------------------------------------- on-prem: Ray's local node provider

ONPREM = REPO / "cluster-onprem.yaml"


def test_onprem_node_types_come_from_the_start_commands():
    """Ray's local provider has one internal node type whose resources Ray detects on each machine;
    dfc-ray reads what the head's and the workers' `ray start` declare."""
    config = validate_cluster_file(ONPREM)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(types) == {"head", "worker"}
    assert types["head"]["resources"] == {"CPU": 0, "GPU": 0}
    assert types["worker"]["resources"] == {"GPU": 4, "trial_gpu": 4, "harvest_gpu": 4}
    workers = config["provider"]["worker_ips"]
    assert types["worker"]["hosts"] == workers and types["worker"]["min_workers"] == types["worker"]["max_workers"] \
        == len(workers)


@pytest.mark.parametrize("command", [
    """export AWS_ENDPOINT_URL=http://10.0.0.5:9000; ray start --address=$RAY_HEAD_IP:6379 --num-gpus 2 \
--resources '{"trial_gpu": 2}'""",
    """ulimit -n 65536 && RAY_memory_monitor_refresh_ms=0 ray start --address=$RAY_HEAD_IP:6379 --num-gpus=2 \
--resources='{"trial_gpu": 2}' || true""",
])
def test_onprem_start_commands_are_read_as_a_shell_runs_them(tmp_path, command):
    """Options in either spelling, after `;`/`&&` and environment assignments (an S3 endpoint for
    MinIO, docs/cluster.md)."""
    path = _write(tmp_path, _worker_start(command), source="cluster-onprem.yaml")
    assert validate_cluster_file(path)["available_node_types"]["worker"]["resources"] == {"GPU": 2, "trial_gpu": 2}


def test_onprem_validate_says_where_each_actor_kind_goes_as_for_the_cloud_file(capsys):
    from dfc_ray.cli import main

    assert main(["cluster", "validate", str(ONPREM), "--spec", "paper48"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for kind in ("trial", "judge", "harvest"):
        assert f"paper48: {kind} actors" in out and f"{kind} actors" in out
    assert out.count("fit node types worker") == 3
    assert "192.0.2.10" in out and "placeholders" in out  # the example's addresses are documentation ones


def test_onprem_spec_asking_for_a_resource_no_machine_offers_fails_in_one_line(tmp_path, capsys):
    from dfc_ray.cli import main

    spec = tmp_path / "custom.yaml"
    spec.write_text(yaml.safe_dump({"extends": "paper48", "name": "custom",
                                    "resources": {"custom": {"judge": {"tpu_v9": 1}}}}))
    assert main(["cluster", "validate", str(ONPREM), "--spec", str(spec)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "judge actors request tpu_v9=1" in lines[0] and str(ONPREM) in lines[0], lines


def _worker_start(command: str):
    return lambda c: c.update(worker_start_ray_commands=["ray stop", command])


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["provider"].pop("head_ip"), "field provider.head_ip is None; expected"),
    (lambda c: c["provider"].update(worker_ips="192.0.2.11"),
     "field provider.worker_ips is '192.0.2.11'; expected a list"),
    (lambda c: c["provider"].update(worker_ips=[]), "field provider.worker_ips is []"),
    (lambda c: c["provider"]["worker_ips"].append("192.0.2.10"), "worker_ips[2] is '192.0.2.10' (the head_ip)"),
    (lambda c: c["provider"]["worker_ips"].append("192.0.2.11"), "worker_ips[2] is '192.0.2.11' (listed twice)"),
    (_worker_start("ray start --address=$RAY_HEAD_IP:6379 --resources='{trial_gpu: 4}'"),
     "worker_start_ray_commands: --resources is '{trial_gpu: 4}', not valid JSON"),
    (_worker_start("""ray start --address=$RAY_HEAD_IP:6379 --resources='{"GPU": 4}'"""), "names GPU"),
    (_worker_start("""ray start --address=$RAY_HEAD_IP:6379 --resources='{"trial_gpu": "four"}'"""),
     "trial_gpu is 'four'; expected a number"),
    (_worker_start("ray start --address=$RAY_HEAD_IP:6379 --num-gpus=four"), "--num-gpus is 'four'; expected a number"),
    (_worker_start("ray stop"), "worker_start_ray_commands has no `ray start` command"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --port=6379"]),
     "head_start_ray_commands has no --num-cpus; expected --num-cpus=0"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --num-cpus 2"]), "sets --num-cpus=2"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --num-cpus=0 --dashboard-host 0.0.0.0"]),
     "binds --dashboard-host to '0.0.0.0'"),
    (lambda c: c.update(available_node_types={"gpu": {"resources": {"trial_gpu": 1}, "node_config": {}}}),
     "field available_node_types is not taken by Ray's local (on-prem) provider"),
])
def test_invalid_onprem_file_names_file_field_and_value(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate, source="cluster-onprem.yaml")
    with pytest.raises(ValueError) as err:
        validate_cluster_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and expected in message, message


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
