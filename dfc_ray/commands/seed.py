"""The seed study's commands (docs/replication.md): `dfc-ray import-seed` (its published crosscoders as
dfc-ray checkpoints) and `dfc-ray ablate` (a run re-judged under its protocol, switch by switch)."""

from __future__ import annotations

import argparse

from dfc_ray.fs import redact
from dfc_ray.preflight import resolve_device
from dfc_ray.seed import import_seed


def _import_seed_command(args: argparse.Namespace) -> int:
    record = import_seed(args.src, args.out, norm_from=args.norm_from, layer=args.layer,
                         allow_leaky=args.allow_leaky)
    part = record["partition"]
    print(f"imported {record['source']} -> {args.out}: dict_size {record['study_config']['dict_size']}, "
          f"k {record['study_config']['k']}, A-exclusive {part['n_a']}, B-exclusive {part['n_b']}, "
          f"shared {part['n_shared']} ({part['from']})")
    if record["norm_from"]:
        norm = record["norm_from"]
        print(f"normalization: harvest statistics of {norm['store']} layer {norm['layer']} ({norm['rows']} rows)")
    else:
        print("normalization: unknown (identity; judging it needs an explicit raw in/raw out choice)")
    for block, entry in record["dropped"].items():
        print(f"dropped {block}: {entry['features']} features, largest norm {entry['max_norm']:.4g} "
              f"(feature {entry['max_feature']})")
    return 0


def _ablate_command(args: argparse.Namespace) -> int:
    if args.checkpoints < 1:
        raise ValueError(f"--checkpoints {args.checkpoints}: expected a positive integer")
    resolve_device(args.device, "--device")
    # deferred: the ablation loads the actors' classes, which import Ray and torch
    from dfc_ray.sweep.ablate import ablate, print_ablation

    print_ablation(ablate(args.run, max_checkpoints=args.checkpoints, trial_ids=args.trials or (),
                          device=args.device, store=args.store))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-seed", help="Import one of the seed study's crosscoders (config.json + model.pt) as a checkpoint.")
    p.add_argument("src", help="the study's checkpoint folder: a path, s3://bucket/prefix or a hub id owner/repo[/sub]")
    p.add_argument("--out", required=True, help="the dfc-ray checkpoint folder to write (a path or s3://)")
    p.add_argument("--norm-from", default=None, metavar="STORE",
                   help="take normalization statistics from this dfc-ray harvest (needs --layer)")
    p.add_argument("--layer", type=int, default=None, help="the harvested layer the crosscoder was trained on")
    p.add_argument("--allow-leaky", action="store_true",
                   help="drop non-zero forbidden (cross-partition) weights instead of refusing; "
                        "import.json records them")
    p.set_defaults(func=_import_seed_command, interrupted=lambda a: f"{redact(a.out)} may hold a partial "
                   "checkpoint (its import.json comes first, so it never passes for a native one); run the same "
                   "command again")

    p = subparsers.add_parser(
        "ablate", help="Re-judge a finished run under our protocol, the seed study's, and the study's with each "
                       "switch turned back; writes RUN/ablation.json")
    p.add_argument("run", metavar="RUN", help="a finished sweep's run folder (a path or s3://)")
    p.add_argument("--checkpoints", type=int, default=3,
                   help="judge the run's best N DFC trials by its objective (default 3)")
    p.add_argument("--trials", nargs="+", metavar="ID", help="judge these trials instead")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (the judges run in this process)")
    p.add_argument("--store", default=None, metavar="ROOT",
                   help="the sweep's --store, when it was not the default RUN/../harvests: the only other place "
                        "the twins' harvest may be read from or written to")
    p.set_defaults(func=_ablate_command, interrupted=lambda a: f"{redact(a.run)}/ablation.json is written only "
                   "once every row is judged (the twins' harvest keeps its recorded shards); run the same command "
                   "again")
