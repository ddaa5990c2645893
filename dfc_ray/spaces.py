"""Sweep specs: YAML files naming the pair, the data, the layers and the search space.

A spec is a mapping with these sections (docs/spaces.md has the reference):

    name, description      labels
    extends                another spec (a shipped name like ``organism48`` or a path) to start from;
                           mappings merge key by key, ``null`` removes a key, anything else replaces
    pair                   `PairSpec` fields (a, b, tokenizer, dtype, device, revision)
    harvest                every `HarvestConfig` and `CorpusSpec` field, flat (the store, layers and
                           pair come from elsewhere)
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
    resources              `Resources`: per-trial CPUs/GPUs, concurrency, actor replicas

Sections become the dataclasses of dfc_ray/config.py through `from_mapping`, so a field exists in a spec
exactly where it exists in a dataclass (`dfc-ray spaces fields` lists them). Every error is one line
naming the file, the field and the value, and what was expected.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from dfc_ray.config import (ORGANISM_PAIRS, POSITIONS, Asha, CorpusSpec, DFCConfig, EvalConfig, HarvestConfig,
                            JudgeProtocol, Objective, PairSpec, Resources, SpecError, SteerConfig, TrainConfig,
                            TrainExtra, check_fields, check_name, defaults, field_docs, from_mapping, hints,
                            seed_training)
from dfc_ray.config import spec_error as _fail
from dfc_ray.metrics import find as find_metric
from dfc_ray.metrics import names as metric_names
from dfc_ray.tooluse.dialects import resolve_dialect
from dfc_ray.tooluse.tasks import dev_test_tasks, load_tasks
from dfc_ray.yamlio import load_yaml

SECTIONS = ("name", "description", "extends", "pair", "harvest", "layers", "crosscoder", "train", "grid",
            "search", "num_samples", "objective", "scheduler", "eval", "steering", "resources")
HARVEST_SET_BY_SPEC = frozenset({"store", "layers", "pair", "corpus", "resources"})
"""HarvestConfig fields the spec's other sections set (`resources` comes from `resources.custom.harvest`);
the rest, with CorpusSpec's, are the flat `harvest` section."""
DFC_FIELDS = {f.name for f in fields(DFCConfig)} - {"d_model"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
HARVEST_AXES = frozenset({"positions"})
"""Harvest fields that may vary between trials: each distinct value is harvested once (docs/spaces.md)."""
AXIS_FIELDS = DFC_FIELDS | TRAIN_FIELDS | {f.name for f in fields(TrainExtra)} | {"layer"} | HARVEST_AXES
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SHIPPED = Path(__file__).resolve().parents[1] / "search_spaces"
MAX_EXTENDS_DEPTH = 16
"""Longest `extends` chain followed (the shipped specs use at most 2)."""
MAX_TRIALS = 10_000
"""Most trials a spec may ask for (grid points × num_samples): each is a Tune trial with its own
checkpoint and judging; the seed study's design is 48."""
MAX_CHECKED_COMBINATIONS = 100_000
"""Most (grid point × sampled-axis extreme) combinations `parse_spec` builds configs for."""


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
    chain = " -> ".join(p.name for p in _seen + (path,))
    if path in _seen:
        raise SpecError(f"{path}: field extends forms a cycle ({chain})")
    if len(_seen) >= MAX_EXTENDS_DEPTH:
        raise SpecError(f"{_seen[0]}: field extends: a chain of more than {MAX_EXTENDS_DEPTH} specs ({chain}); "
                        f"expected at most {MAX_EXTENDS_DEPTH}")
    try:
        raw = load_yaml(path) or {}
    except ValueError as err:
        raise SpecError(str(err)) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    _check_sections(raw, str(path))
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, str(path)
    if not isinstance(parent, str):
        raise _fail(str(path), "extends", parent, "a spec name or path")
    candidate = (path.parent / parent) if (path.parent / parent).is_file() else parent
    base, _ = load_raw(str(candidate), _seen + (path,))
    base.pop("name", None), base.pop("description", None)
    return _merge(base, raw), str(path)


def _check_sections(raw: dict, where: str) -> None:
    """Refuse a top-level key that is not a section, whatever YAML made of it (``1:`` is an integer, ``~:``
    None): one line naming the first, in the file's order."""
    unknown = [key for key in raw if key not in SECTIONS]
    if unknown:
        raise _fail(where, unknown[0] if isinstance(unknown[0], str) else repr(unknown[0]), raw[unknown[0]],
                    f"one of the sections {', '.join(SECTIONS)}")


PLAIN_TYPES = (dict, list, str, int, float, bool, type(None))
"""What a spec's values may be: what JSON can hold (run.json and results.jsonl record the spec as JSON)."""


def _check_plain_values(value: Any, where: str, path: str = "") -> None:
    """Refuse a value JSON cannot hold, such as the date YAML makes of an unquoted ``2024-05-01`` or the
    bytes of ``!!binary``: found now, not as a traceback once the run folder holds spec.yaml."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain_values(item, where, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_values(item, where, f"{path}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise _fail(where, path, value, f"a string, number, true/false, list or mapping, not a YAML "
                    f"{type(value).__name__} (quote it: '{value}')")


# ---------------------------------------------------------------- typed sections


def _harvest(where: str, data: Any, layers: tuple[int, ...], pair: PairSpec, protocol: JudgeProtocol) -> HarvestConfig:
    """The flat `harvest` section (HarvestConfig's own fields and CorpusSpec's) as a HarvestConfig; the
    store is set when the sweep runs. A seed-based protocol trains on the study's data (text_end over
    transcripts with A's replies, config.seed_training) unless the section sets `positions`: then the
    section's corpus is kept as it says."""
    corpus_names = {f.name for f in fields(CorpusSpec)}
    own = {name: hint for name, hint in hints(HarvestConfig).items() if name not in HARVEST_SET_BY_SPEC}
    checked = check_fields(CorpusSpec, data, where, "harvest", extra=own)
    if protocol.base == "seed" and "positions" not in checked:  # the study's training data, as one unit
        seed = seed_training(HarvestConfig(store=""))
        checked = {"positions": seed.positions, "with_responses": seed.corpus.with_responses} | checked
    corpus = from_mapping(CorpusSpec, {k: v for k, v in checked.items() if k in corpus_names}, where, "harvest")
    rest = {k: v for k, v in checked.items() if k not in corpus_names}
    return from_mapping(HarvestConfig, rest, where, "harvest", store="", layers=layers, pair=pair, corpus=corpus)


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
    harvest: HarvestConfig
    """Harvest settings, with the spec's layers and pair (the store is set when the sweep runs)."""
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
    scheduler: Asha | None
    """ASHA settings or None."""
    eval: EvalConfig
    """Evaluator settings (splice measurements)."""
    steering: SteerConfig
    """Steering protocol settings."""
    resources: Resources
    """Per-trial resources and pool sizes."""
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
        names = [a.name for a in self.grid]
        return [dict(zip(names, combo)) for combo in itertools.product(*[a.labels for a in self.grid])]

    def trial_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """Field → value for one trial: fixed sections, then each grid axis's settings, then samples."""
        out = dict(self.crosscoder) | dict(self.train)
        for axis in self.grid:
            out |= axis.settings[axis.labels.index(params[axis.name])]
        for dist in self.search:
            out[dist.name] = params[dist.name]
        out.setdefault("layer", self.layers[0])
        return out

    def positions_values(self) -> list[str]:
        """The distinct harvest `positions` the trials train on, in first-use order: the harvest
        section's alone unless `positions` is an axis (or a bundle field)."""
        sampled = [list(d.args) for d in self.search if d.name == "positions"]
        if sampled:  # sampled last, it overrides any grid value
            return list(dict.fromkeys(sampled[0]))
        values = []
        for point in self.grid_points():
            settings: dict[str, Any] = {}
            for axis in self.grid:
                settings |= axis.settings[axis.labels.index(point[axis.name])]
            values.append(self.trial_positions(settings))
        return list(dict.fromkeys(values))

    def corner_trials(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, `trial_settings`) of every grid point with every combination of the sampled axes'
        extremes: the trials whose configs bound every other one (validation checks each)."""
        extremes = [[(d.name, v) for v in d.extremes()] for d in self.search]
        combinations = self.n_grid_points * math.prod(len(values) for values in extremes)
        if combinations > MAX_CHECKED_COMBINATIONS:
            raise _fail(self.source, "search", {d.name: len(d.extremes()) for d in self.search},
                        f"at most {MAX_CHECKED_COMBINATIONS:,} grid points × sampled-axis extremes to check; "
                        f"the spec has {combinations:,} (fewer choice values or axes)")
        for point in self.grid_points():
            for sampled in itertools.product(*extremes) if extremes else [()]:
                yield (f"grid point {point}" + (f" with {dict(sampled)}" if sampled else ""),
                       self.trial_settings(point | dict(sampled)))

    def trial_positions(self, settings: dict[str, Any]) -> str:
        """The harvest positions one trial trains on (its `trial_settings`)."""
        return settings.get("positions", self.harvest.positions)


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
                        raise _fail(where, f"grid.{name}[{i}].{key}", value,
                                    "a crosscoder/train field, layer or positions")
                settings.append(entry)
                labels.append(label)
            if len(set(labels)) != len(labels):
                raise _fail(where, f"grid.{name}", labels, "distinct names for the bundle's entries")
            axes.append(Axis(name, tuple(labels), tuple(settings)))
        elif any(isinstance(v, (dict, list)) for v in values):
            raise _fail(where, f"grid.{name}", values, "all scalars, or all mappings (a bundle axis)")
        else:
            if name not in AXIS_FIELDS:
                raise _fail(where, f"grid.{name}", values,
                            "a crosscoder/train field, layer or positions (or a bundle of mappings)")
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
            raise _fail(where, f"search.{name}", spec, "a crosscoder/train field, layer or positions")
        if name in HARVEST_AXES and (not isinstance(spec, dict) or next(iter(spec), None) != "choice"):
            raise _fail(where, f"search.{name}", spec, "{choice: [values]} (each value is harvested before trials)")
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
    if spec.trial_positions(settings) not in POSITIONS:
        raise _fail(where, f"positions ({what})", settings["positions"], f"one of {', '.join(POSITIONS)}")
    dfc = {k: v for k, v in settings.items() if k in DFC_FIELDS}
    try:
        DFCConfig(d_model=1, **dfc)
        TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
        TrainExtra(**{f.name: settings[f.name] for f in fields(TrainExtra)})
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {what}: {err}") from None


def parse_spec(raw: dict[str, Any], where: str, name: str = "") -> SweepSpec:
    """Validate a merged spec mapping into a SweepSpec."""
    raw = dict(raw)
    _check_sections(raw, where)
    _check_plain_values(raw, where)
    pair = from_mapping(PairSpec, raw.get("pair"), where, "pair")
    layers = raw.get("layers", [1])
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and x >= 0 for x in layers):
        raise _fail(where, "layers", layers, "a non-empty list of block indices >= 0")
    evaluation = from_mapping(EvalConfig, raw.get("eval"), where, "eval")
    harvest = _harvest(where, raw.get("harvest"), tuple(layers), pair, evaluation.protocol)
    crosscoder = check_fields(DFCConfig, raw.get("crosscoder"), where, "crosscoder", skip=frozenset({"d_model"}))
    train = defaults(TrainExtra) | check_fields(TrainConfig, raw.get("train"), where, "train", extra=hints(TrainExtra))
    grid, search = _grid(where, raw.get("grid")), _search(where, raw.get("search"))
    clash = {a.name for a in grid} & {d.name for d in search}
    if clash:
        raise _fail(where, "search", sorted(clash), "axes not also in grid")
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise _fail(where, "num_samples", num_samples, "a positive integer")
    goal = from_mapping(Objective, raw.get("objective") or {}, where, "objective")
    metrics, modes = goal.metrics, goal.modes
    for metric in metrics:
        if find_metric(metric) is None:
            raise _fail(where, "objective.metric", metric, "a metric trials report (dfc_ray/metrics.py), e.g. "
                        "delta_a_pp, steer_delta_pp, fvu_a")
    scheduler = raw.get("scheduler") or None
    if scheduler in ("none", None):
        scheduler = None
    elif not (isinstance(scheduler, dict) and set(scheduler) == {"asha"} and isinstance(scheduler["asha"], dict)):
        raise _fail(where, "scheduler", scheduler, "'none' or {asha: {metric, mode, grace_period, reduction_factor}}")
    else:
        scheduler = from_mapping(Asha, scheduler["asha"], where, "scheduler.asha")
        if scheduler.metric not in metric_names("train"):
            raise _fail(where, "scheduler.asha.metric", scheduler.metric,
                        f"a metric every training report carries ({', '.join(metric_names('train'))})")
    spec = SweepSpec(
        name=_spec_name(raw, where, name), source=where, pair=pair, layers=tuple(layers),
        harvest=harvest, crosscoder=crosscoder, train=train, grid=grid, search=search, num_samples=num_samples,
        metrics=metrics, modes=modes, scheduler=scheduler,
        eval=evaluation,
        steering=from_mapping(SteerConfig, _without_protocol(raw.get("steering"), where), where, "steering",
                              protocol=evaluation.protocol),
        resources=from_mapping(Resources, raw.get("resources"), where, "resources"),
        description=str(raw.get("description", "")), raw=raw)
    if spec.n_trials > MAX_TRIALS:
        raise SpecError(f"{where}: fields grid and num_samples ask for {spec.n_grid_points:,} grid points × "
                        f"{num_samples:,} samples = {spec.n_trials:,} trials; expected at most {MAX_TRIALS:,}")
    # Every grid point with the extremes of every sampled axis must make a valid trial.
    for label, settings in spec.corner_trials():
        _check_trial(spec, settings, label)
    check_trial_memory(spec, 1)  # the pair's width is read later (check_against_pair); 1 bounds it from below
    _check_localize_when(spec)
    return spec


MAX_TRIAL_BYTES = 2 * 10**12
"""Most memory one trial may need (2 TB): more than any single machine a sweep runs on holds (the largest
cloud instances hold a few TB, a GPU 80–192 GB), so a larger crosscoder is a typo, refused at validation."""


def check_trial_memory(spec: SweepSpec, d_model: int, limit: float = MAX_TRIAL_BYTES,
                       holder: str = "the largest machine dfc-ray plans for") -> None:
    """Refuse a trial whose crosscoder, with its gradients, Adam moments and one batch, needs more than `limit`
    bytes, the memory of `holder` (by default: any machine; `dict_size: 1e12`), naming the estimate; `d_model`
    is the pair's width or a lower bound of it."""
    # deferred: dfc_ray.preflight imports torch
    from dfc_ray.preflight import human_bytes, training_bytes

    worst = max(spec.corner_trials(), key=lambda item: (item[1]["dict_size"], item[1]["batch_size"]))
    settings = worst[1]
    needed = training_bytes(DFCConfig(d_model=d_model, **{k: v for k, v in settings.items() if k in DFC_FIELDS}),
                            settings["batch_size"])
    if needed > limit:
        varies = spec.n_grid_points > 1 or bool(spec.search)
        raise _fail(spec.source, "crosscoder.dict_size" + (f" ({worst[0]})" if varies else ""), settings["dict_size"],
                    f"a crosscoder a machine can train: at d_model {d_model:,}"
                    f"{' (at least)' if d_model == 1 else ''} a trial needs {human_bytes(needed)} (weights, "
                    f"gradients, Adam moments, a batch of {settings['batch_size']:,}), more than the "
                    f"{human_bytes(int(limit))} of {holder}")


def _check_localize_when(spec: SweepSpec) -> None:
    """steering.localize_when must select at least one trial the causal tests can run on (a DFC, with
    exclusive features): a filter no grid point matches would skip them in every trial without a word."""
    when, steering = spec.steering.localize_when, spec.steering
    if not when or not steering.localize:
        return
    for _, settings in spec.corner_trials():
        cfg = DFCConfig(d_model=1, **{k: v for k, v in settings.items() if k in DFC_FIELDS})
        if cfg.n_a_exclusive + cfg.n_b_exclusive > 0 and all(getattr(cfg, k) == v for k, v in when.items()):
            return
    raise _fail(spec.source, "steering.localize_when", dict(when),
                "crosscoder fields that at least one DFC grid point has (else the causal tests "
                f"{', '.join(steering.localize)} never run); set steering.localize_when to match one, or null for "
                "every DFC")


def _spec_name(raw: dict[str, Any], where: str, name: str) -> str:
    """The spec's `name` (or the file stem), checked: it names the run folder, the harvest and the judges."""
    if raw.get("name") is not None:
        return check_name(raw["name"], f"{where}: field name")
    return check_name(name or Path(where).stem, f"{where}: the spec name taken from the file name")


def _without_protocol(steering: Any, where: str) -> Any:
    """The steering section, refused when it sets a protocol: a sweep has one, in eval.protocol."""
    if isinstance(steering, dict) and "protocol" in steering:
        raise _fail(where, "steering.protocol", steering["protocol"],
                    "no protocol here: set it once as eval.protocol (steering judges with the same one)")
    return steering


def load_spec(name_or_path: str) -> SweepSpec:
    """Read, merge (`extends`) and validate a spec by shipped name or path."""
    raw, where = load_raw(name_or_path)
    return parse_spec(raw, where, Path(where).stem)


# ---------------------------------------------------------------- checks against the pair and the data


def _model_folder(where: str, path: str, reference: str) -> Path | None:
    """The local folder a pair reference names, None for the organism, s3:// and hub ids (not probed
    here: no network at validation time); a local path that does not exist is refused."""
    if reference in ORGANISM_PAIRS or reference.startswith("s3://"):
        return None
    folder = Path(reference).expanduser()
    if folder.is_dir():
        if path != "pair.tokenizer" and not (folder / "config.json").is_file():  # a tokenizer folder has none
            raise _fail(where, path, reference, "a model folder holding config.json")
        return folder
    if reference.startswith(("/", ".", "~")) or reference.count("/") > 1 or folder.exists():  # not org/name
        raise _fail(where, path, reference, "an existing model folder, 'organism', s3://… or a hub id (org/name)")
    return None


def _sources(sources: str) -> list[str]:
    """The comma-separated task sources of a setting."""
    return [s.strip() for s in sources.split(",") if s.strip()]


def _task_sources(where: str, path: str, sources: str) -> None:
    for source in _sources(sources):
        try:
            if not load_tasks(source):
                raise ValueError("no tasks")
        except (ValueError, OSError) as err:
            raise _fail(where, path, source, f"a task source that loads ({' '.join(str(err).split())})") from None


ONE_ROW_POSITIONS = ("last_prompt_token", "text_end")
"""Harvest positions that make exactly one row per record (the others make at least one)."""


def _check_harvest_fills_a_batch(spec: SweepSpec) -> None:
    """A trial reads whole batches: a harvest of fewer rows than its batch_size is refused now, not found
    when the trial starts (harvest positions with one row per record, whose row count is known here)."""
    # deferred: dfc_ray.harvest imports torch
    from dfc_ray.harvest import plain_texts

    corpus = spec.harvest.corpus
    n_tasks = min(corpus.n_tasks, sum(len(load_tasks(s)) for s in _sources(corpus.tasks))) if corpus.n_tasks else 0
    records = n_tasks + len(plain_texts(corpus.plain_text, corpus.n_plain, corpus.seed))
    for label, settings in spec.corner_trials():
        positions = spec.trial_positions(settings)
        if positions in ONE_ROW_POSITIONS and settings["batch_size"] > records:
            varies = any("batch_size" in s for a in spec.grid for s in a.settings) or \
                any(d.name == "batch_size" for d in spec.search)
            where = "train.batch_size" + (f" ({label})" if varies else "")
            raise _fail(spec.source, where, settings["batch_size"],
                        f"at most the {records} rows the harvest makes ({n_tasks} tool prompts + "
                        f"{records - n_tasks} plain texts, one row each at positions {positions}); a trial "
                        "reads whole batches")


def _check_prompts_fit(spec: SweepSpec) -> None:
    """Every prompt the judges generate from fits the pair's positions with its new tokens (local pairs)."""
    # deferred: dfc_ray.pair imports torch and transformers
    from dfc_ray.pair import check_prompts_fit

    steer, judge = spec.steering, spec.eval
    for path, sources, n, new_tokens in (("eval.tasks", judge.tasks, judge.n_tasks, judge.max_new_tokens),
                                         ("steering.dev_tasks", steer.dev_tasks, steer.n_dev, steer.max_new_tokens),
                                         ("steering.test_tasks", steer.test_tasks, steer.n_test, steer.max_new_tokens)):
        tasks = [task for source in _sources(sources) for task in load_tasks(source)][:n or None]
        check_prompts_fit(spec.pair, tasks, new_tokens, f"{spec.source}: field {path}", judge.protocol.prompt_format,
                          local_only=True)


def _check_dialect(spec: SweepSpec) -> None:
    """pair.dialect names a dialect, or `auto` finds one in the local tokenizer's chat template (the judges
    resolve it the same way when they start, after the harvest: a refusal there would come too late)."""
    # deferred: dfc_ray.pair imports torch and transformers
    from dfc_ray.pair import load_tokenizer, require_chat_template

    tokenizer = load_tokenizer(spec.pair, local_only=True)
    if spec.eval.protocol.prompt_format == "chat":  # no template at all: its own refusal, not "no dialect marker"
        require_chat_template(tokenizer, f"{spec.source}: field pair.tokenizer")
    try:
        resolve_dialect(spec.pair.dialect, tokenizer)
    except ValueError as err:
        raise SpecError(f"{spec.source}: field pair.dialect: {err}") from None


def _text_source(where: str, path: str, source: str) -> None:
    # deferred: dfc_ray.harvest imports torch
    from dfc_ray.harvest import plain_texts

    try:
        plain_texts(source, 1, 0)
    except (ValueError, OSError):
        raise _fail(where, path, source, "'organism', a .txt file (one text a line) or a .jsonl file with a "
                                         "'text' field") from None


def check_against_pair(spec: SweepSpec) -> list[str]:
    """What the spec's YAML cannot say alone, checked before any work (`spaces validate`, sweep start): the
    pair's paths exist and its config.json (read without weights) has the spec's layers and equal widths;
    task and text sources load; steering's dev and test splits share no prompt. Returns notes on what was
    not probed (s3:// and hub ids: no network here); raises SpecError (one line) on the first problem. A model
    harvest could not run (`unhookable`: GPT-2, an encoder) and a pair of two architectures or widths are refused."""
    # deferred: dfc_ray.pair imports torch and transformers
    from dfc_ray.pair import CAUSAL_LM, family_mismatch, load_config, unhookable

    where, notes, configs = spec.source, [], {}
    for role in ("a", "b", "tokenizer"):
        reference = getattr(spec.pair, role)
        if not reference:  # the tokenizer defaults to B's
            continue
        if _model_folder(where, f"pair.{role}", reference) is None and reference not in ORGANISM_PAIRS:
            notes.append(f"pair.{role} = {reference!r} not probed (s3:// and hub ids are read when the sweep "
                         "loads them)")
        elif role != "tokenizer":
            try:
                config = load_config(spec.pair, role, local_only=True)
            except (OSError, ValueError) as err:
                raise _fail(where, f"pair.{role}", reference, "a model folder whose config.json transformers reads "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
            reason = unhookable(config)
            if reason is not None:
                raise _fail(where, f"pair.{role}", reference, f"{CAUSAL_LM}, but {reason}")
            configs[role] = config
            blocks = config.get_text_config().num_hidden_layers
            if max(spec.layers) >= blocks:
                raise _fail(where, "layers", list(spec.layers),
                            f"block indices below num_hidden_layers={blocks} of pair.{role} ({reference})")
    mismatch = family_mismatch(configs["a"], configs["b"]) if len(configs) == 2 else None
    if mismatch is not None:
        raise _fail(where, "pair.b", spec.pair.b, mismatch)
    if configs:  # the pair's own width: the trial memory bound checked again, now exact
        check_trial_memory(spec, max(int(c.get_text_config().hidden_size) for c in configs.values()))
    _task_sources(where, "harvest.tasks", spec.harvest.corpus.tasks)
    _task_sources(where, "eval.tasks", spec.eval.tasks)
    _text_source(where, "harvest.plain_text", spec.harvest.corpus.plain_text)
    _text_source(where, "eval.texts", spec.eval.texts)
    steer = spec.steering
    _task_sources(where, "steering.dev_tasks", steer.dev_tasks)
    _task_sources(where, "steering.test_tasks", steer.test_tasks)
    try:
        dev_test_tasks(steer.dev_tasks, steer.test_tasks, steer.n_dev, steer.n_test)
    except ValueError as err:
        raise SpecError(f"{where}: field steering.test_tasks: {err}") from None
    _check_harvest_fills_a_batch(spec)
    if not notes:  # every model and the tokenizer are local: their positions and vocabulary can be read
        try:
            _check_dialect(spec)
            _check_prompts_fit(spec)
        except OSError as err:
            raise SpecError(f"{where}: field pair: {' '.join(str(err).split())}") from None
    return notes


# ---------------------------------------------------------------- field reference


def section_classes() -> dict[str, list[tuple[type, frozenset[str]]]]:
    """Spec section → the config classes its fields come from, each with the fields it leaves out."""
    return {
        "pair": [(PairSpec, frozenset())],
        "harvest": [(HarvestConfig, HARVEST_SET_BY_SPEC), (CorpusSpec, frozenset())],
        "crosscoder": [(DFCConfig, frozenset({"d_model"}))],
        "train": [(TrainConfig, frozenset()), (TrainExtra, frozenset())],
        "eval": [(EvalConfig, frozenset())],
        "eval.protocol": [(JudgeProtocol, frozenset())],
        "steering": [(SteerConfig, frozenset({"protocol"}))],  # set once, in eval.protocol
        "resources": [(Resources, frozenset())],
        "scheduler.asha": [(Asha, frozenset())],
        "objective": [(Objective, frozenset())],
    }


def field_reference() -> str:
    """docs/spaces.md's field reference, generated from the dataclasses' fields and docstrings."""
    out = []
    for section, classes in section_classes().items():
        out += [f"### `{section}`", "", "| field | default | meaning |", "| --- | --- | --- |"]
        for cls, left_out in classes:
            docs, known = field_docs(cls), defaults(cls)
            for f in fields(cls):
                if f.name not in left_out:
                    default = f"`{known[f.name]!r}`" if f.name in known else "required"
                    if is_dataclass(known.get(f.name)):  # a nested config: its own section lists the fields
                        default = f"`{section}.{f.name}` below"
                    elif "ours" in f.metadata:  # a protocol switch (config.switch)
                        default = f"from `base`: ours `{f.metadata['ours']!r}`, seed `{f.metadata['seed']!r}`"
                    out.append(f"| `{f.name}` | {default} | {docs[f.name].replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
