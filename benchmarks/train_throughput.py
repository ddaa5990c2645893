"""Training-step throughput of the DFC vs a straightforward dense reference, and group training.

    PYTHONPATH=. python benchmarks/train_throughput.py --d-model 256 --dict-size 8192 --k 45 --batch 1024

(1) rows/s of a full step (forward, loss, backward, AdamW step) for `DedicatedFeatureCrosscoder`
and for a dense reference written here (einsum encoder over (2, d_model, dict), dense decoder
(dict, 2, d_model), masks re-applied to the weights every step); (2) the encoder as partition
matmuls (what the DFC does) vs one masked matmul over [x_A, x_B]; (3) N crosscoders trained as a
group on one stream read from an on-disk safetensors folder vs N separate passes over it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures
from dfc_ray.train import Member, TrainConfig, folder_batches, scan_activation_folder, train_group


class DenseReference(torch.nn.Module):
    """The obvious DFC: dense masked weights, dense TopK codes, dense decode."""

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


def time_steps(step, steps: int, repeats: int, sync) -> float:
    """Best over `repeats` of the mean seconds per step (after one warm-up step)."""
    step()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--dict-size", type=int, default=8192)
    p.add_argument("--k", type=int, default=45)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--a-exclusive", type=float, default=0.05)
    p.add_argument("--b-exclusive", type=float, default=0.05)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast (CUDA) with fp32 master weights")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak (H100/H200: 989)")
    p.add_argument("--group", type=int, default=3, help="crosscoders in the group comparison (0 skips it)")
    p.add_argument("--group-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    cfg = DFCConfig(d_model=args.d_model, dict_size=args.dict_size, k=args.k,
                    a_exclusive=args.a_exclusive, b_exclusive=args.b_exclusive)
    x = torch.randn(args.batch, 2, args.d_model, device=device)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} d_model={args.d_model} "
          f"dict={args.dict_size} k={args.k} batch={args.batch} shares A/B={args.a_exclusive}/{args.b_exclusive}")

    results = {}
    for name, model in (("dfc", DedicatedFeatureCrosscoder(cfg)), ("dense reference", DenseReference(cfg))):
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with torch.autocast(**autocast):
                out = model.loss(x)
            loss = out["loss"] if isinstance(out, dict) else out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if isinstance(model, DenseReference):
                model.apply_masks()

        results[name] = time_steps(step, args.steps, args.repeats, sync)
        print(f"{name:>16}: {args.batch / results[name]:10.0f} rows/s  ({results[name] * 1e3:.1f} ms/step)")
    print(f"{'speedup':>16}: {results['dense reference'] / results['dfc']:.2f}x")

    if device.type == "cuda":
        # Required FLOPs: the dense encoder forward (selection needs every pre-activation), and
        # for the k active features per row: encoder weight grad, decoder forward, decoder
        # weight grad and code grad (each 2 FLOPs per multiply-add over the feature's width).
        d, n_s, size = args.d_model, cfg.n_shared, args.dict_size
        enc_width = d * (size - n_s) + 2 * d * n_s
        mean_width = enc_width / size
        flops = 2 * args.batch * enc_width + 4 * 2 * args.batch * args.k * mean_width
        tflops = flops / results["dfc"] / 1e12
        print(f"{'achieved':>16}: {tflops:.1f} TFLOP/s = {tflops / args.peak_tflops:.1%} of {args.peak_tflops:.0f} "
              f"(counting {flops / 1e9:.2f} GFLOP/step: dense encoder fwd + 4 sparse k-row passes)")

    # Encoder: partition matmuls (the DFC) vs one matmul over [x_A, x_B] with a masked weight.
    cc = DedicatedFeatureCrosscoder(cfg).to(device)
    masked = cc.W_enc.flatten(1).T.contiguous()  # (2*d_model, dict) with forbidden blocks zero
    xn = cc.normalize(x)
    with torch.no_grad(), torch.autocast(**autocast):
        partition_s = time_steps(lambda: cc._preacts(xn), args.steps, args.repeats, sync)
        one_s = time_steps(lambda: xn.flatten(1) @ masked + cc.b_enc, args.steps, args.repeats, sync)
    print(f"{'encoder fwd':>16}: partition matmuls {partition_s * 1e3:.2f} ms, one masked matmul {one_s * 1e3:.2f} ms")

    if args.group:
        with tempfile.TemporaryDirectory() as tmp:
            planted = PlantedFeatures(PlantedConfig(d_model=args.d_model, n_shared=64, n_a_only=16, n_b_only=16))
            planted.write_folder(tmp, rows=args.batch * (args.group_steps + 1), rows_per_file=args.batch)
            files = scan_activation_folder(tmp)[0]
            train = TrainConfig(steps=args.group_steps, device=str(device), norm_rows=args.batch,
                                bf16=args.dtype == "bf16")
            members = [Member(f"m{i}", cfg, TrainConfig(**{**vars(train), "seed": i})) for i in range(args.group)]
            start = time.perf_counter()
            train_group(members, folder_batches(files, args.batch))
            sync()
            group_s = time.perf_counter() - start
            start = time.perf_counter()
            for member in members:
                train_group([member], folder_batches(files, args.batch))
            sync()
            separate_s = time.perf_counter() - start
        print(f"{'group':>16}: {args.group} crosscoders x {args.group_steps} steps from a safetensors folder: "
              f"one pass {group_s:.2f} s, separate passes {separate_s:.2f} s, ratio {separate_s / group_s:.2f}x")


if __name__ == "__main__":
    main()
