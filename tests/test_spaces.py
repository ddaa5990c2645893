"""Sweep specs: the shipped ones are valid and mean what they say; bad specs fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dfc_ray.config import ORGANISM_PAIRS
from dfc_ray.spaces import MAX_EXTENDS_DEPTH, SpecError, check_against_pair, load_spec

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_specs_are_valid(path):
    spec = load_spec(str(path))
    assert spec.n_trials >= 4 and spec.metrics
    notes = check_against_pair(spec)  # the pair's config.json and the task sources agree with the spec
    hub = [ref for ref in (spec.pair.a, spec.pair.b) if ref not in ORGANISM_PAIRS and not Path(ref).exists()]
    assert all(any(repr(ref) in note and "not probed" in note for note in notes) for ref in hub), notes


def test_paper48_is_the_seed_studys_design():
    spec = load_spec("paper48")
    assert (spec.pair.b, spec.layers, spec.n_trials) == ("Qwen/Qwen2.5-3B", (13,), 48)
    trials = [spec.trial_settings(p) for p in spec.grid_points()]
    assert {t["dict_size"] for t in trials} == {8192, 16384} and {t["k"] for t in trials} == {45, 90, 160}
    dfc = [t for t in trials if t["a_exclusive"] > 0]
    plain = [t for t in trials if t["a_exclusive"] == 0]
    assert len(dfc) == 36 and len(plain) == 12
    designs = {(share, lam) for share in (0.03, 0.05, 0.10) for lam in (0.0, 1e-3)}
    assert {(t["a_exclusive"], t["l1_excl"]) for t in dfc} == designs
    assert {t["l1_shared"] for t in plain} == {0.0, 1e-3} and all(t["b_exclusive"] == t["a_exclusive"] for t in trials)
    first = trials[0]
    assert (first["steps"], first["batch_size"], first["lr"], first["sparsity"]) == (9000, 1024, 1e-4, "topk")
    assert len({tuple(sorted(t.items())) for t in trials}) == 48


def test_extends_merges_and_null_removes():
    layers = load_spec("layers")
    assert [a.name for a in layers.grid] == ["layer"] and layers.layers == (0, 1, 2, 3)
    assert {layers.trial_settings(p)["layer"] for p in layers.grid_points()} == {0, 1, 2, 3}
    assert layers.crosscoder["dict_size"] == 1536 and layers.eval == load_spec("organism48").eval
    explore = load_spec("explore")
    assert not explore.grid and explore.n_trials == 24 and explore.scheduler.metric == "fvu"


def write(tmp_path, data, name="spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


BASE = {"pair": {"a": "organism", "b": "organism"}, "layers": [1], "train": {"batch_size": 64},
        "grid": {"dict_size": [256], "k": [8]}}


@pytest.mark.parametrize("change, expected", [
    ({"bogus": 1}, "field bogus = 1: expected one of the sections"),
    ({"train": {"batch_size": 64, "stepz": 3}}, "field train.stepz = 3"),
    ({"harvest": {"n_tasks": "many"}}, "field harvest.n_tasks = 'many': expected an integer"),
    ({"grid": {"k": []}}, "field grid.k = []: expected a non-empty list"),
    ({"grid": {"k": [8], "dict_size": [4]}}, "DFCConfig.k=8: expected at most dict_size=4"),
    ({"grid": {"dict_size": [256], "k": [8], "v": [{"a_exclusive": 0.6, "b_exclusive": 0.5}]}},
     "a_exclusive + b_exclusive"),
    ({"grid": {"dict_size": [256], "k": [8], "layer": [1, 5]}}, "expected one of the harvested layers [1]"),
    ({"search": {"lr": {"loguniform": [0, 1]}}}, "field search.lr.loguniform = [0, 1]: expected a positive low bound"),
    ({"search": {"k": {"normal": [1, 2]}}}, "field search.k"),
    ({"grid": {"dict_size": [256], "k": [8], "positions": ["all_tokens", "everywhere"]}},
     "field positions (grid point {'dict_size': 256, 'k': 8, 'positions': 'everywhere'}) = 'everywhere': "
     "expected one of"),
    ({"grid": {"dict_size": [256], "k": [8], "v": [{"positions": "response"}]}}, "= 'response': expected one of"),
    ({"search": {"positions": {"uniform": [0, 1]}}}, "field search.positions = {'uniform': [0, 1]}: expected {choice"),
    ({"objective": {"metric": "delta_a_pp", "mode": "up"}}, "field objective.mode = 'up'"),
    ({"pair": {"a": "organism", "c": 1}}, "field pair.c = 1: expected one of a, b, device"),
    ({"crosscoder": {"sparsity": "dense"}}, "field crosscoder.sparsity = 'dense': expected 'topk' or 'batchtopk'"),
    ({"steering": {"top_n": "x"}}, "field steering.top_n = 'x': expected an integer"),
    ({"steering": {"top_n": 0}}, "field steering.top_n = 0: expected a positive integer"),
    ({"resources": {"evaluators": 1.5}}, "field resources.evaluators = 1.5: expected an integer"),
    ({"scheduler": {"asha": {"mode": "up"}}}, "field scheduler.asha.mode = 'up': expected 'max' or 'min'"),
    ({"train": {"batch_size": 64, "reader": "disk"}}, "field train.reader = 'disk': expected 'ray' or 'local'"),
])
def test_bad_specs_name_file_field_and_value(tmp_path, change, expected):
    path = write(tmp_path, BASE | change)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path) and expected in message, message


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(str(tmp_path / "a.yaml"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_spec(write(tmp_path, {"extends": "nope"}, "c.yaml"))


def test_extends_chain_depth_is_bounded_and_named(tmp_path):
    def chain(n: int) -> str:  # n files of the user's, then organism48
        for i in range(n):
            write(tmp_path, f"extends: {f's{i + 1}.yaml' if i + 1 < n else 'organism48'}\n", f"s{i}.yaml")
        return str(tmp_path / "s0.yaml")

    assert load_spec(chain(MAX_EXTENDS_DEPTH - 1)).n_trials == 48  # 16 files with organism48: the limit
    with pytest.raises(SpecError, match=r"s0.yaml: field extends: a chain of more than 16 specs \(s0.yaml -> s1"):
        load_spec(chain(MAX_EXTENDS_DEPTH))


def test_yaml_bounds_keep_anchors_and_merge_keys_working(tmp_path):
    """Anchors, aliases and merge keys a spec writer uses still load (an overridden merged key is not a
    duplicate); what the bounds count is the expanded document; an alias inside itself is refused."""
    from dfc_ray.yamlio import checked_size, load_yaml

    path = write(tmp_path, "base: &base {steps: 5, lr: 0.1}\ntrain: {<<: *base, steps: 7}\n", "anchors.yaml")
    assert load_yaml(path) == {"base": {"steps": 5, "lr": 0.1}, "train": {"steps": 7, "lr": 0.1}}
    assert checked_size(yaml.compose("a: &x [1, 2]\nb: *x\n")) == 9  # mapping, 2 keys, the list (3 nodes) twice
    nested = "c: &c {x: 1}\nb: &b {<<: *c, x: 2}\na: {<<: *b, x: 3}\n"  # merges of merges, each overriding x
    assert load_yaml(write(tmp_path, nested, "nested.yaml"))["a"] == {"x": 3}
    with pytest.raises(ValueError, match="an alias that contains itself"):
        load_yaml(write(tmp_path, "a: &x [1, *x]\n", "loop.yaml"))
    assert load_yaml(write(tmp_path, "", "empty.yaml")) is None


def test_names_from_file_stems_and_oversized_sampling_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the spec name taken from the file name = 'my spec'"):
        load_spec(write(tmp_path, BASE, "my spec.yaml"))
    fields = ("k", "lr", "l1_excl", "l1_shared", "aux_coef", "warmup_steps")
    search = {name: {"choice": [i + 1 for i in range(10)]} for name in fields}  # 10⁶ combinations of extremes
    with pytest.raises(SpecError, match="at most 100,000 grid points × sampled-axis extremes to check"):
        load_spec(write(tmp_path, BASE | {"grid": None, "crosscoder": {"dict_size": 256}, "search": search}))


def test_positions_is_an_axis_with_one_harvest_per_value(tmp_path):
    spec = load_spec("organism-positions")
    values = ["all_tokens", "last_prompt_token", "mix_last_prompt"]
    assert spec.positions_values() == values and spec.n_trials == 12
    assert {spec.trial_positions(spec.trial_settings(p)) for p in spec.grid_points()} == set(values)
    assert load_spec("organism48").positions_values() == ["all_tokens"]  # the harvest section's, no axis
    bundled = load_spec(write(tmp_path, BASE | {"harvest": {"positions": "prompt"}, "grid": {
        "dict_size": [256], "k": [8], "data": [{"name": "last", "positions": "last_prompt_token"}, {"name": "same"}]}}))
    assert bundled.positions_values() == ["last_prompt_token", "prompt"]  # a bundle without positions: the harvest's
    assert [bundled.trial_positions(bundled.trial_settings(p)) for p in bundled.grid_points()] == \
        ["last_prompt_token", "prompt"]


def test_user_spec_extends_a_shipped_one(tmp_path):
    spec = load_spec(write(tmp_path, {"extends": "organism48", "train": {"steps": 7}, "grid": {"k": [4]}}))
    assert spec.n_trials == 16 and spec.train["steps"] == 7


def test_spaces_cli(capsys):
    from dfc_ray.cli import main

    assert main(["spaces", "list"]) == 0
    out = capsys.readouterr().out
    assert "organism48" in out and "paper48" in out
    assert main(["spaces", "validate", "organism48", "layers"]) == 0
    assert main(["spaces", "show", "layers"]) == 0 and "1536" in capsys.readouterr().out
    assert main(["spaces", "validate", "does-not-exist"]) == 2


def test_spaces_list_fits_80_columns_with_whole_descriptions(capsys, monkeypatch):
    """Each spec's description wraps at the terminal's width (a six-column table put one word per line)."""
    from dfc_ray.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["spaces", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    start = next(i for i, line in enumerate(lines) if line.startswith("organism48 · 48 trials · block 1 · pair "))
    description = " ".join(line.strip() for line in lines[start + 1:start + 3])
    assert description == load_spec("organism48").description
    assert len(lines) < 8 * len({line.split(" · ")[0] for line in lines if " trials · " in line})


def test_a_spec_can_set_every_harvest_field(tmp_path):
    """The flat `harvest` section is HarvestConfig's own fields plus CorpusSpec's (the spec's pair and
    layers sections set the rest): each one, set to a non-default value, reaches the HarvestConfig."""
    from dataclasses import fields

    from dfc_ray.config import CorpusSpec, HarvestConfig
    from dfc_ray.spaces import HARVEST_SET_BY_SPEC

    values = {"tasks": "organism:dev", "n_tasks": 7, "plain_text": "", "n_plain": 3, "with_responses": True,
              "max_new_tokens": 9, "max_tokens": 99, "seed": 5, "positions": "prompt_and_response",
              "dtype": "bfloat16", "format": "safetensors", "shard_rows": 11, "batch_size": 4, "sink_factor": 2.5,
              "num_actors": 2, "gpus_per_actor": 0.5, "cpu_threads": 3, "executor": "local"}
    settable = {f.name for f in fields(CorpusSpec)} | {f.name for f in fields(HarvestConfig)} - HARVEST_SET_BY_SPEC
    assert set(values) == settable
    spec = load_spec(write(tmp_path, BASE | {"harvest": values}))
    got = {f.name: getattr(spec.harvest.corpus, f.name) for f in fields(CorpusSpec)} | \
        {name: getattr(spec.harvest, name) for name in settable - {f.name for f in fields(CorpusSpec)}}
    assert got == values
    assert spec.harvest.layers == (1,) and spec.harvest.pair == spec.pair


def test_docs_field_reference_is_generated_from_the_dataclasses():
    """docs/spaces.md lists exactly the fields a spec accepts (regenerate with `dfc-ray spaces fields`)."""
    from dfc_ray.spaces import field_reference

    text = (Path(__file__).resolve().parents[1] / "docs" / "spaces.md").read_text()
    block = text.split("<!-- fields:start -->\n", 1)[1].split("<!-- fields:end -->", 1)[0]
    assert block == field_reference()
    for stale in ("`bootstrap`", "`text_sample`", "`dev`", "`max_set`"):
        assert stale not in text
