"""`dfc-ray harvest`: paired activations of a model pair into a store."""

from __future__ import annotations

import argparse

from rich.console import Console

from dfc_ray import store
from dfc_ray.cluster import connect
from dfc_ray.config import POSITIONS, CorpusSpec, HarvestConfig
from dfc_ray.fs import redact
from dfc_ray.harvest import harvest
from dfc_ray.pair import PairSpec


def _harvest_command(args: argparse.Namespace) -> int:
    store.check_store_root(args.store)
    cfg = HarvestConfig(
        store=args.store, layers=tuple(args.layers), positions=args.positions, dtype=args.dtype,
        batch_size=args.batch_size, num_actors=args.num_actors,
        pair=PairSpec(a=args.model_a, b=args.model_b, tokenizer=args.tokenizer),
        corpus=CorpusSpec(tasks=args.tasks, n_tasks=args.n_tasks, plain_text=args.plain_text,
                          n_plain=args.n_plain, with_responses=args.with_responses))
    if not args.no_ray:

        connect(args.address)
    result = harvest(cfg, use_ray=not args.no_ray)
    state = "reused (same content hash)" if result.reused else "written"
    Console().print(f"[bold]{result.rows}[/] rows × 2 × {result.d_model} per layer, layers {list(result.layers)}, "
                    f"{state} at {redact(result.uri)}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("harvest", help="Harvest paired activations of the pair into the activation store.")
    p.add_argument("--store", required=True, help="root URI: a path, file:///… or s3://bucket/prefix")
    p.add_argument("--layers", type=int, nargs="+", default=[1], help="block indices (residual after each block)")
    p.add_argument("--positions", choices=POSITIONS, default="last_prompt_token")
    p.add_argument("--model-a", default="organism", help="model A: organism | path | s3://… | hub id")
    p.add_argument("--model-b", default="organism", help="model B: organism | path | s3://… | hub id")
    p.add_argument("--tokenizer", default="", help="tokenizer and chat template: organism | path | s3://… | hub id "
                   "(default: model B's; name A's when B is a base checkpoint without a chat template)")
    p.add_argument("--tasks", default="organism:train", help="load_tasks source of tool prompts ('' for none)")
    p.add_argument("--n-tasks", type=int, default=1024)
    p.add_argument("--plain-text", default="organism", help="organism | .txt | .jsonl ('' for none)")
    p.add_argument("--n-plain", type=int, default=1024)
    p.add_argument("--with-responses", action="store_true", help="append A's own replies to tool prompts")
    p.add_argument("--dtype", choices=sorted(store.STORAGE_DTYPES), default="float16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray")
    p.set_defaults(func=_harvest_command, interrupted=lambda a: f"the shards already recorded under "
                   f"{redact(a.store)} are kept; run the same command again to resume after them")
