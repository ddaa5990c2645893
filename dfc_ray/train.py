"""Training: one crosscoder, or a group of them fed from ONE pass over a stream of batches.

The input is just an iterator of `(batch, 2, d_model)` tensors (a folder reader here, the
activation store later), so every data source trains the same way. Each batch is fetched once
and fed to every member of the group; a member that diverges stops alone.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from torch import Tensor

from dfc_ray.config import DFCConfig, TrainConfig
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.preflight import resolve_device

METRICS = ("loss", "recon", "fvu_a", "fvu_b", "l0", "l0_a_exclusive", "l0_b_exclusive", "l0_shared",
           "aux", "l1", "dead_frac")
ACTIVATION_DTYPES = ("F16", "BF16", "F32")


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


class Trainer:
    """A member's crosscoder, optimizer and bookkeeping.

    A step never reads a number back from the device: its metrics wait on the device in `window` until
    `flush` reads the whole window at once (every `log_every` steps and at the end), which is also when a
    non-finite loss or gradient is found and AuxK's dead-feature capacity is refreshed."""

    def __init__(self, member: Member):
        self.name, self.cfg = member.name, member.train
        self.device = torch.device(resolve_device(self.cfg.device, "train.device"))  # one line for a missing one
        self.model = DedicatedFeatureCrosscoder(member.dfc, seed=self.cfg.seed).to(self.device)
        self.model.formulation = self.cfg.formulation
        weights = [p for n, p in self.model.named_parameters() if not n.startswith("b_")]
        biases = [p for n, p in self.model.named_parameters() if n.startswith("b_")]
        cuda = self.device.type == "cuda"  # fused kernels there; elsewhere the multi-tensor loop (same bits as
        self.optimizer = torch.optim.AdamW(  # the per-tensor one, which torch picks by default on CPU, but faster)
            [{"params": weights, "weight_decay": self.cfg.weight_decay}, {"params": biases, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=self.cfg.betas, fused=True if cuda else None, foreach=None if cuda else True)
        self.autocast = self.device.type == "cuda" and self.cfg.bf16
        self.step, self.status, self.reason = 0, "running", ""
        self.recent: deque[dict[str, float]] = deque(maxlen=self.cfg.log_every)
        self.window: list[tuple[float, Tensor]] = []
        """(learning rate, stacked METRICS + grad_norm) of the steps taken since the last flush."""
        # On CPU a read-back costs nothing, so AuxK counts its dead features exactly every step.
        self.dead_capacity: int | None = None if self.device.type == "cpu" else 0

    @property
    def running(self) -> bool:
        return self.status == "running" and self.step < self.cfg.steps

    def train_step(self, x: Tensor) -> None:
        """One optimizer step on x (already on the device); its metrics stay on the device."""
        lr = self.cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.loss(x, dead_capacity=self.dead_capacity)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        params = list(self.model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.window.append((lr, torch.stack([out[k].detach().float() for k in METRICS] + [grad_norm.float()])))
        self.optimizer.step()
        self.step += 1

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Read the window's metrics back (one sync): [(1-based step, metrics)] up to the first non-finite
        loss or gradient norm, which ends the member as diverged at that step (its later steps are void:
        a diverged member keeps no checkpoint)."""
        if not self.window:
            return []
        first = self.step - len(self.window)
        values = torch.stack([m for _, m in self.window]).tolist()
        lrs = [lr for lr, _ in self.window]
        self.window.clear()
        done = []
        for i, (lr, row) in enumerate(zip(lrs, values)):
            metrics = dict(zip(METRICS + ("grad_norm",), row)) | {"lr": lr}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                what = "loss" if not math.isfinite(metrics["loss"]) else "gradient norm"
                self.status, self.reason, self.step = "diverged", f"non-finite {what} at step {first + i}", first + i
                break
            self.recent.append(metrics)
            done.append((first + i + 1, metrics))
        if self.status == "running" and self.step >= self.cfg.steps:
            self.status = "ok"
        if self.dead_capacity is not None and done:
            n_dead = round(done[-1][1]["dead_frac"] * self.model.cfg.dict_size)
            self.dead_capacity = 0 if n_dead == 0 else 1 << (2 * n_dead - 1).bit_length()  # ≥ 2·n_dead: room to grow
        return done

    def result(self) -> MemberResult:
        metrics = {k: sum(m[k] for m in self.recent) / len(self.recent) for k in self.recent[0]} if self.recent else {}
        return MemberResult(self.name, self.status, self.reason, self.step, metrics, self.model)


def train_group(members: Sequence[Member], batches: Iterable[Tensor], on_metrics: MetricsHook | None = None,
                out_dir: str | Path | None = None, progress: bool = False) -> list[MemberResult]:
    """Train every member on the same stream: each batch is fetched once and fed to all.

    Normalization is fitted per member on the first `norm_rows` rows of the stream (those rows
    are then trained on too). `on_metrics(name, step, metrics)` is called for every step of every
    member, in order, once per `log_every` window (when the window's metrics are read back from the
    device). With `out_dir`, each member gets `out_dir/name/` (checkpoint unless diverged,
    plus `train.json` with its status and final metrics)."""
    names = [m.name for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"group member names {names}: expected at least one, all distinct")
    if len({m.dfc.d_model for m in members}) != 1:
        raise ValueError(f"group d_model values {[m.dfc.d_model for m in members]}: expected one d_model")
    d_model = members[0].dfc.d_model
    trainers = [Trainer(m) for m in members]

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

    def flush(t: Trainer, task: TaskID) -> None:
        done = t.flush()
        for step, metrics in done:
            if on_metrics is not None:
                on_metrics(t.name, step, metrics)
        if t.status == "diverged":
            display.update(task, completed=t.step, stats=f"[red]{t.reason}")
        elif done:
            m = done[-1][1]
            display.update(task, completed=t.step, stats=f"loss {m['loss']:.4f}  fvu A {m['fvu_a']:.3f} "
                           f"B {m['fvu_b']:.3f}  l0 {m['l0']:.1f}  dead {m['dead_frac']:.1%}")

    with display:
        for batch in itertools.chain(prefix, stream):
            running = [(t, task) for t, task in zip(trainers, tasks) if t.running]
            if not running:
                break
            on_device: dict[torch.device, Tensor] = {}  # one copy per device, shared by the members there
            for t, task in running:
                if t.device not in on_device:
                    # From pinned memory the copy is queued behind the running step instead of holding the host.
                    host = batch.pin_memory() if t.device.type == "cuda" and batch.device.type == "cpu" else batch
                    on_device[t.device] = host.to(t.device, non_blocking=True).float()
                t.train_step(on_device[t.device])
                if len(t.window) >= t.cfg.log_every or not t.running:
                    flush(t, task)
        for t, task in zip(trainers, tasks):
            flush(t, task)
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
