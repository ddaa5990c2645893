"""`dfc-ray eval` and `dfc-ray steer`: judge one checkpoint in-process, or through the actors on Ray (`--ray`)."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from rich.console import Console
from rich.table import Table

from dfc_ray.cluster import connect
from dfc_ray.config import (PROTOCOL_NAMES, SCALES, SPLICE_MODES, STEER_RANKINGS, EvalConfig, JudgeProtocol,
                            ToolDialect, protocol_switches)
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.evaluate import EvalResult, Rate, ToolRates
from dfc_ray.pair import PairSpec, check_prompts_fit
from dfc_ray.preflight import resolve_device
from dfc_ray.tooluse.task import Task
from dfc_ray.tooluse.tasks import dev_test_tasks, load_tasks


def _pair_from(args: argparse.Namespace) -> PairSpec:
    return PairSpec(a=args.pair_a, b=args.pair_b, tokenizer=args.tokenizer, device=args.device, dialect=args.dialect)


STEERING_SWITCHES = ("steering_selection", "steer_b_via")
"""The switches only `dfc-ray steer` reads: `dfc-ray eval` refuses them rather than ignore them."""


def protocol_from(args: argparse.Namespace, steers: bool) -> JudgeProtocol:
    """--protocol and the --switch NAME=VALUE overrides as a JudgeProtocol (one-line errors); a command that
    does not steer (`steers` False) takes no steering switch."""
    allowed = [name for name in protocol_switches() if steers or name not in STEERING_SWITCHES]
    switches: dict[str, Any] = {}  # values are checked by JudgeProtocol
    for item in args.switch:
        name, _, value = item.partition("=")
        if name not in allowed:
            raise ValueError(f"--switch {item!r}: expected NAME=VALUE with NAME one of {', '.join(allowed)}"
                             + ("" if steers else f" ({' and '.join(STEERING_SWITCHES)} are for dfc-ray steer)"))
        if not value or name in switches:
            meta = protocol_switches()[name]
            raise ValueError(f"--switch {item!r}: expected one value for {name} ({meta['ours']!r} or "
                             f"{meta['seed']!r}), given once")
        switches[name] = value
    return JudgeProtocol(base=args.protocol, **switches)


def _rate(r: Rate, scale: float = 100.0) -> str:
    return f"{r.mean * scale:.1f} [{r.lo * scale:.1f}, {r.hi * scale:.1f}]"


def print_eval(result: EvalResult) -> None:

    protocol = JudgeProtocol(**result.config["protocol"]).label()
    table = Table(title=f"{result.checkpoint} @ layer {result.layer}: tool use, % [95% CI] (protocol: {protocol})")
    for col in ("condition", "correct (strict)", "lenient", "seed lenient", "format ok", "name ok"):
        table.add_column(col, justify="right" if col != "condition" else "left")
    for name in ("a_clean", "a_splice", "b_clean", "b_splice"):
        r: ToolRates = getattr(result, name)
        table.add_row(name, _rate(r.correct), _rate(r.lenient), _rate(r.seed_lenient), _rate(r.format_ok),
                      _rate(r.name_ok))
    console = Console()
    console.print(table)
    console.print(f"Δ A (splice − clean): [bold]{_rate(result.delta_a_pp, 1)}[/] pp   "
                  f"Δ B: [bold]{_rate(result.delta_b_pp, 1)}[/] pp   (n = {result.delta_a_pp.n}, "
                  f"metric {result.metric})")
    for name, loss in (("A", result.loss_a), ("B", result.loss_b)):
        if loss is not None:
            console.print(f"splice into {name}: CE {loss.ce_clean.mean:.3f} → {loss.ce_splice.mean:.3f} nats/token, "
                          f"KL {_rate(loss.kl, 1)}")


def _run_on_pair(args: argparse.Namespace, local_class, actor_class, method: str, cfg, tasks: tuple[str, list[Task]]):
    """`method(checkpoint, layer)` of a fresh replica: in this process, or in a Ray actor with --ray. The
    checkpoint is read here first: a bad one is refused before the pair is loaded; in this process the
    device and the prompts' lengths (`tasks`: where they come from and the tasks, against the models'
    positions) are checked too."""
    if not args.ray:
        resolve_device(args.device, "--device")
    DedicatedFeatureCrosscoder.load(args.checkpoint)
    if not args.ray:
        check_prompts_fit(_pair_from(args), tasks[1], cfg.max_new_tokens, tasks[0], cfg.protocol.prompt_format)
        return getattr(local_class(_pair_from(args), cfg), method)(args.checkpoint, args.layer)
    # deferred: Ray starts only with --ray
    import ray


    connect(args.address)
    actor = actor_class.options(num_gpus=args.num_gpus).remote(_pair_from(args), cfg)
    return ray.get(getattr(actor, method).remote(args.checkpoint, args.layer))


def _eval_command(args: argparse.Namespace) -> int:
    # deferred: the actors import Ray
    from actors.evaluator import Evaluator, EvaluatorActor

    cfg = EvalConfig(tasks=args.tasks, n_tasks=args.n_tasks, n_texts=args.n_texts, splice_mode=args.mode,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     protocol=protocol_from(args, steers=False))
    tasks = load_tasks(cfg.tasks)
    print_eval(_run_on_pair(args, Evaluator, EvaluatorActor, "evaluate", cfg,
                            (f"--tasks {cfg.tasks}", tasks[:cfg.n_tasks or None])))
    return 0


def _steer_command(args: argparse.Namespace) -> int:
    # deferred: the actors import Ray
    from actors.steering import SteerConfig, Steerer, SteeringActor, print_steer

    cfg = SteerConfig(n_dev=args.n_dev, n_test=args.n_test, top_n=args.top_n, alphas=tuple(args.alphas),
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, scale=args.scale,
                      targets=tuple(args.targets), primary=args.primary or args.targets[0],
                      rankings=tuple(args.rankings), min_set_pool=args.min_set_pool, min_set_max=args.min_set_max,
                      protocol=protocol_from(args, steers=True))
    dev, test = dev_test_tasks(cfg.dev_tasks, cfg.test_tasks, cfg.n_dev, cfg.n_test)
    print_steer(_run_on_pair(args, Steerer, SteeringActor, "steer", cfg,
                             (f"steering tasks {cfg.dev_tasks} and {cfg.test_tasks}", dev + test)))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="crosscoder checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--layer", type=int, required=True, help="the block whose output the crosscoder was trained on")
    p.add_argument("--pair-a", default="organism", help="model A: organism | path | s3://… | hub id")
    p.add_argument("--pair-b", default="organism", help="model B: organism | path | s3://… | hub id")
    p.add_argument("--tokenizer", default="", help="tokenizer reference (default: model B's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dialect", default="auto", choices=get_args(ToolDialect),
                   help="how A writes tool calls (docs/tooluse.md); auto: from the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ray", action="store_true", help="run in a Ray actor instead of in this process")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs for the actor (with --ray)")
    p.add_argument("--address", default=None, help="Ray address (with --ray; default: start a local cluster)")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="ours",
                   help="judging protocol: dfc-ray's or the seed study's (docs/replication.md)")
    p.add_argument("--switch", action="append", default=[], metavar="NAME=VALUE",
                   help="change one protocol switch, e.g. normalization=checkpoint (repeatable)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="tool correctness of A and B, clean vs crosscoder splice, with CIs")
    _common(p)
    p.add_argument("--tasks", default="organism:test", help="load_tasks source")
    p.add_argument("--n-tasks", type=int, default=0, help="first n tasks (0 = all)")
    p.add_argument("--n-texts", type=int, default=64, help="plain texts for the splice loss (0 = skip)")
    p.add_argument("--mode", choices=SPLICE_MODES, default="last_prompt_token", help="splice positions")
    p.set_defaults(func=_eval_command)

    p = subparsers.add_parser("steer", help="rank A-exclusive features, pick feature/α on dev, report on test")
    _common(p)
    p.add_argument("--n-dev", type=int, default=100, help="dev prompts for ranking and the α grid")
    p.add_argument("--n-test", type=int, default=200, help="test prompts for the reported effect")
    p.add_argument("--top-n", type=int, default=3, help="candidate features from each ranking")
    p.add_argument("--rankings", nargs="+", choices=STEER_RANKINGS, default=list(STEER_RANKINGS),
                   help="candidate rankings")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.4, 0.8, 1.2], help="α grid, in --scale units")
    p.add_argument("--scale", choices=SCALES, default="residual_norm", help="unit of α (docs/evaluation.md)")
    p.add_argument("--targets", nargs="+", choices=("a", "b"), default=["b", "a"], help="models to steer")
    p.add_argument("--primary", choices=("a", "b"), default="", help="target of the unprefixed metrics "
                   "(default: the first of --targets)")
    p.add_argument("--min-set-pool", type=int, default=6, help="features the minimal set draws from")
    p.add_argument("--min-set-max", type=int, default=3, help="largest minimal set tried")
    p.set_defaults(func=_steer_command)

