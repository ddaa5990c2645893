"""Training: one crosscoder, or a group of them fed from ONE pass over a stream of batches.

The input is just an iterator of `(batch, 2, d_model)` tensors (a folder reader here, the
activation store later), so every data source trains the same way. Each batch is fetched once
and fed to every member of the group; a member that diverges stops alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors import safe_open
from torch import Tensor

from dfc_ray.crosscoder import SPARSITIES, DedicatedFeatureCrosscoder, DFCConfig

METRICS = ("loss", "recon", "fvu_a", "fvu_b", "l0", "l0_a_exclusive", "l0_b_exclusive", "l0_shared",
           "aux", "l1", "dead_frac")
ACTIVATION_DTYPES = ("F16", "BF16", "F32")


@dataclass
class TrainConfig:
    steps: int = 9000
    """Optimizer steps (the seed study: 9000 at batch 1024). The batch size is the data source's."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to `lr` over this many steps."""
    decay: str = "linear"
    """LR decay to 0 over the last `decay_frac` of the steps: "linear", "cosine" or "none"."""
    decay_frac: float = 0.2
    """Fraction of `steps` at the end over which the LR decays to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on encoder/decoder weights (never on biases)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), or a torch device string."""
    bf16: bool = True
    """bf16 autocast on CUDA (fp32 master weights and fp32 losses); CPU always trains in fp32."""
    norm_rows: int = 8192
    """Rows from the start of the stream used to fit the normalization statistics."""
    log_every: int = 50
    """Refresh the progress display every this many steps; final metrics average the last window."""
    seed: int = 0
    """Seed of the crosscoder's initialization."""

    def __post_init__(self) -> None:
        if self.decay not in ("linear", "cosine", "none"):
            raise ValueError(f"TrainConfig.decay={self.decay!r}: expected 'linear', 'cosine' or 'none'")
        for name in ("steps", "norm_rows", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected a positive integer")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"TrainConfig.decay_frac={self.decay_frac!r}: expected a number in [0, 1]")
        self.betas = tuple(self.betas)

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: warm-up, constant, then decay to 0."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        start = self.steps * (1 - self.decay_frac)
        if self.decay != "none" and step >= start:
            progress = (step - start) / max(1.0, self.steps - start)
            factor *= 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * factor


@dataclass
class Member:
    """One crosscoder to train in a group."""

    name: str
    """Folder name of its checkpoint and key in metric callbacks."""
    dfc: DFCConfig
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MemberResult:
    name: str
    status: str
    """"ok" (all steps done), "diverged" (non-finite loss or gradient) or "data_exhausted"."""
    reason: str
    steps: int
    """Optimizer steps actually taken."""
    metrics: dict[str, float]
    """Mean of each metric over the last `log_every` steps."""
    model: DedicatedFeatureCrosscoder
    checkpoint: Path | None = None


MetricsHook = Callable[[str, int, dict[str, float]], None]


class _Trainer:
    """A member's crosscoder, optimizer and bookkeeping."""

    def __init__(self, member: Member):
        self.name, self.cfg = member.name, member.train
        device = self.cfg.device
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.model = DedicatedFeatureCrosscoder(member.dfc, seed=self.cfg.seed).to(self.device)
        weights = [p for n, p in self.model.named_parameters() if not n.startswith("b_")]
        biases = [p for n, p in self.model.named_parameters() if n.startswith("b_")]
        self.optimizer = torch.optim.AdamW(
            [{"params": weights, "weight_decay": self.cfg.weight_decay}, {"params": biases, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=self.cfg.betas)
        self.autocast = self.device.type == "cuda" and self.cfg.bf16
        self.step, self.status, self.reason = 0, "running", ""
        self.recent: deque[dict[str, float]] = deque(maxlen=self.cfg.log_every)

    def train_step(self, x: Tensor) -> dict[str, float] | None:
        """One optimizer step; returns the step's metrics, or None (and stops) on divergence."""
        x = x.to(self.device, torch.float32, non_blocking=True)
        lr = self.cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        params = list(self.model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        values = torch.stack([out[k].detach().float() for k in METRICS] + [grad_norm.float()]).tolist()
        metrics = dict(zip(METRICS + ("grad_norm",), values)) | {"lr": lr}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            what = "loss" if not math.isfinite(metrics["loss"]) else "gradient norm"
            self.status, self.reason = "diverged", f"non-finite {what} at step {self.step}"
            return None
        self.optimizer.step()
        self.step += 1
        self.recent.append(metrics)
        if self.step >= self.cfg.steps:
            self.status = "ok"
        return metrics

    def result(self) -> MemberResult:
        metrics = {k: sum(m[k] for m in self.recent) / len(self.recent) for k in self.recent[0]} if self.recent else {}
        return MemberResult(self.name, self.status, self.reason, self.step, metrics, self.model)


def train_group(members: Sequence[Member], batches: Iterable[Tensor], on_metrics: MetricsHook | None = None,
                out_dir: str | Path | None = None, progress: bool = False) -> list[MemberResult]:
    """Train every member on the same stream: each batch is fetched once and fed to all.

    Normalization is fitted per member on the first `norm_rows` rows of the stream (those rows
    are then trained on too). `on_metrics(name, step, metrics)` is called after every step of
    every member. With `out_dir`, each member gets `out_dir/name/` (checkpoint unless diverged,
    plus `train.json` with its status and final metrics)."""
    names = [m.name for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"group member names {names}: expected at least one, all distinct")
    if len({m.dfc.d_model for m in members}) != 1:
        raise ValueError(f"group d_model values {[m.dfc.d_model for m in members]}: expected one d_model")
    d_model = members[0].dfc.d_model
    trainers = [_Trainer(m) for m in members]

    stream = iter(batches)
    prefix, rows = [], 0
    while rows < max(t.cfg.norm_rows for t in trainers):
        batch = next(stream, None)
        if batch is None:
            break
        if batch.ndim != 3 or batch.shape[1:] != (2, d_model):
            raise ValueError(f"batch of shape {tuple(batch.shape)}: expected (batch, 2, {d_model})")
        prefix.append(batch)
        rows += len(batch)
    if not prefix:
        raise ValueError("the batch stream is empty: expected (batch, 2, d_model) tensors")
    sample = torch.cat(prefix)
    for t in trainers:
        t.model.fit_normalization(sample[: t.cfg.norm_rows].to(t.device))

    display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), disable=not progress)
    tasks = [display.add_task(t.name, total=t.cfg.steps, stats="") for t in trainers]
    with display:
        for batch in itertools.chain(prefix, stream):
            running = [(t, task) for t, task in zip(trainers, tasks) if t.status == "running"]
            if not running:
                break
            for t, task in running:
                metrics = t.train_step(batch)
                if metrics is None:
                    display.update(task, stats=f"[red]{t.reason}")
                    continue
                if on_metrics is not None:
                    on_metrics(t.name, t.step, metrics)
                stats = None
                if t.step % t.cfg.log_every == 0 or t.status != "running":
                    stats = (f"loss {metrics['loss']:.4f}  fvu A {metrics['fvu_a']:.3f} B {metrics['fvu_b']:.3f}"
                             f"  l0 {metrics['l0']:.1f}  dead {metrics['dead_frac']:.1%}")
                display.update(task, advance=1, **({"stats": stats} if stats else {}))
    for t in trainers:
        if t.status == "running":
            t.status, t.reason = "data_exhausted", f"the stream ended after {t.step} of {t.cfg.steps} steps"
    results = [t.result() for t in trainers]
    if out_dir is not None:
        for r, m in zip(results, members):
            folder = Path(out_dir) / r.name
            if r.status != "diverged":
                r.model.save(folder)
                r.checkpoint = folder
            folder.mkdir(parents=True, exist_ok=True)
            record = {"status": r.status, "reason": r.reason, "steps": r.steps, "metrics": r.metrics,
                      "train": asdict(m.train)}
            (folder / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return results


def train(dfc: DFCConfig, cfg: TrainConfig, batches: Iterable[Tensor], **kwargs) -> MemberResult:
    """Train a single crosscoder (a group of one); kwargs as for `train_group`."""
    return train_group([Member("dfc", dfc, cfg)], batches, **kwargs)[0]


# ---- a folder of activation files ---------------------------------------------------------------
def scan_activation_folder(path: str | Path) -> tuple[list[Path], int, int]:
    """Validate a folder of `*.safetensors` files each holding `activations` (rows, 2, d_model).

    Returns (files, d_model, total rows) without reading the data."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such activation folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    d_model, rows = None, 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if "activations" not in f.keys():
                raise ValueError(f"{file}: no tensor 'activations' (found {sorted(f.keys())})")
            sl = f.get_slice("activations")
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if len(shape) != 3 or shape[1] != 2 or shape[0] < 1 or (d_model is not None and shape[2] != d_model):
            expected = f"(rows, 2, {d_model})" if d_model is not None else "(rows, 2, d_model)"
            raise ValueError(f"{file}: activations of shape {shape}, expected {expected}")
        if dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"{file}: activations of dtype {dtype}, expected one of {', '.join(ACTIVATION_DTYPES)}")
        d_model, rows = shape[2], rows + shape[0]
    return files, d_model, rows


def folder_batches(files: Sequence[Path], batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless fp32 batches: each epoch visits the files in a new order, rows shuffled per file."""
    gen = torch.Generator().manual_seed(seed)
    carry = None
    while True:
        for i in torch.randperm(len(files), generator=gen).tolist():
            with safe_open(str(files[i]), framework="pt") as f:
                x = f.get_tensor("activations")
            x = x[torch.randperm(len(x), generator=gen)].float()
            if carry is not None:
                x = torch.cat([carry, x])
            for start in range(0, len(x) - batch_size + 1, batch_size):
                yield x[start:start + batch_size]
            carry = x[len(x) - len(x) % batch_size:] if len(x) % batch_size else None


# ---- CLI ----------------------------------------------------------------------------------------
# Defaults of the seed study for real data; a smaller setup for --example (about a minute on 2 cores).
REAL_DEFAULTS = dict(dict_size=8192, k=45, a_exclusive=0.05, b_exclusive=0.05, steps=9000, batch_size=1024, lr=1e-4,
                     l1_mode="seed", l1_excl=0.0, l1_shared=0.0)
# The example penalizes shared features (partition L1): without it, TopK lets shared features learn
# one-sided decoders and absorb the planted exclusive features (see docs/crosscoder.md).
EXAMPLE_DEFAULTS = dict(dict_size=128, k=6, a_exclusive=0.1, b_exclusive=0.1, steps=2000, batch_size=256, lr=3e-3,
                        l1_mode="partition", l1_excl=0.0, l1_shared=2e-2)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a crosscoder on a folder of paired activations (or --example)",
                              description="Train one DFC on DATA_DIR (*.safetensors, each with 'activations' "
                                          "(rows, 2, d_model)) or on planted-feature example data.")
    p.add_argument("data_dir", nargs="?", help="folder of activation files, or with --layer an activation store "
                                               "(the URI `dfc-ray harvest` prints)")
    p.add_argument("--layer", type=int, help="read DATA_DIR as an activation store and train on this layer")
    p.add_argument("--example", action="store_true", help="train on planted-feature data (no activations needed)")
    p.add_argument("--out", required=True, help="output folder for the checkpoint")
    p.add_argument("--dict-size", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--a-exclusive", type=float, help="A-exclusive share of dict_size (0.05 = 5%%)")
    p.add_argument("--b-exclusive", type=float, help="B-exclusive share of dict_size")
    p.add_argument("--sparsity", choices=SPARSITIES, default="topk")
    p.add_argument("--l1-mode", choices=("seed", "partition"))
    p.add_argument("--l1-excl", type=float)
    p.add_argument("--l1-shared", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from dfc_ray.synthetic import PlantedConfig, PlantedFeatures

    if args.example == (args.data_dir is not None):
        raise ValueError("give either DATA_DIR or --example (exactly one)")
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in (EXAMPLE_DEFAULTS if args.example else REAL_DEFAULTS).items()}
    if settings["batch_size"] < 1:
        raise ValueError(f"--batch-size={settings['batch_size']}: expected a positive integer")
    planted = None
    if args.example:
        planted = PlantedFeatures(PlantedConfig(seed=args.seed))
        d_model, batches = planted.cfg.d_model, planted.batches(settings["batch_size"], seed=args.seed + 1)
    elif args.layer is not None:  # what `dfc-ray harvest` writes; every shard checked before training
        from dfc_ray import store  # deferred: pyarrow loads only for store input

        manifest = store.validate_store(args.data_dir, args.layer)
        d_model, rows = manifest.spec.d_model, manifest.total_rows
        if rows < settings["batch_size"]:
            raise ValueError(f"{args.data_dir}: {rows} rows, fewer than --batch-size={settings['batch_size']}")
        batches = store.iter_layer_batches(args.data_dir, args.layer, settings["batch_size"], shuffle=True,
                                           seed=args.seed, epochs=10**9, drop_last=True)
    else:
        if list(Path(args.data_dir).glob("layer_*/manifest.json")):
            raise ValueError(f"{args.data_dir}: an activation store; pass --layer L to train on one of its layers")
        files, d_model, rows = scan_activation_folder(args.data_dir)
        if rows < settings["batch_size"]:
            raise ValueError(f"{args.data_dir}: {rows} rows, fewer than --batch-size={settings['batch_size']}")
        batches = folder_batches(files, settings["batch_size"], seed=args.seed)
    dfc = DFCConfig(d_model=d_model, dict_size=settings["dict_size"], k=settings["k"],
                    a_exclusive=settings["a_exclusive"], b_exclusive=settings["b_exclusive"],
                    sparsity=args.sparsity, l1_mode=settings["l1_mode"], l1_excl=settings["l1_excl"],
                    l1_shared=settings["l1_shared"])
    cfg = TrainConfig(steps=settings["steps"], lr=settings["lr"], warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, device=args.device, seed=args.seed,
                      log_every=max(1, min(50, settings["steps"] // 10)))
    result = train_group([Member("crosscoder", dfc, cfg)], batches, out_dir=args.out,
                         progress=not args.no_progress)[0]
    console = Console()
    table = Table(title=f"crosscoder: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    for name in ("fvu_a", "fvu_b", "l0", "l0_a_exclusive", "l0_b_exclusive", "l0_shared", "dead_frac"):
        table.add_column(name, justify="right")
    m = result.metrics
    table.add_row(*(f"{m[k]:.3f}" if k in m else "-" for k in
                    ("fvu_a", "fvu_b", "l0", "l0_a_exclusive", "l0_b_exclusive", "l0_shared", "dead_frac")))
    console.print(table)
    if planted is not None:
        rec = planted.recovery(result.model.cpu())
        console.print("planted-feature recovery (mean over planted features of the best cosine to a decoder "
                      f"row of the matching partition): A-only {rec['a_only']:.3f}  B-only {rec['b_only']:.3f}  "
                      f"shared {rec['shared']:.3f}")
    if result.checkpoint is not None:
        console.print(f"checkpoint: {result.checkpoint}")
    return 0 if result.status == "ok" else 1
