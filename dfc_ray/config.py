"""Every setting of dfc-ray in one place: the configuration dataclasses, their checks, and `from_mapping`.

This module imports only the standard library, so any layer (the math, the actors, the sweep, the CLI)
can import it without pulling torch or Ray. Each field is checked against its annotation by one shared
validator (`Config.__post_init__`): `int`, `float`, `bool`, `str`, `Literal[...]` choices, tuples, optional
values and nested configs; `at_least` / `within` add a bound, and `_check` holds a class's cross-field rules.
`from_mapping` builds a config from a YAML section, so a spec field exists exactly where a dataclass field
does, and its errors name the file and the YAML path (``organism48.yaml: field steering.top_n = 'x':
expected an integer``).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, TypeVar, get_args, get_origin

# ---------------------------------------------------------------- the shared validator


class ConfigError(ValueError):
    """A field whose value its annotation or bound rejects; the message is one line."""

    def __init__(self, owner: str, name: str, value: Any, expected: str):
        super().__init__(f"{owner}.{name}={value!r}: expected {expected}")
        self.name, self.value, self.expected = name, value, expected


class SpecError(ValueError):
    """A bad mapping (a YAML spec section): the message names the file, the field and the value."""


def spec_error(where: str, path: str, value: Any, expected: str) -> SpecError:
    """The one-line error for `path` = `value` in file `where`."""
    return SpecError(f"{where}: field {path} = {value!r}: expected {expected}")


NAME_PATTERN = r"[A-Za-z0-9._-]+"
"""What a name that becomes a path or an actor name may hold (spec names, trial ids, run ids)."""
MAX_NAME_LENGTH = 100
"""Longest name a user gives (a spec name, a trial id): a run folder adds a timestamp to it and a run id or
a judge pool's name a suffix, and a path component may hold 255 bytes."""


def check_name(value: Any, where: str, longest: int = MAX_NAME_LENGTH) -> str:
    """`value` if it is a safe name (NAME_PATTERN, not '.' or '..', no '..' inside, at most `longest`
    characters), else a one-line ValueError.

    Every name that becomes part of a path or a Ray actor name passes here, so none can walk out of its
    folder or reach another sweep's actors."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value) or ".." in value or value == ".":
        raise ValueError(f"{where} = {value!r}: expected a name of letters, digits, '.', '_' and '-' "
                         "(no '..', no '/')")
    if len(value) > longest:
        raise ValueError(f"{where} = {value[:20]!r}… ({len(value)} characters): expected a name of at most "
                         f"{longest} characters")
    return value


DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?|mps"
"""Device names a setting may hold: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
DEVICE_NAMES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def at_least(default: Any, low: float) -> Any:
    """A field with a default and an inclusive lower bound."""
    return field(default=default, metadata={"bounds": (low, math.inf, "[", "]")})


def within(default: Any, interval: str) -> Any:
    """A field with a default and a range written as an interval: ``"[0, 1)"``, ``"(0, inf)"``."""
    low, high = (float(part) for part in interval[1:-1].split(","))
    return field(default=default, metadata={"bounds": (low, high, interval[0], interval[-1])})


def _in_bounds(value: float, bounds: tuple[float, float, str, str]) -> bool:
    low, high, left, right = bounds
    above = value >= low if left == "[" else value > low
    below = value <= high if right == "]" else value < high
    return above and below


def _bounds_text(hint: Any, bounds: tuple[float, float, str, str]) -> str:
    low, high, left, right = bounds
    kind = "an integer" if int in (hint, *get_args(hint)) else "a number"
    if (low, high, left, kind) == (1, math.inf, "[", "an integer"):
        return "a positive integer"
    if high == math.inf:
        return f"{kind} {'>=' if left == '[' else '>'} {low:g}"
    return f"{kind} in {left}{low:g}, {high:g}{right}"


TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if is_dataclass(hint):
        shorthand = getattr(hint, "SHORTHAND", "")  # a plain string is accepted too: name its values first
        prefix = f"{_describe(hints(typing.cast(type, hint))[shorthand])}, or " if shorthand else ""
        return f"{prefix}a mapping of {getattr(hint, '__name__', hint)} fields"
    return TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(hint: Any, value: Any) -> bool:
    """Whether `value` (already coerced) matches the annotation `hint`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(items) == len(value) and all(_fits(h, v) for h, v in zip(items, value))
    if origin is dict:  # keys and values are checked by the field's owner (e.g. dfc_ray.placement)
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:  # NaN and ±inf pass no bound and break training: refused as values
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _coerce(hint: Any, value: Any) -> Any:
    """YAML gives lists for tuples and integers for floats: convert those, leave the rest."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(_coerce(h, v) for h, v in zip(items, value)) if len(items) == len(value) else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (typing.Union, types.UnionType) and isinstance(value, list):  # `x | tuple[...]` given a list
        return next((_coerce(arm, value) for arm in args if get_origin(arm) is tuple), value)
    shorthand = getattr(hint, "SHORTHAND", "")
    if shorthand and isinstance(value, str):  # e.g. `protocol: seed` for `protocol: {base: seed}`
        return typing.cast(Any, hint)(**{shorthand: value})
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """Field name → resolved annotation (this module's names resolve Literal aliases); cached per class."""
    if cls not in _HINTS:  # fields only: a ClassVar such as Config.SHORTHAND is not a setting
        resolved = typing.get_type_hints(cls, globals())
        _HINTS[cls] = {f.name: resolved[f.name] for f in fields(cls)}
    return _HINTS[cls]


class Config:
    """Base of the configuration dataclasses: `__post_init__` checks every field against its annotation.
    A nested config that sets `SHORTHAND` (a field name) may be given as a plain string: that field's value."""

    SHORTHAND: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            hint, value = hints(type(self))[f.name], getattr(self, f.name)
            coerced = _coerce(hint, value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)  # frozen dataclasses too
            if not _fits(hint, coerced):
                raise self.invalid(f.name, _describe(hint))
            bounds = f.metadata.get("bounds")
            if bounds and coerced is not None and not _in_bounds(coerced, bounds):
                raise self.invalid(f.name, _bounds_text(hint, bounds))
        self._check()

    def _check(self) -> None:
        """Rules between fields; a subclass raises `self.invalid(...)`."""

    def invalid(self, name: str, expected: str) -> ConfigError:
        return ConfigError(type(self).__name__, name, getattr(self, name), expected)


C = TypeVar("C")


def check_fields(cls: type, data: Any, where: str, section: str, extra: dict[str, Any] | None = None,
                 skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A section's fields checked one by one against `cls`'s annotations (plus `extra` names → hints),
    coerced, nested configs built; cross-field rules are left to the constructor."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise spec_error(where, section, data, "a mapping")
    known = {name: hint for name, hint in hints(cls).items() if name not in skip} | (extra or {})
    out = {}
    for key, value in data.items():
        path = f"{section}.{key}"
        if key not in known:
            raise spec_error(where, path, value, f"one of {', '.join(sorted(known))}")
        hint = known[key]
        if isinstance(hint, type) and is_dataclass(hint) and isinstance(value, dict):
            out[key] = from_mapping(hint, value, where, path)
            continue
        try:
            value = _coerce(hint, value)
        except ConfigError as err:  # a shorthand string its config rejects
            raise spec_error(where, path, value, err.expected) from None
        if not _fits(hint, value):
            raise spec_error(where, path, value, _describe(hint))
        out[key] = value
    return out


def from_mapping(cls: type[C], data: Any, where: str, section: str, **fixed: Any) -> C:
    """`cls` built from a YAML section (`fixed`: fields the caller sets); every error names the file and path."""
    values = check_fields(cls, data, where, section, skip=frozenset(fixed))
    try:
        return cls(**values, **fixed)
    except ConfigError as err:
        raise spec_error(where, f"{section}.{err.name}", err.value, err.expected) from None
    except TypeError as err:  # a required field is missing
        raise SpecError(f"{where}: field {section}: {err}") from None


def defaults(cls: type) -> dict[str, Any]:
    """Field → default of a config (fields without one are left out)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


# ---------------------------------------------------------------- modes

Sparsity = Literal["topk", "batchtopk"]
Recon = Literal["mse", "fvu"]
L1Mode = Literal["seed", "partition"]
Decay = Literal["linear", "cosine", "none"]
Formulation = Literal["auto", "sparse", "dense", "hybrid"]
HarvestPositions = Literal["last_prompt_token", "all_tokens", "prompt_and_response", "prompt", "mix_last_prompt",
                           "text_end"]
StoreDtype = Literal["float16", "bfloat16", "float32"]
ShardFormat = Literal["parquet", "safetensors"]
WeightsDtype = Literal["float32", "bfloat16", "float16"]
ToolDialect = Literal["auto", "hermes", "llama3", "pythonic", "mistral", "phi4", "json"]
"""`auto` or a name of dfc_ray/tooluse/dialects.py's registry (tests/test_dialects.py keeps the two equal)."""
SpliceModeName = Literal["last_prompt_token", "prompt", "lockstep"]
SteerPositionsName = Literal["last_prompt_token", "generated", "all"]
SteerScale = Literal["residual_norm", "activation", "decoder"]
SteerRanking = Literal["cohens_d", "cos_reference", "tool_logprob"]
LocalizeTest = Literal["curve", "ablate_b", "patch_a"]
PlantedChange = Literal["rank1", "scale"]
Target = Literal["a", "b"]
DecodeMode = Literal["auto", "eager", "static"]
Dispatch = Literal["least_busy", "round_robin"]
Reader = Literal["ray", "local"]
Executor = Literal["ray", "local"]
Direction = Literal["max", "min"]

SPARSITIES, RECONS, L1_MODES = get_args(Sparsity), get_args(Recon), get_args(L1Mode)
POSITIONS = get_args(HarvestPositions)
DISPATCH = get_args(Dispatch)
SCALES = get_args(SteerScale)
STEER_RANKINGS = get_args(SteerRanking)
LOCALIZE_TESTS = get_args(LocalizeTest)


@dataclass(frozen=True)
class SpliceMode:
    """Where an evaluation splices the reconstruction into the target's residual stream."""

    name: str
    """The value of `EvalConfig.splice_mode`."""
    leaves_prefix_alone: bool
    """True when only the last prompt token is edited: the prompts' prefix KV cache and the other
    model's cached last-token residuals can be reused."""
    positions: Literal["last_prompt_token", "prompt", "all"]
    """Which positions are edited: the last prompt token, every prompt token, or every position
    including generated ones (the two models then decode in lockstep)."""


@dataclass(frozen=True)
class SteerSite:
    """Where a steering vector is added to the residual stream."""

    name: str
    """The value of `SteerConfig.positions`."""
    leaves_prefix_alone: bool
    """True when only the last prompt token is steered, so the prompts' prefix KV cache applies."""
    in_prefill: bool
    """Whether prompt positions are steered (all of them, or only the last one when leaves_prefix_alone)."""
    in_decode: bool
    """Whether every generated token is steered."""


SPLICE_MODES = {mode.name: mode for mode in (
    SpliceMode("last_prompt_token", leaves_prefix_alone=True, positions="last_prompt_token"),
    SpliceMode("prompt", leaves_prefix_alone=False, positions="prompt"),
    SpliceMode("lockstep", leaves_prefix_alone=False, positions="all"),
)}
STEER_SITES = {site.name: site for site in (
    SteerSite("last_prompt_token", leaves_prefix_alone=True, in_prefill=True, in_decode=False),
    SteerSite("generated", leaves_prefix_alone=False, in_prefill=False, in_decode=True),
    SteerSite("all", leaves_prefix_alone=False, in_prefill=True, in_decode=True),
)}


# ---------------------------------------------------------------- the crosscoder and its training


@dataclass
class DFCConfig(Config):
    """The shape and losses of one Dedicated Feature Crosscoder."""

    d_model: int = field(metadata={"bounds": (1, math.inf, "[", "]")})
    """Width of each model's activation vector (both models of the pair share it)."""
    dict_size: int = field(metadata={"bounds": (1, math.inf, "[", "]")})
    """Number of dictionary features D, all partitions together."""
    k: int = field(metadata={"bounds": (1, math.inf, "[", "]")})
    """Active features per sample (TopK), or on average per sample (BatchTopK)."""
    a_exclusive: float = at_least(0.0, 0)
    """Fraction of `dict_size` that is A-exclusive (0.05 = 5%); rounded to whole features. The exclusive
    features may fill the dictionary (a_exclusive + b_exclusive <= 1 after rounding; at 1 nothing is shared)."""
    b_exclusive: float = at_least(0.0, 0)
    """Fraction of `dict_size` that is B-exclusive. a_exclusive = b_exclusive = 0 is a plain crosscoder."""
    sparsity: Sparsity = "topk"
    """"topk": exactly k per sample. "batchtopk": top batch*k over the whole batch in training,
    and a learned threshold (EMA of the smallest kept score) at inference (`cc.eval()`)."""
    recon: Recon = "mse"
    """Reconstruction loss on normalized activations. "mse": mean squared error over
    (batch, model, d_model). "fvu": fvu_a + fvu_b (each model's error relative to its batch variance)."""
    l1_mode: L1Mode = "seed"
    """How l1_excl / l1_shared apply to the decoder-norm-weighted codes c_j = f_j·(‖d_jA‖+‖d_jB‖).
    "seed" (the seed study's way): l1_excl·Σ over EACH model's visible set (A-excl ∪ shared, then
    B-excl ∪ shared, so shared features are counted twice — once per model — with their per-model
    norm) + l1_shared·Σ_shared c_j. "partition": l1_excl·Σ_exclusive c_j + l1_shared·Σ_shared c_j."""
    l1_excl: float = at_least(0.0, 0)
    """λ_excl: the L1 coefficient for the exclusive term (see l1_mode)."""
    l1_shared: float = at_least(0.0, 0)
    """λ_shared: the L1 coefficient on shared features (see l1_mode)."""
    aux_k: int = at_least(256, 0)
    """AuxK: how many dead features (per sample) reconstruct the residual; 0 disables AuxK."""
    aux_coef: float = at_least(1 / 32, 0)
    """Weight of the AuxK loss (the residual's FVU explained by dead features), as in Gao et al."""
    dead_tokens: int = at_least(1_000_000, 1)
    """A feature is dead once it has not fired for this many training rows."""
    decoder_norm_selection: bool = True
    """Rank candidates by f_j·‖d_j‖ (‖d_j‖: L2 norm of the whole decoder row over both models;
    decoder-norm code scaling, as in the BatchTopK paper) instead
    of f_j, so a feature cannot win selection by shrinking its decoder and inflating its code.
    Kept code values are still f_j. Applies to topk, batchtopk and the inference threshold."""
    threshold_momentum: float = within(0.99, "[0, 1)")
    """EMA momentum of the BatchTopK inference threshold (per training step)."""

    def _check(self) -> None:
        if self.k > self.dict_size:
            raise self.invalid("k", f"at most dict_size={self.dict_size}")
        if self.n_shared < 0:  # one rule, in whole features: rounding can overshoot even at a sum of 1
            raise self.invalid("b_exclusive", f"a_exclusive + b_exclusive <= 1 in whole features "
                                              f"(a_exclusive={self.a_exclusive}, dict_size={self.dict_size})")

    @property
    def n_a_exclusive(self) -> int:
        return round(self.a_exclusive * self.dict_size)

    @property
    def n_b_exclusive(self) -> int:
        return round(self.b_exclusive * self.dict_size)

    @property
    def n_shared(self) -> int:
        return self.dict_size - self.n_a_exclusive - self.n_b_exclusive


@dataclass
class TrainConfig(Config):
    """How one crosscoder is optimized."""

    steps: int = at_least(9000, 1)
    """Optimizer steps (the seed study: 9000 at batch 1024). The batch size is the data source's."""
    lr: float = within(1e-4, "(0, inf)")
    """Peak learning rate (AdamW)."""
    warmup_steps: int = at_least(100, 0)
    """Linear warm-up from 0 to `lr` over this many steps."""
    decay: Decay = "linear"
    """LR decay to 0 over the last `decay_frac` of the steps: "linear", "cosine" or "none"."""
    decay_frac: float = within(0.2, "[0, 1]")
    """Fraction of `steps` at the end over which the LR decays to 0."""
    grad_clip: float = at_least(1.0, 0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas, each in [0, 1) (torch's AdamW refuses others only when the first step runs)."""
    weight_decay: float = at_least(0.0, 0)
    """Decoupled (AdamW) weight decay on encoder/decoder weights (never on biases)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or "mps"."""
    bf16: bool = True
    """bf16 autocast on CUDA (fp32 master weights and fp32 losses); CPU always trains in fp32."""
    norm_rows: int = at_least(8192, 1)
    """Rows from the start of the stream used to fit the normalization statistics."""
    log_every: int = at_least(50, 1)
    """Refresh the progress display every this many steps; final metrics average the last window."""
    seed: int = 0
    """Seed of the crosscoder's initialization."""
    formulation: Formulation = "auto"
    """How the training step computes the same function (docs/crosscoder.md, "Formulations"): "sparse"
    touches only the k active features' rows in the backward (embedding_bag on CPU, Triton kernels on CUDA);
    "dense" makes every weight gradient a GEMM over scattered codes; "hybrid" is dense on the encoder side
    and sparse on the decoder side. "auto": dense on CUDA, sparse elsewhere."""

    def _check(self) -> None:
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise self.invalid("device", DEVICE_NAMES)
        if not all(0 <= beta < 1 for beta in self.betas):
            raise self.invalid("betas", "two numbers in [0, 1)")

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: warm-up, constant, then decay to 0."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        start = self.steps * (1 - self.decay_frac)
        if self.decay != "none" and step >= start:
            progress = (step - start) / max(1.0, self.steps - start)
            factor *= 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * factor


@dataclass
class PlantedConfig(Config):
    """Planted-feature data (synthetic.py): paired activations with a known answer."""

    d_model: int = at_least(32, 1)
    """Activation width of each model."""
    n_shared: int = at_least(24, 0)
    """Planted features present in both models."""
    n_a_only: int = at_least(6, 0)
    """Planted features only model A has (what a DFC's A-exclusive partition should find)."""
    n_b_only: int = at_least(6, 0)
    """Planted features only model B has."""
    p_active: float = within(0.08, "[0, 1]")
    """Probability that a planted feature fires on a row."""
    noise: float = at_least(0.05, 0)
    """Std of isotropic Gaussian noise added to each model's activation (before scaling)."""
    scale_a: float = 3.0
    """Overall scale of model A's activations (raw activations are not unit-scale)."""
    scale_b: float = 0.5
    """Overall scale of model B's activations."""
    mean_shift: float = 2.0
    """Norm of each model's (random) mean vector, before scaling."""
    seed: int = 0
    """Seed for the directions and means; rows come from a separate per-call seed."""


@dataclass
class CardConfig(Config):
    """What a feature card (dfc_ray/cards.py) shows and over how many rows its statistics run."""

    top: int = at_least(8, 1)
    """Highest-activating rows shown per feature."""
    quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Activation quantiles (of the rows where the feature fires) each contributing one sampled example:
    what the feature does when it is not at its strongest."""
    context: int = at_least(12, 0)
    """Tokens shown before an example's token (and a quarter as many after it)."""
    rows: int = at_least(0, 0)
    """Rows of the layer's store (in harvest order) the statistics run over; 0 = all of them."""
    always_on: float = within(0.9, "(0, 1]")
    """A feature firing on at least this share of the row set is flagged always-on (a bias-like feature,
    not a concept)."""
    bins: int = at_least(24, 2)
    """Bins of the activation histogram (rows where the feature fires)."""
    lens_tokens: int = at_least(8, 1)
    """Tokens listed at each end of each logit lens."""

    def _check(self) -> None:
        if any(not 0 < q < 1 for q in self.quantiles):
            raise self.invalid("quantiles", "fractions in (0, 1)")


# ---------------------------------------------------------------- the pair and the harvest

ORGANISM = "organism"
ORGANISM_PAIRS = {ORGANISM: "pair", "organism-llama3": "pair-llama3"}
"""Pair references naming a shipped organism pair -> its folder under dfc_ray/organism/ (docs/organism.md):
``organism`` calls tools in the hermes dialect, ``organism-llama3`` in the llama3 dialect (same B)."""


@dataclass(frozen=True)
class PlantedPairConfig(Config):
    """Size of the planted pair and of its planted change (dfc_ray/organism/planted.py)."""

    d_model: int = 32
    """Residual width."""
    d_ff: int = 64
    """MLP intermediate width."""
    n_layers: int = 3
    """Decoder blocks."""
    layer: int = 1
    """The block whose MLP down-projection carries the rank-1 change."""
    strength: float = 3.0
    """Size of u·c·a_j where neuron j is in its top 1%, relative to block `layer`'s mean output norm.
    At 3 the difference is ~0.9 × the residual on average and a small DFC dedicates a feature to it
    (|cos| 0.996 to u); at 1 it is ~0.3 × and the best A-exclusive feature reaches only |cos| ≈ 0.7."""
    seed: int = 0
    """Seeds B's weights and the planted u."""
    plant: bool = True
    """False: A = B exactly (the control: no direction to find)."""
    change: PlantedChange = "rank1"
    """"rank1": A adds u·wᵀ (a direction B never writes). "scale": B writes u through neuron j too
    (its down-projection column, at `strength`) and A writes it `scale` times as strongly: A differs
    only in how much of a shared direction it writes."""
    scale: float = at_least(2.0, 0)
    """A's factor on neuron j's column under change "scale"."""


@dataclass(frozen=True)
class PairSpec(Config):
    """Where the two models and the tokenizer come from, and how to load them (pair.py loads them)."""

    a: str = ORGANISM
    """Model A, the RL-fine-tuned model: ``organism`` (the shipped A; ``organism-llama3`` for the llama3-dialect
    one), a local path, ``s3://…`` or a hub id."""
    b: str = ORGANISM
    """Model B, the base model, same forms as ``a`` (``organism-llama3``'s B is the shipped B)."""
    tokenizer: str = ""
    """Tokenizer reference (same forms); empty means B's. Both models must share one vocabulary."""
    revision: str = ""
    """Hub revision for hub ids (a commit hash makes the harvest cache key exact)."""
    dtype: WeightsDtype = "float32"
    """Weights dtype when loaded: float32 | bfloat16 | float16 (bfloat16 for 3B models on GPU)."""
    device: str = "auto"
    """``auto`` = cuda when available else cpu; or ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    dialect: ToolDialect = "auto"
    """How A writes tool calls (docs/tooluse.md): ``auto`` detects it from the pair's chat template, or name
    it: hermes | llama3 | pythonic | mistral | phi4 | json. Replies are parsed and scored, tool_logprob ranks,
    and templates that drop the tools get them, in this dialect; the report names it."""

    def _check(self) -> None:
        for name in ("a", "b"):
            if not getattr(self, name):
                raise self.invalid(name, "'organism', a path, s3://… or a hub id")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise self.invalid("device", DEVICE_NAMES)


@dataclass(frozen=True)
class CorpusSpec(Config):
    """What text goes through the pair: tool-use prompts and plain text, mixed."""

    tasks: str = "organism:train"
    """`load_tasks` source(s) of tool-use prompts, comma-separated (``organism:train``,
    ``bfcl:multiple,bfcl:live_multiple``, a .jsonl); empty for none."""
    n_tasks: int = at_least(1024, 0)
    """How many tool-use prompts to take (the first n of the source, or all if fewer)."""
    plain_text: str = "organism"
    """Plain text: ``organism`` (the organism's own corpus), a .txt file (one text a line) or a
    .jsonl file with a ``text`` field; empty for none."""
    n_plain: int = at_least(1024, 0)
    """How many plain texts to take."""
    with_responses: bool = False
    """Append model A's own greedy reply to each tool prompt (needed by ``prompt_and_response``)."""
    max_new_tokens: int = at_least(48, 1)
    """Length limit of those replies."""
    max_tokens: int = at_least(512, 1)
    """Longer records keep their LAST max_tokens tokens, so the last prompt token survives."""
    seed: int = 0
    """Seed of the organism plain-text generator."""


@dataclass(frozen=True)
class HarvestConfig(Config):
    """One harvest: a pair, a corpus, layers, positions and where to store the result."""

    store: str
    """Root URI (path, file:// or s3://); the harvest is written under ``<store>/<content hash>/``."""
    layers: tuple[int, ...] = (1,)
    """Residual stream after these blocks (0-based), all captured in the same forward pass."""
    pair: PairSpec = field(default_factory=PairSpec)
    """The model pair and tokenizer."""
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    """The text to run through it."""
    positions: HarvestPositions = "last_prompt_token"
    """Which token positions become rows: last_prompt_token | all_tokens | prompt_and_response | prompt |
    mix_last_prompt | text_end (the seed study's: each record's last token); harvest.py explains each."""
    dtype: StoreDtype = "float16"
    """Stored activation dtype: float16 | bfloat16 | float32."""
    format: ShardFormat = "parquet"
    """Shard format: parquet | safetensors."""
    shard_rows: int = at_least(16384, 1)
    """Rows per shard."""
    batch_size: int = at_least(32, 1)
    """Records per forward pass (one group)."""
    sink_factor: float = 10.0
    """all_tokens: drop tokens whose norm exceeds this × the record's median norm in either model."""
    cpu_threads: int = at_least(1, 1)
    """torch intra-op threads while computing rows, the same in-process and in every Ray actor. CPU
    matmuls split their sums by thread count, so rows computed with another count differ in the last
    bits (and then in the store dtype's rounding): a fixed count makes a harvest's bytes independent of
    who computed which part (docs/store.md, "What one content hash promises"). No effect on GPU rows."""
    executor: Executor = "ray"
    """Who computes the rows in a sweep: "ray", a Ray Data actor pool (`num_actors` replicas, on GPUs when the
    cluster has them); "local", the driver's own process (a small harvest on a laptop: no actor and no Ray Data
    executor to start; `num_actors` threads). Rows are the same bytes either way (`cpu_threads`), so it is not
    part of the content hash."""
    num_actors: int = at_least(1, 1)
    """Workers computing parts at once, each hosting the pair: Ray actors (the Ray Data actor pool's size) under
    executor "ray", threads of the driver under "local" (two keep a 2-core laptop busy; each holds a copy of the
    pair)."""
    gpus_per_actor: float = -1
    """GPUs per actor; -1 = 1 when the cluster has GPUs, else 0 (CPU actors)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources per actor (e.g. {harvest_gpu: 1}: only the harvest node type offers it); the
    sweep fills it from `resources.custom.harvest`."""

    def _check(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if not self.layers or self.layers[0] < 0:
            raise self.invalid("layers", "non-negative block indices")
        if self.positions == "prompt_and_response" and not self.corpus.with_responses:
            raise self.invalid("positions", "corpus.with_responses: true for 'prompt_and_response' "
                                            "(there is no response to harvest)")


# ---------------------------------------------------------------- generation and the judges


@dataclass
class GenerationConfig(Config):
    """How replies are decoded (generation.py)."""

    max_new_tokens: int = at_least(64, 1)
    """Most tokens generated per prompt; a row that reaches it finishes with reason "length"."""
    batch_size: int = at_least(32, 1)
    """Prompts decoded together; results do not depend on it (only speed and memory do)."""
    do_sample: bool = False
    """False: greedy (argmax). True: sample from softmax(logits / temperature), seeded."""
    temperature: float = within(1.0, "(0, inf)")
    """Softmax temperature when sampling; ignored when greedy."""
    top_k: int | None = field(default=None, metadata={"bounds": (1, math.inf, "[", "]")})
    """When sampling, keep only the k most likely tokens (None: the whole vocabulary)."""
    seed: int = 0
    """Sampling seed. Each prompt gets its own generator seeded from (seed, prompt index), so a
    prompt's sample does not depend on which other prompts share its batch."""
    stop_strings: tuple[str, ...] = ("</tool_call>",)
    """A row stops right after its completion first contains one of these (kept in the text)."""
    decode: DecodeMode = "auto"
    """eager: one forward per token over a growing KV cache, finished rows dropped (the reference loop). static: a
    preallocated KV cache and one fixed-shape decode step, captured as a CUDA graph on CUDA (greedy only; same
    token ids as eager in fp32). auto: static on CUDA for greedy decoding of a supported model, else eager."""

    def _check(self) -> None:
        if any(not s for s in self.stop_strings):
            raise self.invalid("stop_strings", "non-empty strings")
        if self.decode == "static" and self.do_sample:
            raise self.invalid("decode", "'eager' or 'auto' when do_sample is true (static decoding is greedy only)")


ProtocolName = Literal["ours", "seed"]
Metric = Literal["strict", "seed_lenient"]
METRICS = get_args(Metric)
PROTOCOL_NAMES = get_args(ProtocolName)
SEED_TRAINING_POSITIONS: HarvestPositions = "text_end"
"""The seed study's training positions (weakness 4: ends of text chunks, not the prompt's end), over texts
that hold the reply (`seed_training`)."""


def switch(ours: str, seed: str, weakness: int) -> Any:
    """A judging-protocol switch: unset (the None default) takes the base protocol's value; `ours` and `seed` are the
    two values and `weakness` the seed study's weakness it reproduces (docs/replication.md)."""
    return field(default=None, metadata={"ours": ours, "seed": seed, "weakness": weakness})


@dataclass(frozen=True)
class JudgeProtocol(Config):
    """How the judges read a checkpoint: dfc-ray's protocol, the seed study's (`protocol: seed`), or either
    with single switches changed (`protocol: {base: seed, normalization: checkpoint}`). Each switch
    reproduces one weakness of the study's pipeline; unset switches take the base's value. The sixth
    difference, the training positions, is a harvest setting (SEED_TRAINING_POSITIONS)."""

    SHORTHAND = "base"

    base: ProtocolName = "ours"
    """The protocol every unset switch comes from: "ours" (dfc-ray's) or "seed" (the study's)."""
    normalization: Literal["checkpoint", "none"] = switch("checkpoint", "none", 1)
    """"checkpoint": activations go through the checkpoint's saved statistics (raw in, raw out).
    "none": the study's splice, raw activations straight into weights trained on normalized ones."""
    prompt_format: Literal["chat", "raw"] = switch("chat", "raw", 2)
    """"chat": the tokenizer's chat template with the tools. "raw": the study's prompt, system text with a
    numbered tool list (toolrl.as_toolrl) and the user text, no chat template. The study ran batch 1 to
    dodge its left-padding bug; dfc-ray's batches give the same replies as batch 1, so batching stays."""
    metric: Metric = switch("strict", "seed_lenient", 3)
    """Correctness the deltas and steering count: "strict" (BFCL-AST against the ground truth) or
    "seed_lenient" (a called name fuzzy-matches an offered tool; scoring.seed_lenient)."""
    steering_selection: Literal["dev_test", "same_split"] = switch("dev_test", "same_split", 5)
    """"dev_test": feature and α chosen on dev, reported on the disjoint test split. "same_split": chosen
    and reported on the test split (the study's best grid cell on its 40 prompts)."""
    steer_b_via: Literal["a_decoder", "b_decoder"] = switch("a_decoder", "b_decoder", 6)
    """How B is steered with an A-exclusive feature: "a_decoder" (the feature's A direction, read in the
    basis both models share) or "b_decoder" (B's own decoder row: structurally zero, a no-op)."""

    def __post_init__(self) -> None:
        if self.base in PROTOCOL_NAMES:  # unset switches take the base's value, then every field is checked
            for f in fields(self):
                if f.metadata.get("weakness") and getattr(self, f.name) is None:
                    object.__setattr__(self, f.name, f.metadata[self.base])
        super().__post_init__()

    @property
    def own_decoder_only(self) -> bool:
        """Steering reads only the target's own decoder row (steer_b_via: b_decoder), even when it is zero."""
        return self.steer_b_via == "b_decoder"

    def switches(self) -> dict[str, str]:
        """Switch name → value (after the base has filled the unset ones)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("weakness")}

    def reverted(self, name: str) -> "JudgeProtocol":
        """This protocol with switch `name` set to the other protocol's value."""
        meta = next(f.metadata for f in fields(self) if f.name == name)
        other = meta["ours"] if getattr(self, name) == meta["seed"] else meta["seed"]
        return JudgeProtocol(**{**self.switches(), "base": self.base, name: other})

    def label(self) -> str:
        """"ours", "seed", or the base and the switches that differ from it."""
        changed = {k: v for k, v in self.switches().items() if v != JudgeProtocol(base=self.base).switches()[k]}
        return self.base + "".join(f", {k}: {v}" for k, v in changed.items())


def protocol_switches() -> dict[str, dict[str, Any]]:
    """Switch name → {ours, seed, weakness}: the judging switches of JudgeProtocol."""
    return {f.name: dict(f.metadata) for f in fields(JudgeProtocol) if f.metadata.get("weakness")}


def seed_training(harvest: HarvestConfig) -> HarvestConfig:
    """`harvest` as the study trained: each text's last token (text_end) over whole transcripts, A's own
    reply appended to each tool prompt (with_responses); without replies a prompt's last token would be
    the evaluation position itself. A spec based on `protocol: seed` gets both unless it sets `positions`."""
    return replace(harvest, positions=SEED_TRAINING_POSITIONS, corpus=replace(harvest.corpus, with_responses=True))


def study_differences() -> dict[str, dict[str, Any]]:
    """Every difference between our protocol and the seed study's, in its weakness order: the judging
    switches plus "positions", the training positions (a harvest setting); the ablation's rows and the
    report read this."""
    training = {"positions": {"ours": "the spec's positions", "seed": SEED_TRAINING_POSITIONS, "weakness": 4}}
    return dict(sorted((protocol_switches() | training).items(), key=lambda item: item[1]["weakness"]))


@dataclass(frozen=True)
class EvalConfig(Config):
    """What an evaluation runs: tasks, text sample, splice mode, generation and bootstrap settings."""

    tasks: str = "organism:test"
    """`load_tasks` source of the tool-use tasks scored for correctness."""
    n_tasks: int = at_least(0, 0)
    """Use the first n tasks (0 = all)."""
    texts: str = "organism"
    """Plain text for the splice loss/KL: ``organism`` (the organism's corpus), or a .txt file (one text a line)."""
    n_texts: int = at_least(64, 0)
    """How many texts for the splice loss (0 = skip the loss)."""
    splice_mode: SpliceModeName = "last_prompt_token"
    """Where the reconstruction replaces the residual: last_prompt_token (the study's protocol),
    prompt (every prompt token) or lockstep (every position, generated ones too); see SPLICE_MODES."""
    max_new_tokens: int = at_least(64, 1)
    """Reply length limit."""
    batch_size: int = at_least(32, 1)
    """Prompts per generation batch (results do not depend on it)."""
    n_bootstrap: int = at_least(1000, 1)
    """Bootstrap resamples for the 95% CIs."""
    seed: int = 0
    """Bootstrap seed (and the organism text seed offset)."""
    protocol: JudgeProtocol = field(default_factory=JudgeProtocol)
    """The judging protocol: "ours", "seed", or a mapping of switches (JudgeProtocol); a sweep's steering
    uses the same one."""

    @property
    def splice(self) -> SpliceMode:
        return SPLICE_MODES[self.splice_mode]

    def generation(self) -> GenerationConfig:
        """Greedy decoding: a reply is a function of the prompt, so clean outputs can be cached."""
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


@dataclass(frozen=True)
class SteerConfig(Config):
    """The steering protocol's settings."""

    dev_tasks: str = "organism:dev"
    """Tasks for ranking, the α grid and the minimal set (selection happens only here)."""
    test_tasks: str = "organism:test"
    """Tasks the chosen (feature, α) is reported on; must share no prompt with dev_tasks."""
    n_dev: int = at_least(100, 0)
    """First n dev tasks (0 = all)."""
    n_test: int = at_least(200, 0)
    """First n test tasks (0 = all)."""
    n_plain: int = at_least(100, 0)
    """Plain texts added to the ranking's negatives (with the dev tasks that need no tool)."""
    top_n: int = at_least(3, 1)
    """Candidate features taken from the top of EACH ranking in `rankings`; their union enters the α grid."""
    alphas: tuple[float, ...] = (0.4, 0.8, 1.2)
    """α grid, in units of `scale` (the reference direction uses the same grid)."""
    scale: SteerScale = "residual_norm"
    """"residual_norm": the vector is a unit direction × α × the target's mean residual norm at that
    layer (‖x‖ over dev tool prompts at the last prompt token): α = 1 adds as much as the residual
    already holds, so one grid fits every layer, feature and dictionary. "activation": α × (the
    feature's mean activation when it fires on dev tool prompts) × its raw decoder direction.
    "decoder": α × the raw decoder direction (the seed study's α = 32 convention). Under
    "activation" and "decoder" the reference direction's vector is α × v."""
    positions: SteerPositionsName = "last_prompt_token"
    """Where the vector is added: last_prompt_token (the study's protocol), generated or all; see STEER_SITES."""
    targets: tuple[Target, ...] = ("a", "b")
    """Models to steer; B uses the A-exclusive feature's A direction (interventions.feature_direction)."""
    primary: Target = "a"
    """The target whose numbers become the unprefixed steer_* metrics."""
    min_set_share: float = within(0.5, "(0, 1]")
    """The minimal set must raise the target's dev correctness by this share of |A clean − B clean| on dev."""
    min_set_pool: int = at_least(6, 1)
    """Greedy selection draws from this many top-ranked features."""
    min_set_max: int = at_least(3, 1)
    """Largest set tried; steer_min_set = −1 when no set up to this size reaches the goal."""
    max_new_tokens: int = at_least(64, 1)
    """Reply length limit."""
    batch_size: int = at_least(32, 1)
    """Prompts per generation batch."""
    n_bootstrap: int = at_least(1000, 1)
    """Bootstrap resamples for the CIs."""
    seed: int = 0
    """Seed of the controls (random feature and direction) and of the bootstrap."""
    rankings: tuple[SteerRanking, ...] = STEER_RANKINGS
    """Candidate rankings: "cohens_d" (tool vs no-tool activation), "cos_reference" (|cos| of the
    feature's A decoder direction with the reference v), "tool_logprob" (gain in the target's
    log-prob of the reply opening `tool_token`, teacher-forced over all its tokens, on dev tool prompts, feature
    added at `candidate_alpha`; one forward of the last prompt token and the opening per feature, no generation)."""
    tool_token: str = ""
    """Reply opening the tool_logprob ranking scores (all its tokens); empty = the pair dialect's call opening
    (``<tool_call>`` for hermes; for a dialect without a marker, the first characters of a bare call, e.g.
    ``{"name": "``; docs/tooluse.md)."""
    candidate_alpha: float = at_least(0.0, 0)
    """α (in `scale` units) at which tool_logprob scores features; 0 = the median of `alphas`."""
    effect_pool: int = at_least(256, 1)
    """tool_logprob scores at most this many features (the best by Cohen's d): bounds its cost on
    large dictionaries; the organism's dictionaries have fewer A-exclusive features than this."""
    protocol: JudgeProtocol = field(default_factory=JudgeProtocol)
    """The judging protocol (JudgeProtocol); in a sweep spec it is set once, in `eval.protocol`."""
    localize: tuple[LocalizeTest, ...] = LOCALIZE_TESTS
    """Causal tests of where the A − B difference lives (`Steerer.localize`, docs/evaluation.md): "curve"
    steers B with the top n features' mean writes Σ mean[f_j]·(d_j^A − d_j^B) for each n of
    `localize_sizes`; "ablate_b" zeroes B's top B-exclusive contributors in B; "patch_a" moves A's top
    contributors' writes to B's. Each: n chosen on dev, reported on test with a random control of the
    same size and norm. Empty: the attribution only (no generation)."""
    localize_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Feature counts n the causal tests try (the largest contributors first)."""
    localize_alphas: tuple[float, ...] = ()
    """α grid (in `scale` units) the curve chooses from on dev for each n; empty = the reference
    direction's dev-chosen α (one dev generation per n instead of one per n and α)."""
    localize_share: float = within(0.5, "(0, 1]")
    """The curve's n is the smallest whose dev effect reaches this share of the reference's dev effect
    (loc_n50; else the n with the largest dev effect)."""
    attribution_top: int = at_least(10, 1)
    """Features listed per trial in the attribution (the largest terms c_j)."""
    localize_when: dict[str, float] = field(default_factory=dict)
    """Crosscoder fields a checkpoint must match for the causal tests, e.g. {dict_size: 768, k: 32} (they
    cost generations; the attribution runs on every checkpoint); empty = every DFC. A plain crosscoder
    (no exclusive features) gets the attribution only, as steering skips it."""

    def _check(self) -> None:
        if self.localize and (not self.localize_sizes or min(self.localize_sizes) < 1):
            raise self.invalid("localize_sizes", "a non-empty list of feature counts ≥ 1")
        if unknown := sorted(set(self.localize_when) - {f.name for f in fields(DFCConfig)}):
            raise self.invalid("localize_when", f"crosscoder fields (DFCConfig); {unknown[0]!r} is not one")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               for v in self.localize_when.values()):
            raise self.invalid("localize_when", "a finite number for each crosscoder field")
        if not self.rankings:
            raise self.invalid("rankings", f"a non-empty list of {list(STEER_RANKINGS)}")
        if not self.targets or self.primary not in self.targets:
            raise self.invalid("targets", f"a non-empty list of 'a'/'b' that holds primary={self.primary!r}")
        if not self.alphas:
            raise self.invalid("alphas", "at least one α")

    @property
    def site(self) -> SteerSite:
        return STEER_SITES[self.positions]

    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)

    def scoring_alpha(self) -> float:
        """The α of the tool_logprob ranking."""
        return self.candidate_alpha or sorted(self.alphas)[len(self.alphas) // 2]


@dataclass(frozen=True)
class PoolConfig(Config):
    """A replica pool's identity, size, resources and fault tolerance (actors/pool.py)."""

    name: str
    """Replica i is the named actor ``<name>-<i>``."""
    namespace: str = "dfc-ray"
    """Ray namespace of the names (trials of any job can look them up here)."""
    replicas: int = at_least(1, 1)
    """Number of replicas."""
    num_cpus: float = at_least(1, 0)
    """CPUs reserved per replica."""
    num_gpus: float = at_least(0, 0)
    """GPUs per replica (e.g. 1 for a 3B pair in bf16; fractions share a GPU)."""
    resources: tuple[tuple[str, float], ...] = ()
    """Custom resources per replica, as (name, amount) pairs (a tuple: the config stays hashable), e.g.
    (("trial_gpu", 1),) to land on the node type that offers them."""
    max_restarts: int = -1
    """How often Ray may restart a dead replica (−1 = always)."""
    max_task_retries: int = -1
    """How often a request interrupted by a replica's death is re-sent (−1 = until it succeeds). Ray can
    spend retries while the replica is still restarting, so a small number can fail a request anyway."""
    dispatch: Dispatch = "least_busy"
    """least_busy | round_robin."""
    detached: bool = False
    """Keep the replicas alive after the creating driver exits (kill with `ReplicaPool.shutdown`)."""

    def _check(self) -> None:
        if not self.name:
            raise self.invalid("name", "a name for the replicas")

    def replica_name(self, i: int) -> str:
        return f"{self.name}-{i}"


# ---------------------------------------------------------------- the sweep spec's own sections


@dataclass(frozen=True)
class TrainExtra(Config):
    """The spec's `train` fields that are not TrainConfig's: how a trial reads its batches."""

    batch_size: int = at_least(1024, 1)
    """Rows per training batch."""
    reader: Reader = "ray"
    """"ray": Ray Data streams the harvest (data_cpus CPUs outside the trials); "local": the trial reads it."""


@dataclass(frozen=True)
class Resources(Config):
    """The spec's `resources` section: per-trial resources and the judge pools' sizes."""

    cpu: float = within(1.0, "(0, inf)")
    """CPUs per trial (also its torch thread count); more than 0, or Ray would pack trials without limit."""
    gpu: float = at_least(0.0, 0)
    """GPUs per trial (fractions share a GPU)."""
    max_concurrent: int | None = field(default=None, metadata={"bounds": (1, math.inf, "[", "]")})
    """Trials running at once; null = as many as the CPUs left after the pools and Ray Data allow."""
    evaluators: int = at_least(1, 1)
    """Replicas in each judge pool (evaluators and steerers)."""
    evaluator_cpu: float = at_least(1.0, 0)
    """CPUs per judge replica."""
    evaluator_gpu: float = at_least(0.0, 0)
    """GPUs per judge replica."""
    data_cpus: float | None = field(default=None, metadata={"bounds": (0, math.inf, "[", "]")})
    """CPUs kept for Ray Data's read tasks; null = 1 with the ray reader, 0 with the local one."""
    max_failures: int = at_least(1, 0)
    """Retries of a failed trial (Tune's FailureConfig), and rounds in which the driver re-runs trials
    the cluster lost (a dead node, actor or judge replica; docs/sweep.md)."""
    custom: dict[str, dict[str, float]] = field(default_factory=dict)
    """Custom resources per kind of actor (trial, judge, harvest) → {resource: amount}, e.g.
    {trial: {trial_gpu: 0.25}, judge: {trial_gpu: 1}}: sends each kind to the node type of cluster.yaml
    that declares them (checked by dfc_ray.placement)."""

    def judge_replicas(self) -> int:
        """Replicas of the two judge pools (evaluators and steerers, `evaluators` replicas each)."""
        return 2 * self.evaluators

    def judge_cpus(self) -> float:
        """CPUs the judge pools' replicas hold outside the trials."""
        return self.judge_replicas() * self.evaluator_cpu

    def reserved_data_cpus(self, reader: str) -> float:
        """CPUs Ray Data's read tasks take outside the trials."""
        if self.data_cpus is not None:
            return self.data_cpus
        return 1.0 if reader == "ray" else 0.0


@dataclass(frozen=True)
class Objective(Config):
    """The spec's `objective` section: the trial metric Optuna optimises and optuna-dashboard names and ranks
    trials by. It steers only sampled axes: TPE over `search` ranges proposes values that did well on it, while a
    pure grid (GridSampler) runs every point whatever it says. The default asks the study's question, whether
    splicing the crosscoder into A raises A's tool correctness; when its values tie (e.g. +0.0 in every
    organism trial) the study's `best` user attribute says so instead of naming a trial. A search that should
    favour good reconstructions or strong steering names `fvu`, `steer_delta_pp` or `steer_share_of_reference`."""

    metric: str | tuple[str, ...] = "delta_a_pp"
    """A trial metric (dfc_ray/metrics.py) that every finished trial reports, or a list of them for a
    multi-objective search (optuna-dashboard then shows a Pareto front, not a best trial). The default, Δ A, is
    the study's question; it steers TPE over `search` ranges only (a grid runs every point), and a search for
    good reconstructions or strong steering names `fvu` (mode min) or `steer_delta_pp` instead."""
    mode: Direction | tuple[Direction, ...] = "max"
    """Whether a larger (max) or smaller (min) value is better: one per metric when `metric` is a list."""

    def _check(self) -> None:
        metrics = (self.metric,) if isinstance(self.metric, str) else self.metric
        modes = (self.mode,) if isinstance(self.mode, str) else self.mode
        if not metrics:
            raise self.invalid("metric", "a metric name or a list of them")
        if len(modes) != len(metrics) or (len(metrics) > 1 and isinstance(self.mode, str)):
            raise self.invalid("mode", f"'max'/'min', one per metric ({len(metrics)})")

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


@dataclass(frozen=True)
class Asha(Config):
    """The spec's `scheduler: {asha: ...}` section: early stopping of weak trials (Tune's ASHA)."""

    metric: str = "fvu"
    """Training metric the scheduler compares trials on."""
    mode: Direction = "min"
    """Whether a larger (max) or smaller (min) metric is better."""
    grace_period: int = at_least(1, 1)
    """Training reports a trial gets before it can be stopped."""
    reduction_factor: int = at_least(4, 2)
    """Keep 1 / reduction_factor of the trials at each rung."""
    max_t: int | None = field(default=None, metadata={"bounds": (1, math.inf, "[", "]")})
    """Last training report; null = every report a trial makes."""


# ---------------------------------------------------------------- field reference (docs)


def field_docs(cls: type) -> dict[str, str]:
    """Field → its docstring (the string right under it in this module), on one line."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs
