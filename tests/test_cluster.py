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
