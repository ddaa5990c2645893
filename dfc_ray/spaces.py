"""Sweep specs: YAML files naming the pair, the data, the layers and the search space.

A spec is a mapping with these sections (docs/spaces.md has the reference):

    name, description      labels
    extends                another spec (a shipped name like ``organism48`` or a path) to start from;
                           mappings merge key by key, ``null`` removes a key, anything else replaces
    pair                   `PairSpec` fields (a, b, tokenizer, dtype, device, revision)
    harvest                corpus + positions + dtype + batch_size + num_actors (the layers come from
                           `layers`)
    layers                 the layers to harvest; a trial's layer is the ``layer`` axis or the first one
    crosscoder             `DFCConfig` fields fixed for every trial (d_model comes from the pair)
    train                  `TrainConfig` fields + batch_size + reader (ray | local)
    grid                   fixed axes → Optuna GridSampler: ``axis: [values]``; an axis whose values are
                           mappings is a *bundle* (each value sets several fields at once, optional
                           ``name`` label) — that is how unions of designs such as the seed study's
                           48 variants are written
    search                 sampled axes → TPE: ``field: {uniform|loguniform: [lo, hi]}``,
                           ``{int: [lo, hi]}``, ``{choice: [...]}``; with a grid, every grid point is
                           enqueued ``num_samples`` times and TPE samples the rest
    num_samples            trials per grid point (or in all, without a grid)
    objective              ``{metric: delta_a_pp, mode: max}`` or lists for several objectives
    scheduler              ``none`` or ``{asha: {metric, mode, grace_period, reduction_factor}}``
    eval, steering         settings of the evaluator and steering actors
    resources              per-trial CPUs/GPUs, concurrency, actor replicas

Every error is one line naming the file, the field and the value, and what was expected.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from actors.steering import SteerConfig
from dfc_ray.crosscoder import DFCConfig
from dfc_ray.evaluate import EvalConfig
from dfc_ray.pair import PairSpec
from dfc_ray.train import TrainConfig

SECTIONS = ("name", "description", "extends", "pair", "harvest", "layers", "crosscoder", "train", "grid",
            "search", "num_samples", "objective", "scheduler", "eval", "steering", "resources")
HARVEST_FIELDS = {"positions": str, "tasks": str, "n_tasks": int, "plain_text": str, "n_plain": int,
                  "with_responses": bool, "max_tokens": int, "dtype": str, "format": str, "batch_size": int,
                  "shard_rows": int, "num_actors": int, "sink_factor": float}
TRAIN_EXTRA = {"batch_size": int, "reader": str}
DFC_FIELDS = {f.name for f in fields(DFCConfig)} - {"d_model"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
AXIS_FIELDS = DFC_FIELDS | TRAIN_FIELDS | set(TRAIN_EXTRA) | {"layer"}
RESOURCE_FIELDS = {"cpu": float, "gpu": float, "max_concurrent": int, "evaluators": int, "evaluator_cpu": float,
                   "evaluator_gpu": float, "data_cpus": float, "max_failures": int, "custom": dict}
"""`custom`: kind of actor (trial, judge, harvest) → {custom resource: amount}, checked by dfc_ray.placement."""
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
              dict: "a mapping"}
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SHIPPED = Path(__file__).resolve().parents[1] / "search_spaces"


def spaces_dirs() -> list[Path]:
    """Where spec names are looked up: $DFC_RAY_SPACES, ./search_spaces, the shipped folder."""
    dirs = [Path(p) for p in os.environ.get("DFC_RAY_SPACES", "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "search_spaces", SHIPPED]


def find_spec(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    for folder in spaces_dirs():
        candidate = folder / f"{path.stem if path.suffix else name_or_path}.yaml"
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"spec {name_or_path!r}: no such file, and no {path.stem}.yaml in "
                            f"{', '.join(str(d) for d in spaces_dirs())}")


class SpecError(ValueError):
    """A bad spec: the message names the file, the field and the value."""


def _fail(where: str, field_name: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"{where}: field {field_name} = {value!r}: expected {expected}")


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, `null` removes a key, the rest replaces."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(name_or_path: str, _seen: tuple[Path, ...] = ()) -> tuple[dict, str]:
    """The spec's mapping with `extends` resolved, and the file it came from."""
    path = find_spec(name_or_path)
    if path in _seen:
        raise SpecError(f"{path}: field extends forms a cycle ({' -> '.join(p.name for p in _seen + (path,))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise _fail(str(path), unknown[0], raw[unknown[0]], f"one of the sections {', '.join(SECTIONS)}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, str(path)
    if not isinstance(parent, str):
        raise _fail(str(path), "extends", parent, "a spec name or path")
    candidate = (path.parent / parent) if (path.parent / parent).is_file() else parent
    base, _ = load_raw(str(candidate), _seen + (path,))
    base.pop("name", None), base.pop("description", None)
    return _merge(base, raw), str(path)


# ---------------------------------------------------------------- typed sections


def _typed(where: str, section: str, data: Any, schema: dict[str, type]) -> dict[str, Any]:
    """Check a flat section against {field: type}; ints are accepted where floats are expected."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(where, section, data, "a mapping")
    out = {}
    for key, value in data.items():
        if key not in schema:
            raise _fail(where, f"{section}.{key}", value, f"one of {', '.join(sorted(schema))}")
        want = schema[key]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise _fail(where, f"{section}.{key}", value, TYPE_NAMES[want])
        out[key] = value
    return out


def _config(where: str, section: str, data: Any, cls: type) -> Any:
    """A config dataclass built from a section; its own validation errors gain the file's name."""
    data = _dataclass_fields(where, section, data, {f.name for f in fields(cls)})
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: field {section}: {err}") from None


def _dataclass_fields(where: str, section: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(where, section, data, "a mapping")
    for key, value in data.items():
        if key not in allowed:
            raise _fail(where, f"{section}.{key}", value, f"one of {', '.join(sorted(allowed))}")
    return dict(data)


@dataclass(frozen=True)
class Axis:
    """One grid axis: its values as Optuna sees them (labels) and what each value sets."""

    name: str
    labels: tuple[Any, ...]
    settings: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Distribution:
    """One sampled axis."""

    name: str
    kind: str
    args: tuple[Any, ...]

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.args))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.args[0]), int(self.args[1]))
        return trial.suggest_float(self.name, float(self.args[0]), float(self.args[1]), log=self.kind == "loguniform")

    def extremes(self) -> list[Any]:
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


@dataclass
class SweepSpec:
    """A validated sweep spec."""

    name: str
    """Spec name (the file stem unless set)."""
    source: str
    """File it was read from (for messages)."""
    pair: PairSpec
    """The model pair."""
    layers: tuple[int, ...]
    """Layers to harvest (one pass for all)."""
    harvest: dict[str, Any]
    """Harvest settings (HARVEST_FIELDS)."""
    crosscoder: dict[str, Any]
    """DFCConfig fields fixed for every trial."""
    train: dict[str, Any]
    """TrainConfig fields + batch_size + reader fixed for every trial."""
    grid: list[Axis]
    """Fixed axes (GridSampler)."""
    search: list[Distribution]
    """Sampled axes (TPE)."""
    num_samples: int
    """Trials per grid point (or in all without a grid)."""
    metrics: list[str]
    """Objective metric(s)."""
    modes: list[str]
    """"max"/"min" per objective."""
    scheduler: dict[str, Any] | None
    """ASHA settings or None."""
    eval: EvalConfig
    """Evaluator settings (splice measurements)."""
    steering: SteerConfig
    """Steering protocol settings."""
    resources: dict[str, Any]
    """Per-trial resources and pool sizes (RESOURCE_FIELDS)."""
    description: str = ""
    """One-line description."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """The merged mapping (written next to a run for the record)."""

    @property
    def n_grid_points(self) -> int:
        return math.prod(len(a.labels) for a in self.grid) if self.grid else 1

    @property
    def n_trials(self) -> int:
        return self.n_grid_points * self.num_samples

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid point as {axis name: label}, in a stable order."""
        return [dict(zip([a.name for a in self.grid], combo)) for combo in itertools.product(*[a.labels for a in self.grid])]

    def trial_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """Field → value for one trial: fixed sections, then each grid axis's settings, then samples."""
        out = dict(self.crosscoder) | dict(self.train)
        for axis in self.grid:
            out |= axis.settings[axis.labels.index(params[axis.name])]
        for dist in self.search:
            out[dist.name] = params[dist.name]
        out.setdefault("layer", self.layers[0])
        return out


def _grid(where: str, data: Any) -> list[Axis]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise _fail(where, "grid", data, "a mapping of axis: [values]")
    axes = []
    for name, values in data.items():
        if not isinstance(values, list) or not values:
            raise _fail(where, f"grid.{name}", values, "a non-empty list of values")
        if all(isinstance(v, dict) for v in values):  # a bundle axis
            settings, labels = [], []
            for i, entry in enumerate(values):
                entry = dict(entry)
                label = str(entry.pop("name", f"{name}{i}"))
                for key, value in entry.items():
                    if key not in AXIS_FIELDS:
                        raise _fail(where, f"grid.{name}[{i}].{key}", value, "a crosscoder/train field or layer")
                settings.append(entry)
                labels.append(label)
            if len(set(labels)) != len(labels):
                raise _fail(where, f"grid.{name}", labels, "distinct names for the bundle's entries")
            axes.append(Axis(name, tuple(labels), tuple(settings)))
        elif any(isinstance(v, (dict, list)) for v in values):
            raise _fail(where, f"grid.{name}", values, "all scalars, or all mappings (a bundle axis)")
        else:
            if name not in AXIS_FIELDS:
                raise _fail(where, f"grid.{name}", values, "a crosscoder/train field or layer (or a bundle of mappings)")
            if len(set(values)) != len(values):
                raise _fail(where, f"grid.{name}", values, "distinct values")
            axes.append(Axis(name, tuple(values), tuple({name: v} for v in values)))
    return axes


def _search(where: str, data: Any) -> list[Distribution]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise _fail(where, "search", data, "a mapping of field: {distribution: args}")
    out = []
    for name, spec in data.items():
        if name not in AXIS_FIELDS:
            raise _fail(where, f"search.{name}", spec, "a crosscoder/train field or layer")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise _fail(where, f"search.{name}", spec, f"one of {{{'|'.join(DISTRIBUTIONS)}: args}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise _fail(where, f"search.{name}.{kind}", args, "a non-empty list")
        if kind != "choice":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    or not args[0] < args[1]:
                raise _fail(where, f"search.{name}.{kind}", args, "[low, high] numbers with low < high")
            if kind == "loguniform" and args[0] <= 0:
                raise _fail(where, f"search.{name}.{kind}", args, "a positive low bound")
            if kind == "int" and not all(isinstance(a, int) for a in args):
                raise _fail(where, f"search.{name}.{kind}", args, "integer bounds")
        out.append(Distribution(name, kind, tuple(args)))
    return out


def _check_trial(spec: SweepSpec, settings: dict[str, Any], what: str) -> None:
    """Build the trial's configs so impossible combinations fail now, not in trial 37."""
    where = spec.source
    layer = settings["layer"]
    if not isinstance(layer, int) or layer not in spec.layers:
        raise _fail(where, f"layer ({what})", layer, f"one of the harvested layers {list(spec.layers)}")
    dfc = {k: v for k, v in settings.items() if k in DFC_FIELDS}
    share = dfc.get("a_exclusive", 0) + dfc.get("b_exclusive", 0)
    if isinstance(share, (int, float)) and share >= 1:
        raise _fail(where, f"a_exclusive + b_exclusive ({what})", share, "a sum below 1 (some features shared)")
    try:
        DFCConfig(d_model=1, **dfc)
        TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {what}: {err}") from None
    batch = settings.get("batch_size", 0)
    if not isinstance(batch, int) or batch < 1:
        raise _fail(where, f"train.batch_size ({what})", batch, "a positive integer")


def parse_spec(raw: dict[str, Any], where: str, name: str = "") -> SweepSpec:
    """Validate a merged spec mapping into a SweepSpec."""
    raw = dict(raw)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise _fail(where, unknown[0], raw[unknown[0]], f"one of the sections {', '.join(SECTIONS)}")
    try:
        pair = PairSpec.from_dict(raw.get("pair") or {}, where=f"{where}: pair")
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {err}" if not str(err).startswith(where) else str(err)) from None
    layers = raw.get("layers", [1])
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and x >= 0 for x in layers):
        raise _fail(where, "layers", layers, "a non-empty list of block indices >= 0")
    harvest = _typed(where, "harvest", raw.get("harvest"), HARVEST_FIELDS)
    crosscoder = _dataclass_fields(where, "crosscoder", raw.get("crosscoder"), DFC_FIELDS)
    train = _dataclass_fields(where, "train", raw.get("train"), TRAIN_FIELDS | set(TRAIN_EXTRA))
    train.setdefault("batch_size", 1024)
    if train.setdefault("reader", "ray") not in ("ray", "local"):
        raise _fail(where, "train.reader", train["reader"], "'ray' or 'local'")
    grid, search = _grid(where, raw.get("grid")), _search(where, raw.get("search"))
    clash = {a.name for a in grid} & {d.name for d in search}
    if clash:
        raise _fail(where, "search", sorted(clash), "axes not also in grid")
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise _fail(where, "num_samples", num_samples, "a positive integer")
    objective = raw.get("objective") or {"metric": "delta_a_pp", "mode": "max"}
    metrics, modes = objective.get("metric"), objective.get("mode", "max")
    metrics, modes = ([metrics] if isinstance(metrics, str) else metrics), ([modes] if isinstance(modes, str) else modes)
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise _fail(where, "objective.metric", objective.get("metric"), "a metric name or a list of them")
    if len(modes) != len(metrics) or not all(m in ("max", "min") for m in modes):
        raise _fail(where, "objective.mode", objective.get("mode"), f"'max'/'min', one per metric ({len(metrics)})")
    scheduler = raw.get("scheduler") or None
    if scheduler in ("none", None):
        scheduler = None
    elif not (isinstance(scheduler, dict) and set(scheduler) == {"asha"} and isinstance(scheduler["asha"], dict)):
        raise _fail(where, "scheduler", scheduler, "'none' or {asha: {metric, mode, grace_period, reduction_factor}}")
    else:
        scheduler = _typed(where, "scheduler.asha", scheduler["asha"],
                           {"metric": str, "mode": str, "grace_period": int, "reduction_factor": int, "max_t": int})
    spec = SweepSpec(
        name=str(raw.get("name") or name or Path(where).stem), source=where, pair=pair, layers=tuple(layers),
        harvest=harvest, crosscoder=crosscoder, train=train, grid=grid, search=search, num_samples=num_samples,
        metrics=metrics, modes=modes, scheduler=scheduler,
        eval=_config(where, "eval", raw.get("eval"), EvalConfig),
        steering=_config(where, "steering", raw.get("steering"), SteerConfig),
        resources=_typed(where, "resources", raw.get("resources"), RESOURCE_FIELDS),
        description=str(raw.get("description", "")), raw=raw)
    # Every grid point with the extremes of every sampled axis must make a valid trial.
    extremes = [[(d.name, v) for v in d.extremes()] for d in spec.search]
    for point in spec.grid_points():
        for sampled in itertools.product(*extremes) if extremes else [()]:
            params = point | dict(sampled)
            _check_trial(spec, spec.trial_settings(params), f"grid point {point}" + (f" with {dict(sampled)}" if sampled else ""))
    return spec


def load_spec(name_or_path: str) -> SweepSpec:
    """Read, merge (`extends`) and validate a spec by shipped name or path."""
    raw, where = load_raw(name_or_path)
    return parse_spec(raw, where, Path(where).stem)


# ---------------------------------------------------------------- CLI


def _list_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sweep specs")
    for column in ("name", "trials", "layers", "pair", "description", "file"):
        table.add_column(column)
    seen = set()
    for folder in spaces_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                spec = load_spec(str(path))
                table.add_row(spec.name, str(spec.n_trials), str(list(spec.layers)), f"{spec.pair.a} / {spec.pair.b}",
                              spec.description, str(path))
            except (ValueError, FileNotFoundError) as err:
                table.add_row(path.stem, "-", "-", "-", f"[red]invalid: {err}", str(path))
    Console().print(table)
    return 0


def _show_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.syntax import Syntax

    spec = load_spec(args.spec)
    console = Console()
    console.print(f"[bold]{spec.name}[/] ({spec.source}): {spec.n_trials} trials, "
                  f"{len(spec.grid)} grid axes, {len(spec.search)} sampled axes, layers {list(spec.layers)}")
    console.print(Syntax(yaml.safe_dump(spec.raw, sort_keys=False), "yaml"))
    return 0


def _validate_command(args: argparse.Namespace) -> int:
    for name in args.specs:
        spec = load_spec(name)
        print(f"{spec.source}: valid, {spec.n_trials} trials")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    spaces = subparsers.add_parser("spaces", help="List, show and validate sweep specs (search_spaces/*.yaml).")
    actions = spaces.add_subparsers(dest="spaces_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="Every spec found, with its trial count.").set_defaults(func=_list_command)
    show = actions.add_parser("show", help="A spec after `extends` is merged.")
    show.add_argument("spec", help="shipped name (organism48) or path")
    show.set_defaults(func=_show_command)
    validate = actions.add_parser("validate", help="Validate specs; one clear error for the first problem.")
    validate.add_argument("specs", nargs="+", help="shipped names or paths")
    validate.set_defaults(func=_validate_command)
