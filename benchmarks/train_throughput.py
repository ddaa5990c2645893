"""Training-step throughput: dfc-ray's trainer step in each formulation vs a seed-style dense loop, and
N crosscoders trained as a group in one process vs N separate processes.

    PYTHONPATH=. python benchmarks/train_throughput.py                       # CPU, one shape (docs/BENCHMARKS.md)
    PYTHONPATH=. python benchmarks/train_throughput.py --table --group 1,4,8,16   # GPU: the issue-19 table
    PYTHONPATH=. python benchmarks/train_throughput.py --table --toy --group 1,2  # the same, CPU-sized

Formulations (docs/crosscoder.md): "dense" (GEMMs over scattered codes) and "sparse" (on CUDA the
Triton kernels of dfc_ray/kernels.py, on CPU embedding_bag). A dfc-ray step is exactly what the trainer
runs (`dfc_ray.train.Trainer.train_step`: bf16 autocast on CUDA, fp32 master weights, gradient clipping,
AdamW — fused on CUDA — and the metrics read back once per `log_every` window). The reference is the seed
study's loop: an einsum encoder over masked dense weights (2, d_model, dict), dense TopK codes, an einsum
decoder, masks re-applied after every step, the same optimizer. Inputs are random (never zeros) and
rotate over 4 batches. Timing: warm-up steps, then the median over `--repeats` of `--steps` steps, with
the device synchronized around each repeat.

GEMM TFLOP/s counts the five GEMM passes the dense formulation executes (encoder forward, decoder
forward, decoder weight gradient, code gradient, encoder weight gradient: 10·batch·W FLOPs, W = Σ of the
features' encoder widths) over the step time, against a bf16 matmul measured here (8192³ on CUDA).
Group training: N members fed from one stream of CPU batches (fp16, as the store holds them) in one
process, vs N processes each training one member on its own stream at the same time, all started
behind a file barrier; rows/s counts every member's rows. No ray/optuna/s3fs needed (GPU image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfc_ray.crosscoder import DFCConfig
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures
from dfc_ray.train import Member, Trainer, TrainConfig, train

PAPER_SHAPES = [  # (batch, dict_size, k): the table at d_model 2048
    (1024, 16384, 90), (4096, 16384, 90), (4096, 16384, 160), (4096, 32768, 90)]
TOY_SHAPES = [(256, 2048, 16), (1024, 2048, 16), (1024, 2048, 32), (1024, 4096, 16)]


class DenseReference(torch.nn.Module):
    """The seed study's loop: dense masked weights, dense TopK codes, dense decode."""

    def __init__(self, cfg: DFCConfig):
        super().__init__()
        d, size, n_a, n_b = cfg.d_model, cfg.dict_size, cfg.n_a_exclusive, cfg.n_b_exclusive
        self.k = cfg.k
        mask = torch.ones(2, size)
        mask[1, :n_a] = 0
        mask[0, n_a:n_a + n_b] = 0
        self.register_buffer("mask", mask)
        self.W_enc = torch.nn.Parameter(torch.randn(2, d, size) / d**0.5)
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().permute(2, 0, 1).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(size))
        self.b_dec = torch.nn.Parameter(torch.zeros(2, d))
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        self.W_enc.mul_(self.mask[:, None, :])
        self.W_dec.mul_(self.mask.T[:, :, None])

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        acts = F.relu(torch.einsum("bmd,mdf->bf", x, self.W_enc * self.mask[:, None, :]) + self.b_enc)
        top = acts.topk(self.k, dim=1)
        f = torch.zeros_like(acts).scatter(1, top.indices, top.values)
        xhat = torch.einsum("bf,fmd->bmd", f, self.W_dec * self.mask.T[:, :, None]) + self.b_dec
        return (xhat - x).pow(2).mean()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step, device: torch.device, steps: int, repeats: int, warmup: int) -> float:
    """Median over `repeats` of the mean seconds per step, after `warmup` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def gemm_width(cfg: DFCConfig) -> int:
    """Σ over features of the encoder width (d_model exclusive, 2·d_model shared)."""
    return cfg.d_model * (cfg.n_a_exclusive + cfg.n_b_exclusive) + 2 * cfg.d_model * cfg.n_shared


def matmul_tflops(device: torch.device) -> float:
    """A bf16 (CUDA) or fp32 (CPU) square matmul's rate here: the ceiling the GEMM passes are held to."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_step(lambda: a @ b, device, 10, 3, 3) / 1e12


def dfc_trainer(cfg: DFCConfig, device: torch.device, formulation: str, bf16: bool, seed: int = 0) -> Trainer:
    train = TrainConfig(steps=10**9, device=str(device), formulation=formulation, bf16=bf16, warmup_steps=0,
                        log_every=50, seed=seed)
    return Trainer(Member(f"m{seed}", cfg, train))


def time_dfc(cfg: DFCConfig, device: torch.device, formulation: str, bf16: bool, batches: list[torch.Tensor],
             args: argparse.Namespace) -> float:
    trainer = dfc_trainer(cfg, device, formulation, bf16)
    trainer.model.fit_normalization(batches[0])
    turn = iter(range(10**9))

    def step() -> None:
        trainer.train_step(batches[next(turn) % len(batches)])
        if len(trainer.window) >= trainer.cfg.log_every:
            trainer.flush()

    seconds = seconds_per_step(step, device, args.steps, args.repeats, args.warmup)
    trainer.flush()
    if trainer.status == "diverged":
        raise SystemExit(f"dfc-ray {formulation} diverged while timed: {trainer.reason}")
    return seconds


def time_reference(cfg: DFCConfig, device: torch.device, bf16: bool, batches: list[torch.Tensor],
                   args: argparse.Namespace) -> float:
    model = DenseReference(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)
    turn = iter(range(10**9))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batches[next(turn) % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.apply_masks()

    return seconds_per_step(step, device, args.steps, args.repeats, args.warmup)


def shape_rows(args: argparse.Namespace, device: torch.device, bf16: bool) -> list[dict]:
    shapes = (TOY_SHAPES if args.toy else PAPER_SHAPES) if args.table else [(args.batch, args.dict_size, args.k)]
    d = 64 if args.toy else args.d_model
    ceiling = matmul_tflops(device)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"torch={torch.__version__} bf16={bf16} threads={torch.get_num_threads()} d_model={d} "
          f"shares A/B={args.a_exclusive}/{args.b_exclusive}; measured matmul: {ceiling:.1f} TFLOP/s", flush=True)
    rows = []
    for batch, size, k in shapes:
        cfg = DFCConfig(d_model=d, dict_size=size, k=k, a_exclusive=args.a_exclusive, b_exclusive=args.b_exclusive)
        batches = [torch.randn(batch, 2, d, device=device) for _ in range(4)]
        row = {"batch": batch, "dict_size": size, "k": k, "d_model": d, "matmul_tflops": ceiling}
        for formulation in args.formulations.split(","):
            try:  # a formulation that fails here (a kernel that does not compile, say) leaves the others' rows
                row[formulation] = time_dfc(cfg, device, formulation, bf16, batches, args)
            except Exception as err:
                print(f"  dfc-ray {formulation} FAILED at batch {batch}, dict {size}, k {k}: "
                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        row["reference"] = time_reference(cfg, device, bf16, batches, args)
        row["gemm_tflop"] = 10 * batch * gemm_width(cfg) / 1e12
        rows.append(row)
        print_row(row, args.formulations.split(","))
        del batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_row(row: dict, formulations: list[str]) -> None:
    shape = f"batch {row['batch']}, dict {row['dict_size']}, k {row['k']}"
    for name in formulations + ["reference"]:
        if row.get(name) is None:
            continue
        s = row[name]
        extra = ""
        if name != "reference":
            tflops = row["gemm_tflop"] / s
            extra = (f"  GEMM-equivalent {tflops:6.1f} TFLOP/s = {tflops / row['matmul_tflops']:5.1%} of the matmul; "
                     f"{row['reference'] / s:5.2f}x the reference")
        label = "seed-style dense loop" if name == "reference" else f"dfc-ray {name}"
        print(f"  {shape:32} {label:22} {row['batch'] / s:12,.0f} rows/s {s * 1e3:9.2f} ms{extra}", flush=True)


# ---- planted features: does the device path learn what the CPU path learns? ------------------------------------
def recovery_rows(args: argparse.Namespace, device: torch.device, bf16: bool) -> list[dict]:
    """Recovery of planted features (`PlantedFeatures.recovery`, tests/test_train.py's problem) after training
    on CPU in fp32 (the sparse path) and on `device` in each formulation (bf16 autocast on CUDA)."""
    planted = PlantedFeatures(PlantedConfig())
    cfg = DFCConfig(d_model=planted.cfg.d_model, dict_size=128, k=6, a_exclusive=0.1, b_exclusive=0.1,
                    l1_mode="partition", l1_shared=2e-2)
    runs = [("cpu", "sparse", False)] + [(str(device), f, bf16) for f in args.formulations.split(",")]
    print(f"planted-feature recovery after {args.recovery_steps} steps (best cosine per planted feature):", flush=True)
    rows = []
    for where, formulation, half in runs:
        train_cfg = TrainConfig(steps=args.recovery_steps, lr=3e-3, warmup_steps=20, norm_rows=512, log_every=20,
                                device=where, formulation=formulation, bf16=half)
        result = train(cfg, train_cfg, planted.batches(128))
        row = {"device": where, "formulation": formulation, "bf16": half, "status": result.status,
               "fvu_a": result.metrics.get("fvu_a"), "fvu_b": result.metrics.get("fvu_b")}
        row |= planted.recovery(result.model)
        rows.append(row)
        print(f"  {where:6} {formulation:7} {'bf16' if half else 'fp32'}  {result.status:8} "
              f"A-only {row['a_only']:.3f}  B-only {row['b_only']:.3f}  shared {row['shared']:.3f}  "
              f"FVU A {row['fvu_a']:.3f} B {row['fvu_b']:.3f}", flush=True)
    return rows


# ---- group training: one process vs N processes ----------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """One process of the comparison: `args.members` crosscoders on one stream, timed behind a file barrier;
    prints one JSON line {"rows": …, "start": …, "end": …}."""
    device = torch.device(args.device)
    d, size, k = group_shape(args)
    cfg = DFCConfig(d_model=d, dict_size=size, k=k, a_exclusive=args.a_exclusive, b_exclusive=args.b_exclusive)
    trainers = [dfc_trainer(cfg, device, "auto", args.dtype == "bf16", seed=i) for i in range(args.members)]
    stream = [torch.randn(args.group_batch, 2, d).half() for _ in range(4)]  # CPU fp16, as the store holds them
    for t in trainers:
        t.model.fit_normalization(stream[0].float().to(device))

    def step(i: int) -> None:
        x = stream[i % len(stream)].to(device, non_blocking=True).float()  # one copy, shared by the members
        for t in trainers:
            t.train_step(x)
            if len(t.window) >= t.cfg.log_every:
                t.flush()

    for i in range(args.warmup):
        step(i)
    sync(device)
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.worker_index}").touch()
    while len(list(barrier.glob("ready-*"))) < args.processes:
        time.sleep(0.01)
    start = time.time()
    for i in range(args.group_steps):
        step(i)
    for t in trainers:
        t.flush()
    sync(device)
    print(json.dumps({"rows": args.group_steps * args.group_batch * args.members, "start": start, "end": time.time()}))


def group_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    return (64, 2048, 16) if args.toy else (args.d_model, 16384, 90)


def run_processes(args: argparse.Namespace, processes: int, members: int) -> float:
    """Rows/s of `processes` concurrent processes training `members` crosscoders each."""
    with tempfile.TemporaryDirectory() as barrier:
        base = [sys.executable, __file__, "--worker", "--barrier", barrier, "--processes", str(processes),
                "--members", str(members), "--device", args.device, "--dtype", args.dtype,
                "--group-steps", str(args.group_steps), "--group-batch", str(args.group_batch),
                "--warmup", str(args.warmup), "--d-model", str(args.d_model)] + (["--toy"] if args.toy else [])
        procs = [subprocess.Popen(base + ["--worker-index", str(i)], stdout=subprocess.PIPE, text=True)
                 for i in range(processes)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a group-training worker failed (exit codes {[p.returncode for p in procs]})")
    records = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    return sum(r["rows"] for r in records) / (max(r["end"] for r in records) - min(r["start"] for r in records))


def group_rows(args: argparse.Namespace) -> list[dict]:
    d, size, k = group_shape(args)
    print(f"group training, d_model {d}, dict {size}, k {k}, batch {args.group_batch}, "
          f"{args.group_steps} timed steps (rows/s over all members)", flush=True)
    rows = []
    for n in (int(v) for v in args.group.split(",")):
        one = run_processes(args, 1, n)
        separate = run_processes(args, n, 1)
        rows.append({"members": n, "one_process": one, "separate_processes": separate})
        print(f"  N={n:<3} one process {one:12,.0f} rows/s   {n} processes {separate:12,.0f} rows/s   "
              f"ratio {one / separate:5.2f}x", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--dict-size", type=int, default=8192)
    p.add_argument("--k", type=int, default=45)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--a-exclusive", type=float, default=0.05)
    p.add_argument("--b-exclusive", type=float, default=0.05)
    p.add_argument("--table", action="store_true", help="the paper shapes (or --toy shapes) instead of one shape")
    p.add_argument("--toy", action="store_true", help="CPU-sized shapes (d_model 64) to try the script anywhere")
    p.add_argument("--formulations", default="sparse,dense,hybrid", help="dfc-ray formulations to time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if torch.cuda.is_available() else "fp32",
                   help="bf16 = autocast (CUDA only) with fp32 master weights")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--recovery-steps", type=int, default=0,
                   help="also train planted features this many steps on CPU and on the device (600 = the CI test's)")
    p.add_argument("--group", default="", help="comma-separated N for the group comparison, e.g. 1,4,8,16")
    p.add_argument("--group-steps", type=int, default=20)
    p.add_argument("--group-batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--members", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    results = {"shapes": shape_rows(args, device, args.dtype == "bf16" and device.type == "cuda")}
    shapes = {(r["batch"], r["dict_size"], r["k"]): r for r in results["shapes"]}
    if args.table:
        (b1, s1, k1), (_, _, k2) = (TOY_SHAPES if args.toy else PAPER_SHAPES)[1:3]
        fastest = lambda r: min(r[f] for f in args.formulations.split(",") if r.get(f))  # noqa: E731
        print(f"  k {k2} / k {k1} step time at batch {b1}, dict {s1}: "
              f"{fastest(shapes[(b1, s1, k2)]) / fastest(shapes[(b1, s1, k1)]):.2f}x", flush=True)
    if args.recovery_steps:
        results["recovery"] = recovery_rows(args, device, args.dtype == "bf16" and device.type == "cuda")
    if args.group:
        results["group"] = group_rows(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
