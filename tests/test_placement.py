"""Each kind of actor a spec requests must fit some node: offline against a cluster file
(`dfc-ray cluster validate FILE --spec SPEC`) and at submission against the running cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dfc_ray.placement import actor_requests, check_placeable, node_type_offers, unplaceable
from dfc_ray.spaces import load_spec

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfc_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(REPO)})


def spec_with(tmp_path: Path, custom: dict, base: str = "paper48", **sections) -> str:
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({"extends": base, "name": "custom", "resources": {"custom": custom}} | sections))
    return str(path)


def test_paper48_sends_each_actor_kind_to_its_node_type():
    from dfc_ray.cluster import validate_cluster_file

    offers = node_type_offers(validate_cluster_file(REPO / "cluster.yaml"))
    requests = actor_requests(load_spec("paper48"))
    assert requests["trial"]["trial_gpu"] and requests["judge"]["trial_gpu"] and requests["harvest"]["harvest_gpu"]
    holders = {kind: [name for name in offers if not unplaceable({kind: wants}, {name: offers[name]}, True)]
               for kind, wants in requests.items()}
    assert holders == {"trial": ["gpu_1x"], "judge": ["gpu_1x"], "harvest": ["gpu_8x"]}
    out = cli("cluster", "validate", "cluster.yaml", "--spec", "paper48")
    assert out.returncode == 0, out.stderr
    assert "harvest actors" in out.stdout and "gpu_8x" in out.stdout


def test_a_resource_no_node_type_offers_fails_validation_in_one_line(tmp_path):
    out = cli("cluster", "validate", "cluster.yaml", "--spec", spec_with(tmp_path, {"trial": {"tpu_v9": 1}}))
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tpu_v9=1" in lines[0] and "trial actors" in lines[0], out.stderr


@pytest.mark.parametrize("custom, message", [
    ({"trials": {"trial_gpu": 1}}, "resources.custom has 'trials'"),
    ({"trial": {"trial_gpu": -1}}, "resources.custom.trial.trial_gpu is -1"),
    ({"judge": {"GPU": 1}}, "resources.custom.judge.GPU"),
])
def test_bad_custom_requests_name_the_field(tmp_path, custom, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        actor_requests(load_spec(spec_with(tmp_path, custom)))


def test_harvest_resources_for_a_harvest_the_driver_computes_are_refused(tmp_path):
    """organism48 harvests in its driver (`harvest.executor: local`): resources for harvest actors that will
    never exist are a contradiction, refused in one line naming both fields."""
    with pytest.raises(ValueError, match=r"resources\.custom\.harvest asks for harvest actors, but "
                                         r"harvest\.executor is 'local'"):
        actor_requests(load_spec(spec_with(tmp_path, {"harvest": {"harvest_gpu": 1}}, base="organism48")))


def test_submission_refuses_what_no_live_node_offers(ray_cluster, tmp_path):
    """On a running cluster the check reads the live nodes: a request none offers fails at once."""
    spec = load_spec(spec_with(tmp_path, {"harvest": {"harvest_gpu": 1}}, base="organism48",
                               harvest={"executor": "ray"}))
    with pytest.raises(ValueError, match="harvest actors request harvest_gpu=1 and no node offers it"):
        check_placeable(spec)
