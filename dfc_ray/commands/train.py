"""`dfc-ray train`: one crosscoder on a folder of paired activations, or on planted-feature example data."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfc_ray import store
from dfc_ray.config import SPARSITIES, DFCConfig, TrainConfig
from dfc_ray.preflight import resolve_device
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures
from dfc_ray.train import Member, folder_batches, scan_activation_folder, train_group

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
    p.set_defaults(func=_run_cli, interrupted=lambda a: f"nothing was saved ({a.out} gets the checkpoint when "
                   "training ends); run the command again to start over")


def _run_cli(args: argparse.Namespace) -> int:
    if args.example == (args.data_dir is not None):
        raise ValueError("give either DATA_DIR or --example (exactly one)")
    resolve_device(args.device, "--device")
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in (EXAMPLE_DEFAULTS if args.example else REAL_DEFAULTS).items()}
    if settings["batch_size"] < 1:
        raise ValueError(f"--batch-size={settings['batch_size']}: expected a positive integer")
    planted = None
    if args.example:
        planted = PlantedFeatures(PlantedConfig(seed=args.seed))
        d_model, batches = planted.cfg.d_model, planted.batches(settings["batch_size"], seed=args.seed + 1)
    elif args.layer is not None:  # what `dfc-ray harvest` writes; every shard checked before training
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
