"""The configuration module: one validator, one from_mapping, and the intervention modes declared once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import get_args

import pytest
import torch

from dfc_ray import config
from dfc_ray.config import (SPLICE_MODES, STEER_SITES, EvalConfig, check_name, HarvestConfig, Resources, SpecError,
                            SpliceModeName, SteerConfig, SteerPositionsName, from_mapping)
from dfc_ray.generation import HookContext
from dfc_ray.interventions import add_hook, prefill_edit_hook

CONFIGS = [cls for _, cls in inspect.getmembers(config, inspect.isclass)
           if dataclasses.is_dataclass(cls) and cls.__module__ == "dfc_ray.config"]


def test_every_field_has_a_docstring():
    """A docstring under every field: the string statement right after each annotated field."""
    tree = ast.parse(Path(config.__file__).read_text())
    for node in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in {c.__name__ for c in CONFIGS}):
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str), f"{node.name}.{stmt.target.id} has no docstring"


@pytest.mark.parametrize("cls, bad, message", [
    (SteerConfig, {"top_n": 0}, "SteerConfig.top_n=0: expected a positive integer"),
    (SteerConfig, {"scale": "huge"}, "SteerConfig.scale='huge': expected 'residual_norm' or 'activation' or 'decoder'"),
    (SteerConfig, {"targets": ("a", "c")}, "SteerConfig.targets=('a', 'c')"),
    (SteerConfig, {"min_set_share": 0.0}, "SteerConfig.min_set_share=0.0: expected a number in (0, 1]"),
    (EvalConfig, {"n_tasks": -1}, "EvalConfig.n_tasks=-1: expected an integer >= 0"),
    (EvalConfig, {"batch_size": True}, "EvalConfig.batch_size=True: expected an integer"),
    (Resources, {"max_concurrent": 0}, "Resources.max_concurrent=0: expected a positive integer"),
])
def test_the_shared_validator_names_class_field_value_and_expectation(cls, bad, message):
    with pytest.raises(ValueError) as err:
        cls(**bad)
    assert str(err.value).startswith(message), str(err.value)


def test_yaml_values_are_coerced_to_the_annotation():
    steer = SteerConfig(alphas=[1, 2], targets=["a"])
    assert steer.alphas == (1.0, 2.0) and isinstance(steer.alphas[0], float) and steer.targets == ("a",)
    assert Resources(cpu=2).cpu == 2.0 and isinstance(Resources(cpu=2).cpu, float)


def test_from_mapping_names_the_file_and_the_yaml_path():
    with pytest.raises(SpecError, match=r"^o.yaml: field steering.top_n = 'x': expected an integer$"):
        from_mapping(SteerConfig, {"top_n": "x"}, "o.yaml", "steering")
    with pytest.raises(SpecError, match=r"^o.yaml: field harvest.corpus.n_tasks = -2: expected an integer >= 0$"):
        from_mapping(HarvestConfig, {"corpus": {"n_tasks": -2}}, "o.yaml", "harvest", store="s")
    with pytest.raises(SpecError, match=r"^o.yaml: field eval.bogus = 1: expected one of batch_size, "):
        from_mapping(EvalConfig, {"bogus": 1}, "o.yaml", "eval")
    assert from_mapping(SteerConfig, None, "o.yaml", "steering") == SteerConfig()


def test_modes_are_declared_once_with_their_literal():
    assert get_args(SpliceModeName) == tuple(SPLICE_MODES)
    assert get_args(SteerPositionsName) == tuple(STEER_SITES)
    assert EvalConfig(splice_mode="prompt").splice is SPLICE_MODES["prompt"]


@pytest.mark.parametrize("name", list(STEER_SITES))
def test_each_steer_site_steers_exactly_where_it_says(name):
    """The hook touches prompt positions iff in_prefill (only the last one iff leaves_prefix_alone),
    decode positions iff in_decode, and is marked for the prefix cache iff leaves_prefix_alone."""
    site, delta = STEER_SITES[name], torch.ones(8)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    hook = add_hook(delta, name)
    out = hook(torch.zeros(2, 3, 8), HookContext.for_forward(mask))
    if not site.in_prefill:
        assert out is None
    else:
        touched = out.abs().sum(-1) > 0
        expected = torch.zeros_like(mask)
        expected[:, -1] = True
        assert torch.equal(touched, expected if site.leaves_prefix_alone else mask)
    step = HookContext(1, False, torch.ones(2, 1, dtype=torch.bool), None, torch.arange(2))
    assert (hook(torch.zeros(2, 1, 8), step) is not None) == site.in_decode
    assert getattr(hook, "leaves_prefix_alone", False) == site.leaves_prefix_alone


@pytest.mark.parametrize("name", [n for n, m in SPLICE_MODES.items() if m.positions != "all"])
def test_each_prefill_splice_mode_edits_where_it_says(name):
    mode = SPLICE_MODES[name]
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    other = [torch.ones(2, 4), torch.ones(3, 4)]
    hook = prefill_edit_hook(lambda pair: pair[:, 1] + 1, "a", other, name)
    touched = hook(torch.zeros(2, 3, 4), HookContext.for_forward(mask)).abs().sum(-1) > 0
    expected = torch.zeros_like(mask)
    expected[:, -1] = True
    assert torch.equal(touched, expected if mode.leaves_prefix_alone else mask)
    assert getattr(hook, "leaves_prefix_alone", False) == mode.leaves_prefix_alone


@pytest.mark.parametrize("value", ["../x", "a/b", "..", ".", "a..b", "", "x y", {"x": 1}, 3])
def test_check_name_refuses_names_that_could_leave_their_folder(value):
    with pytest.raises(ValueError, match="spec name = .*expected a name"):
        check_name(value, "spec name")


def test_check_name_keeps_a_safe_name():
    assert check_name("organism48-2026.12_04", "spec name") == "organism48-2026.12_04"
