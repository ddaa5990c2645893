"""`dfc-ray sweep --plan SPEC`: what a sweep will do and what it will cost, before anything runs.

The WORK is counted from the spec: prompts and tokens from the real corpus (tokenized with the pair's
tokenizer when it is on this machine; the plan never downloads), rows and bytes per layer, trials,
generations per trial. Work becomes FLOPs with the formulas below, and FLOPs become hours with
per-stage RATES measured in a real sweep: every run writes `costs.json` (FLOPs of each stage / its
measured seconds), and `--costs RUN_OR_JSON` plans with them. Rates of another device class are refused
(CPU rates for a spec that gives trials or judges a GPU, or the reverse); rates measured at another d_model
follow the width rule (`rates_rule`): FLOPs counted at the planned width over the FLOP/s measured at the
other one, printed with the plan (an upper bound when planning wider). Device time is in the plan's
unit: hours of the named GPU (`H200-h`) on a GPU plan, CPU-hours on a CPU plan (a worker's time × the
CPUs or GPU share it holds).

FLOP model (forward, per token, per model): 2 × parameters of the blocks run + 4 × blocks × mean
context × attention width; the lm_head only for generated tokens. Crosscoder training counts the
dense-equivalent 24 · d_model · dict_size per row (encode + decode for 2 models, forward + backward),
the usual yardstick for % of peak; ours computes less (sparse decoder). Generation with the judges'
prefix cache costs (1 + reply) tokens per prompt per intervention; clean replies and the prompts'
prefill are paid once per replica. Reply lengths are planned at max_new_tokens (an upper bound).
Memory is what the tensors need on the device; a CPU process adds about 0.7 GB of libraries.
"""

from __future__ import annotations

import json
import math
import os
import resource
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dfc_ray.fs import open_fs, redact
from dfc_ray.config import DFCConfig, TrainConfig
from dfc_ray.spaces import SweepSpec
from dfc_ray.tooluse import load_tasks

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ADAM_COPIES = 4
"""fp32 copies per crosscoder parameter while training: weights, gradients, Adam's two moments."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that costs depend on."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab: int
    tied_embeddings: bool = False
    """The lm_head re-uses the embedding matrix (Qwen2.5-3B does)."""

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """The shape of a causal LM's config, or of a multimodal wrapper's language model."""
        config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", heads),
                   getattr(config, "head_dim", None) or config.hidden_size // heads, config.intermediate_size,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def block_params(self) -> int:
        attention = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)  # q, o, k, v
        return attention + 3 * self.d_model * self.d_mlp  # gated MLP: gate, up, down

    @property
    def params(self) -> int:
        return self.n_layers * self.block_params + (1 if self.tied_embeddings else 2) * self.vocab * self.d_model

    def forward_flops(self, blocks: int, context: float, lm_head: bool = False) -> float:
        """FLOPs of one token through `blocks` blocks with `context` tokens attended on average."""
        attention = 4 * blocks * context * self.n_heads * self.head_dim
        return 2 * blocks * self.block_params + attention + (2 * self.vocab * self.d_model if lm_head else 0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype_bytes


KNOWN_SHAPES = {
    "Qwen/Qwen2.5-3B": ModelShape(d_model=2048, n_layers=36, n_heads=16, n_kv_heads=2, head_dim=128, d_mlp=11008,
                                  vocab=151936, tied_embeddings=True),
}
"""Published configs, for planning on a machine that cannot download them (fine-tunes share their base's shape)."""
CHARS_PER_TOKEN = 4.0
"""Used only when the pair's tokenizer cannot be loaded here; the plan marks such token counts."""


@dataclass
class Work:
    """Everything a sweep will do, counted from its spec."""

    shape: ModelShape
    shape_source: str
    n_trials: int
    layers: tuple[int, ...]
    prompts: int
    tokens: int
    tokens_exact: bool
    rows_per_layer: int
    bytes_per_layer: int
    harvest_flops: float
    train_flops: list[float]
    """Per trial."""
    judge_setup_flops: float
    """Once per replica set: clean replies, prompt prefill, last-token residuals."""
    eval_flops: float
    """Per trial: splices into A and B (independent of the crosscoder's size)."""
    steer_flops: float
    """Per trial with A-exclusive features (plain crosscoders skip steering)."""
    n_steered: int
    """Trials with A-exclusive features."""
    dict_sizes: list[int]
    """Per trial."""
    mean_prompt: float
    """Mean tokens of a tool prompt."""
    judge_prompt_tokens: tuple[int, int]
    """Prompt tokens the (evaluator, steerer) replica keeps in its prefix caches, over both models."""
    notes: list[str]

    @property
    def judge_flops_total(self) -> float:
        return self.judge_setup_flops + self.n_trials * self.eval_flops + self.n_steered * self.steer_flops


def _shape(spec: SweepSpec) -> tuple[ModelShape, str]:
    # deferred: pair imports torch; a plan needs none
    from dfc_ray.pair import load_config

    try:
        if spec.pair.b.startswith("s3://"):  # resolving an s3:// pair downloads all of it
            raise FileNotFoundError(spec.pair.b)
        return ModelShape.from_config(load_config(spec.pair, "b", local_only=True)), f"config of {spec.pair.b}"
    except Exception as err:  # offline, s3://, or no such folder: fall back to a published shape
        if spec.pair.b in KNOWN_SHAPES:
            return KNOWN_SHAPES[spec.pair.b], f"published config of {spec.pair.b} (not on this machine)"
        raise ValueError(f"pair.b={spec.pair.b!r}: cannot load its config ({err}); expected a loadable model or one "
                         f"of {sorted(KNOWN_SHAPES)}") from None


def _corpus_tokens(spec: SweepSpec) -> tuple[int, int, float, bool]:
    """(records, tokens, mean prompt tokens of tool prompts, exact?) of the harvest corpus."""
    # deferred: harvest and pair import torch; a plan needs none
    from dfc_ray.harvest import build_corpus, plain_texts
    from dfc_ray.pair import load_tokenizer


    corpus = spec.harvest.corpus
    try:
        if (spec.pair.tokenizer or spec.pair.b).startswith("s3://"):
            raise FileNotFoundError(spec.pair.b)
        tokenizer = load_tokenizer(spec.pair, local_only=True)
    except Exception:
        tokenizer = None
    if tokenizer is not None:
        records = build_corpus(corpus, tokenizer)
        tool = [len(r.prompt_ids) for r in records if r.is_tool_prompt] or [0]
        return len(records), sum(len(r.prompt_ids) for r in records), sum(tool) / len(tool), True
    sources = [s.strip() for s in corpus.tasks.split(",") if s.strip()] if corpus.n_tasks > 0 else []
    tasks = [t for s in sources for t in load_tasks(s)][: corpus.n_tasks]
    tool = [min(corpus.max_tokens, len(json.dumps(t.messages) + json.dumps(t.tools)) / CHARS_PER_TOKEN) for t in tasks]
    plain = [min(corpus.max_tokens, len(p) / CHARS_PER_TOKEN) for p in plain_texts(corpus.plain_text, corpus.n_plain,
                                                                                   corpus.seed)]
    mean_tool = sum(tool) / len(tool) if tool else 0.0
    return len(tool) + len(plain), int(sum(tool) + sum(plain)), mean_tool, False


def _trial_settings(spec: SweepSpec) -> list[dict[str, Any]]:
    """Settings of every trial; a sampled axis is planned at its largest value (an upper bound)."""
    largest = {d.name: max(d.extremes(), key=lambda v: v if isinstance(v, (int, float)) else 0) for d in spec.search}
    points = spec.grid_points() or [{}]
    return [spec.trial_settings(point | largest) for point in points for _ in range(spec.num_samples)]


def _n_tasks(source: str, n: int) -> int:
    """How many tasks `source` gives with a cap of n (0 = all), as the judges load them."""

    tasks = len(load_tasks(source))
    return min(n, tasks) if n else tasks


@dataclass(frozen=True)
class JudgeSets:
    """Prompts per task set the judges use, counted once as they load them."""

    n_eval: int
    n_dev: int
    n_test: int
    n_targets: int

    @classmethod
    def of(cls, spec: SweepSpec) -> "JudgeSets":
        ev, st = spec.eval, spec.steering
        return cls(_n_tasks(ev.tasks, ev.n_tasks), _n_tasks(st.dev_tasks, st.n_dev), _n_tasks(st.test_tasks, st.n_test),
                   len(st.targets))

    def generations(self, st) -> tuple[int, int, int]:
        """Prompt generations (per trial evaluated, per trial steered, once per replica). A per-trial
        generation costs (1 + reply) tokens with the prefix cache, else a full prefill + reply; a
        one-time one (clean replies) always a full prefill + reply."""
        greedy = sum(st.min_set_pool - i for i in range(min(st.min_set_max, st.min_set_pool)))
        # grid, test + 2 controls, min set
        per_target = st.top_n * len(st.alphas) * self.n_dev + 3 * self.n_test + greedy * self.n_dev
        # once: clean A and B on eval and on dev (the clean gap), clean test replies per target
        once = 2 * self.n_eval + 2 * self.n_dev + self.n_targets * self.n_test
        return 2 * self.n_eval, self.n_targets * per_target, once

    def prompts_kept(self) -> tuple[int, int]:
        """Prompts whose prefill the (evaluator, steering) replica keeps, over both models."""
        return 2 * self.n_eval, 2 * self.n_dev + self.n_targets * self.n_test


def plan_work(spec: SweepSpec) -> Work:
    """Count the sweep's work from its spec."""
    shape, source = _shape(spec)
    n_records, tokens, mean_prompt, exact = _corpus_tokens(spec)
    positions = spec.positions_values()  # one harvest per distinct value, each over the same corpus
    # all_tokens: an upper bound (sinks are dropped); summed over the harvests
    rows = sum(n_records if p == "last_prompt_token" else tokens for p in positions)
    dtype_bytes = DTYPE_BYTES[spec.harvest.dtype]
    blocks = max(spec.layers) + 1
    context = tokens / max(n_records, 1) / 2
    # two models, stopping after the deepest layer, once per positions value
    harvest_flops = len(positions) * 2 * tokens * shape.forward_flops(blocks, context)
    trials = _trial_settings(spec)
    d, steps = shape.d_model, [t.get("steps", TrainConfig.steps) for t in trials]
    flops = [train_flops(d, t["dict_size"], t["batch_size"], s) for t, s in zip(trials, steps)]
    max_new = max(spec.eval.max_new_tokens, spec.steering.max_new_tokens)
    judge_sets = JudgeSets.of(spec)
    evaluated, steered, once = judge_sets.generations(spec.steering)
    reply = shape.forward_flops(shape.n_layers, mean_prompt + max_new / 2, lm_head=True)
    prefill = shape.forward_flops(shape.n_layers, mean_prompt / 2)
    # tokens a per-trial generation runs: the last prompt token with the prefix cache, else the whole prompt
    fed_eval = 1 if spec.eval.splice.leaves_prefix_alone else mean_prompt
    fed_steer = 1 if spec.steering.site.leaves_prefix_alone else mean_prompt
    n_steered = sum(1 for t in trials if t.get("a_exclusive", DFCConfig.a_exclusive) > 0)
    replicas = spec.resources.evaluators  # every replica generates its own clean replies
    judge_setup = replicas * once * (mean_prompt * prefill + max_new * reply)
    notes = [] if exact else [f"token counts estimated at {CHARS_PER_TOKEN:g} characters per token "
                              "(tokenizer not on this machine)"]
    if spec.search:
        notes.append("sampled axes planned at their largest values (an upper bound)")
    if len(positions) > 1:
        notes.append(f"{len(positions)} harvests (positions {', '.join(positions)}); rows and bytes summed over them")
    if spec.harvest.corpus.with_responses:
        notes.append("harvested responses' generation is not counted")
    judge_prompt_tokens = tuple(int(mean_prompt * n) for n in judge_sets.prompts_kept())
    return Work(shape, source, len(trials), tuple(spec.layers), n_records, tokens, exact, rows,
                rows * 2 * shape.d_model * dtype_bytes, harvest_flops, flops, judge_setup,
                evaluated * (fed_eval * prefill + max_new * reply), steered * (fed_steer * prefill + max_new * reply),
                n_steered, [t["dict_size"] for t in trials], mean_prompt, judge_prompt_tokens, notes)


# ---------------------------------------------------------------- measured rates


@dataclass
class Rates:
    """Achieved FLOP/s of each stage (None: that stage was not measured): a costs JSON holds these fields."""

    device: str
    """Where the rates were measured, e.g. "NVIDIA H200" or "cpu (2 cores, ...)"."""
    measured_on: str
    """The measured run's pair shape and spec, for the extrapolation note."""
    d_model: int
    harvest: float | None
    train: float | None
    judge: float | None
    per_device: bool = False
    """True: each rate is what ONE whole device does (benchmarks/gpu_judges.py), so a stage's device-hours
    are its FLOPs over the rate whatever share of a device the spec gives a trial or a replica. False (a
    sweep's costs.json): the rate of one worker holding the spec's share, which the device-hours multiply by."""

    def seconds(self, stage: str, flops: float) -> float | None:
        rate = getattr(self, stage)
        return None if rate is None else flops / rate

    def device_label(self) -> str:
        """A short name of the device for hour units: "H200", "cpu"."""
        return self.device.split(" (")[0].removeprefix("NVIDIA ").strip() or "device"


def train_flops(d_model: int, dict_size: int, batch_size: int, steps: int) -> float:
    """Dense-equivalent FLOPs of training one crosscoder (see the module docstring)."""
    return 24.0 * d_model * dict_size * batch_size * steps


def measure_rates(spec: SweepSpec, results: list[dict[str, Any]], seconds: dict[str, float], reused_harvest: bool,
                  device: str) -> Rates:
    """A finished run's rates: each stage's FLOPs over its measured seconds. Training counts the
    steps each trial really ran; the judges' compute seconds are summed over trials, with the
    one-time clean work counted once; a re-used (cached) harvest measured nothing."""
    work = plan_work(spec)
    ok = [r for r in results if r.get("status") == "ok"]
    train_s = sum(r["metrics"].get("train_s", 0.0) for r in ok)
    trained = sum(train_flops(work.shape.d_model, r["config"]["dict_size"], r["config"]["batch_size"],
                              r["metrics"].get("steps", 0)) for r in ok)
    judge_s = sum(r["metrics"].get("eval_compute_s", 0.0) + r["metrics"].get("steer_compute_s", 0.0) for r in ok)
    judged = work.judge_setup_flops + len(ok) * work.eval_flops + \
        sum(1 for r in ok if r["config"].get("a_exclusive", 0) > 0) * work.steer_flops
    harvest = None if reused_harvest or not seconds.get("harvest") else work.harvest_flops / seconds["harvest"]
    return Rates(device, f"{spec.name} (d_model {work.shape.d_model}, {work.shape.n_layers} blocks)",
                 work.shape.d_model,
                 harvest, trained / train_s if train_s > 0 else None, judged / judge_s if judge_s > 0 else None)


def load_rates(path: str) -> Rates:
    """Rates from a run folder (its costs.json) or a costs JSON file."""

    uri = path.rstrip("/")
    uri = uri if uri.endswith(".json") else f"{uri}/costs.json"
    fs, p = open_fs(uri)
    try:
        with fs.open_input_stream(p) as handle:
            return checked_rates(json.loads(handle.read()), redact(uri))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise FileNotFoundError(f"{redact(uri)}: no costs.json; "
                                "expected a finished run folder or a costs JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise ValueError(f"{redact(uri)}: not a costs JSON ({type(err).__name__}: {str(err)[:120]}); expected the "
                         "costs.json a finished sweep writes") from None


RATE_STAGES = ("harvest", "train", "judge")


def checked_rates(raw: Any, where: str) -> Rates:
    """A costs JSON's fields checked against the schema of `Rates` (a named device, a positive d_model, each
    stage's rate a finite number > 0 or null): a zero, negative, NaN or text rate would print device-hours that
    mean nothing. ValueError, one line naming the file and the field."""
    def refuse(field: str, expected: str) -> ValueError:
        value = raw.get(field) if isinstance(raw, dict) else raw
        return ValueError(f"{where}: field {field} = {value!r}: expected {expected}")

    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a costs JSON object (the costs.json a finished sweep writes), got "
                         f"{type(raw).__name__}")
    known = {f.name for f in fields(Rates)}
    if unknown := [key for key in raw if key not in known]:
        raise refuse(unknown[0], f"no such field; a costs JSON holds {', '.join(sorted(known))}")
    for name in ("device", "measured_on", "d_model"):
        if name not in raw:
            raise ValueError(f"{where}: field {name} missing; expected the costs.json a finished sweep writes")
    for name in ("device", "measured_on"):
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise refuse(name, "a non-empty string (where the rates were measured)")
    if isinstance(raw["d_model"], bool) or not isinstance(raw["d_model"], int) or raw["d_model"] < 1:
        raise refuse("d_model", "a positive integer")
    for stage in RATE_STAGES:
        rate = raw.get(stage)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not math.isfinite(rate) or rate <= 0):
            raise refuse(stage, "a finite FLOP/s rate > 0, or null (not measured)")
    if not isinstance(raw.get("per_device", False), bool):
        raise refuse("per_device", "true or false")
    return Rates(**raw)


def peak_memory_mb() -> float:
    """This process's peak memory: CUDA allocations on a GPU, else the resident set size."""

    # deferred: torch only to read the device's memory
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_name() -> str:

    # deferred: torch only to read the device's memory
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (fp32/bf16 as configured)"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------- the plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _device_hours(seconds: float) -> str:
    """Device-hours to 2 decimals, or 3 significant digits below 0.1 h (a laptop plan's CPU-hours)."""
    hours = seconds / 3600
    return f"{hours:.2f}" if hours >= 0.1 else f"{hours:.3g}"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "? (no measured rate)"
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def device_class(device: str) -> str:
    """"cpu" for rates measured on a CPU (`Rates.device` "cpu (2 cores, …)"), "gpu" for any other device."""
    return "cpu" if device.strip().lower().startswith("cpu") else "gpu"


def plan_device_class(spec: SweepSpec) -> str:
    """"gpu" when the spec gives trials or judge replicas a GPU, else "cpu"."""
    return "gpu" if spec.resources.gpu or spec.resources.evaluator_gpu else "cpu"


WORKERS = {"harvest": "harvest actor", "train": "trial", "judge": "judge replica"}
"""What holds each stage's share of a device."""


def worker_shares(spec: SweepSpec) -> dict[str, float]:
    """The share of a device each stage's worker holds: GPUs on a GPU plan (a harvest actor a whole one), CPUs
    on a CPU plan (a harvest actor takes one)."""
    res = spec.resources
    if plan_device_class(spec) == "gpu":
        return {"harvest": 1.0, "train": res.gpu or 1.0, "judge": res.evaluator_gpu or 1.0}
    return {"harvest": 1.0, "train": res.cpu, "judge": res.evaluator_cpu or 1.0}


def hour_unit(spec: SweepSpec, rates: Rates) -> str:
    """The unit of the plan's device time: hours of the named GPU ("H200-h") on a GPU plan, "CPU-h" on a CPU one."""
    if plan_device_class(spec) == "cpu":
        return "CPU-h"
    return f"{rates.device_label()}-h"  # hours of that GPU, e.g. "H200-h"


def rates_rule(spec: SweepSpec, work: Work, rates: Rates) -> list[str]:
    """How a costs file's rates plan this spec, as printed under the plan. Rates of another device class
    (CPU rates for a plan on GPUs, or the reverse) are refused: their FLOP/s differ by orders of magnitude. Rates
    measured at another d_model are used by the documented width rule: the plan counts each stage's FLOPs at
    its own width and divides them by the measured FLOP/s (FLOP/s taken as independent of width)."""
    measured, planned = device_class(rates.device), plan_device_class(spec)
    if measured != planned:
        res = spec.resources
        raise ValueError(f"--costs: rates measured on {rates.device!r} cannot plan {spec.name}, which runs on "
                         f"{planned.upper()}s (resources.gpu {res.gpu:g}, resources.evaluator_gpu "
                         f"{res.evaluator_gpu:g}); expected a costs file measured on a {planned.upper()} "
                         f"({RATES_HINT[planned]})")
    lines = [f"rates measured on {rates.device} by {rates.measured_on}"
             + ("; each rate is one whole device's" if rates.per_device else
                f"; each rate is one worker's, so device time = its time × the {planned.upper()}s it holds")]
    if rates.d_model != work.shape.d_model:
        ratio = work.shape.d_model / rates.d_model
        lines.append(f"width rule: measured at d_model {rates.d_model}, planned at d_model {work.shape.d_model} "
                     f"(×{ratio:.3g}): every stage's FLOPs are counted at the planned width (training ∝ d_model × "
                     f"dict_size, the models' blocks ∝ d_model²) and divided by the FLOP/s measured at "
                     f"{rates.d_model}; wider matrices usually run nearer a device's peak, so the hours are "
                     f"{'an upper' if ratio > 1 else 'a lower'} bound")
    return lines


RATES_HINT = {"cpu": "run any sweep on CPU, e.g. `dfc-ray sweep organism48` (about 12 minutes on 2 cores), and "
                     "pass its run folder; benchmarks/costs/ has one measured on 2 cores",
              "gpu": "run `python benchmarks/gpu_judges.py --out runs/gpu-check` on one GPU of the kind the plan "
                     "uses (writes runs/gpu-check/costs.json), or pass a sweep run folder from such GPUs"}
"""What to run to get rates of each device class."""


def _concurrency(spec: SweepSpec) -> str:
    """How many trials run at once, per GPU on a GPU plan and per CPU on a CPU one."""
    res = spec.resources
    cap = f"at most {res.max_concurrent} trials at once; " if res.max_concurrent else ""
    if res.gpu:
        return cap + f"{max(1, int(1 / res.gpu))} trial(s) per GPU"
    per = f"{int(1 / res.cpu)} trials per CPU" if res.cpu < 1 else \
        f"one trial per {res.cpu:g} CPUs" if res.cpu > 1 else "one trial per CPU"
    return cap + per


def device_seconds(spec: SweepSpec, work: Work, rates: Rates) -> dict[str, float | None]:
    """Seconds of device time per stage (harvest, train, judge): FLOPs over the rate, times the share of a
    device a worker holds (`worker_shares`) when the rate is a run's (`Rates.per_device`)."""
    shares = worker_shares(spec)
    flops = {"harvest": work.harvest_flops, "train": sum(work.train_flops), "judge": work.judge_flops_total}
    out: dict[str, float | None] = {}
    for stage, stage_flops in flops.items():
        seconds = rates.seconds(stage, stage_flops)
        out[stage] = None if seconds is None else seconds * (1.0 if rates.per_device else shares[stage])
    return out


def plan_table(spec: SweepSpec, work: Work, rates: Rates | None) -> list[tuple[str, str, str]]:
    """(stage, what, cost) rows of the plan."""
    res = spec.resources
    shape = work.shape
    weight_bytes = shape.params * DTYPE_BYTES.get(spec.pair.dtype, 4)
    harvest_actors = spec.harvest.num_actors
    judge_gpu = res.evaluator_gpu
    replicas = res.evaluators
    device = device_seconds(spec, work, rates) if rates else {"harvest": None, "train": None, "judge": None}
    unit = hour_unit(spec, rates) if rates else ""
    shares, kind = worker_shares(spec), plan_device_class(spec).upper()

    def cost(stage: str, what: str) -> str:
        """One worker's time and the device-hours it costs, in the plan's unit (GPU-h or CPU-h)."""
        if rates is None:
            return f"{what}: needs measured rates (below)"
        hours = device[stage]
        if hours is None:
            return f"{what}: {_hours(None)}"
        if rates.per_device:
            return f"{what}: {_device_hours(hours)} {unit}"
        worker = rates.seconds(stage, {"harvest": work.harvest_flops, "train": sum(work.train_flops),
                                       "judge": work.judge_flops_total}[stage])
        return (f"{what}: {_hours(worker)} of {WORKERS[stage]} time = {_device_hours(hours)} {unit} "
                f"at {shares[stage]:g} {kind} per {WORKERS[stage]}")

    def judge_batch(spec_batch: int) -> int:
        """A replica's decode batch: the spec's on CPU, at most MAX_MEMORY_BATCH chosen from memory on a GPU."""
        # deferred: generation imports torch; a plan needs none unless it plans GPU judges
        from dfc_ray.generation import MAX_MEMORY_BATCH

        return MAX_MEMORY_BATCH if judge_gpu else spec_batch

    mark = "" if work.tokens_exact else " (estimated)"
    rows = [
        ("pair", f"{shape.d_model} d_model, {shape.n_layers} blocks, {shape.n_heads}/{shape.n_kv_heads} heads, "
                 f"{shape.params / 1e6:,.1f} M params each ({work.shape_source})",
         _gb(weight_bytes) + " of weights per model"),
        ("harvest",
         f"{work.prompts:,} records, {work.tokens:,} tokens{mark} → {work.rows_per_layer:,} rows per layer × "
                    f"{len(work.layers)} layer(s) {list(work.layers)}",
         f"{_gb(work.bytes_per_layer)} per layer; {work.harvest_flops:.3g} FLOPs; "
         + cost("harvest", "device time") + f", shared by {harvest_actors} actor(s)"),
        ("train", f"{work.n_trials} trials; {max(work.train_flops):.3g} FLOPs for the largest",
         f"{sum(work.train_flops):.3g} FLOPs; " + cost("train", "device time")),
        ("judge", f"2 pools × {replicas} replica(s) ({judge_gpu or 0} GPU each); "
                  f"{work.eval_flops:.3g} FLOPs per trial, + {work.steer_flops:.3g} for each of {work.n_steered} "
                  f"DFCs steered, + {work.judge_setup_flops:.3g} once",
         cost("judge", "device time")),
    ]
    if all(v is not None for v in device.values()):
        total = sum(v for v in device.values() if v is not None)
        split = ", ".join(f"{stage} {v / total:.0%}" for stage, v in sorted(device.items(), key=lambda i: -(i[1] or 0))
                          if v is not None)
        rows.append(("total", f"device time, all stages ({unit.removesuffix('-h')}-hours; {split})",
                     f"{_device_hours(total)} {unit}"))
    dict_size = max(work.dict_sizes)
    crosscoder_bytes = 4 * (4 * shape.d_model * dict_size + dict_size + 2 * shape.d_model)  # fp32 W_enc, W_dec, biases
    batch = spec.train["batch_size"]
    # weights, gradients and Adam moments + a batch's inputs, reconstructions and pre-activations (fp32)
    trial_mem = crosscoder_bytes * ADAM_COPIES + 4 * batch * (4 * shape.d_model + 3 * dict_size)
    kv = shape.kv_bytes_per_token(DTYPE_BYTES.get(spec.pair.dtype, 4))
    harvest_mem = 2 * weight_bytes + 2 * spec.harvest.batch_size * spec.harvest.corpus.max_tokens * \
        shape.d_model * (len(work.layers) + 2) * 4
    rows += [
        ("memory: trial",
         f"largest crosscoder ({dict_size:,} features) {crosscoder_bytes / 1e6:.0f} MB fp32 × {ADAM_COPIES} "
                          f"+ a batch of {batch}", _gb(trial_mem)),
        *((f"memory: {name} replica", f"A + B weights + prefix caches of {tokens:,} prompt tokens + a batch of "
                                      f"{batch}'s KV caches (static buffers, prefill, prefix copy)",
           _gb(2 * weight_bytes + (tokens + batch * (3 * work.mean_prompt + new)) * kv))
          for name, tokens, batch, new in zip(("evaluator", "steering"), work.judge_prompt_tokens,
                                              map(judge_batch, (spec.eval.batch_size, spec.steering.batch_size)),
                                              (spec.eval.max_new_tokens, spec.steering.max_new_tokens))),
        ("memory: harvest actor", "A + B weights + one batch of activations", _gb(harvest_mem)),
        ("actors", f"{harvest_actors} harvest actor(s), {2 * replicas} judge replica(s)",
         _concurrency(spec)),
    ]
    return rows


def print_plan(spec: SweepSpec, rates: Rates | None) -> Work:

    work = plan_work(spec)
    table = Table(title=f"plan: {spec.name} ({work.n_trials} trials) — nothing has been run")
    for column in ("stage", "what", "cost"):
        table.add_column(column, overflow="fold")
    for row in plan_table(spec, work, rates):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if rates is None:
        kind = plan_device_class(spec)
        console.print(f"no measured rates, so FLOPs only. To get {kind.upper()} rates: {RATES_HINT[kind]}; then "
                      f"`dfc-ray sweep --plan {spec.name} --costs RUN_DIR_OR_COSTS_JSON`")
    else:
        for line in rates_rule(spec, work, rates):
            console.print(line)
    for n in work.notes + ["memory counts tensors on the device; a CPU process adds about 0.7 GB of libraries"]:
        console.print(f"note: {n}")
    return work


def write_costs(run_dir: Path, rates: Rates) -> None:
    (run_dir / "costs.json").write_text(json.dumps(asdict(rates), indent=1) + "\n")

