"""`dfc-ray sweep SPEC`: run a sweep end to end (or `--plan` it), then print its report."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console

from dfc_ray.config import check_name
from dfc_ray.failures import EXIT_INTERRUPTED, sweep_exit_code
from dfc_ray.fs import redact
from dfc_ray.plan import load_rates, print_plan
from dfc_ray.report import print_report
from dfc_ray.report.render import short_config
from dfc_ray.spaces import load_spec
from dfc_ray.store import check_store_root


DEFAULT_SPEC = "organism48"


def _sweep_command(args: argparse.Namespace) -> int:
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir (the run folder to continue)")
    # --resume without SPEC continues the run's own spec.yaml; with one, it must be that spec
    spec = None if args.resume and args.spec is None and not args.plan else load_spec(args.spec or DEFAULT_SPEC)
    if args.plan:
        print_plan(spec, load_rates(args.costs) if args.costs else None)
        return 0
    if args.store:
        check_store_root(args.store)
    from dfc_ray.sweep import NothingToResume, SweepInterrupted, read_results, run_sweep  # deferred: Ray Tune, Optuna

    run_uri = args.run_dir or f"{args.storage.rstrip('/')}/{check_name(spec.name, 'spec name')}-" \
                              f"{time.strftime('%Y%m%d-%H%M%S')}"
    args.run_dir = run_uri  # for the Ctrl-C line outside the trials (`_interrupted`)
    start = time.time()
    try:
        run = run_sweep(spec, run_uri, store_root=args.store, resume=args.resume, address=args.address,
                        evaluate=not args.no_eval, live=not args.quiet, accept_spec_changes=args.accept_spec_changes)
    except SweepInterrupted as stop:  # Ctrl-C while trials ran: the driver wrote the report first
        return _unfinished_trials(stop.run, stop.unfinished)
    except NothingToResume as finished:  # every trial recorded and reported: Ray never started
        print(finished)
        return 0
    Console().print(f"sweep finished in {time.time() - start:.0f} s: {redact(run.uri)}")
    report = json.loads(run.read_text("report.json") or "{}")
    if report:
        print_report(report, Console())
    statuses = [record["status"] for record in read_results(run)]
    if code := sweep_exit_code(statuses):
        Console().print(f"[bold red]{len(statuses) - statuses.count('ok')} of {len(statuses)} trials failed[/] "
                        f"(exit code {code}; reasons in results.jsonl and the report's Failed trials)")
    return code


def _unfinished_trials(run, unfinished: dict) -> int:
    """The report as far as it got, then one line naming the trials Ctrl-C left unfinished."""
    report = json.loads(run.read_text("report.json") or "{}")
    if report:
        print_report(report, Console())
    running = [f"{t['trial_id']} ({short_config(t['config'], list(t['config']))})" for t in unfinished["running"]]
    parts = ([f"running: {', '.join(running)}"] if running else []) + \
        ([f"{unfinished['not_started']} not started"] if unfinished["not_started"] else [])
    print(f"dfc-ray sweep: interrupted; {len(running) + unfinished['not_started']} trials did not finish "
          f"({'; '.join(parts)}): `dfc-ray sweep --resume --run-dir {redact(run.uri)}` runs them", file=sys.stderr)
    return EXIT_INTERRUPTED


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C outside the trials leaves (the driver reports trials it interrupts itself)."""
    if args.run_dir is None or args.plan:
        return "no run folder was made; nothing was written"
    run = redact(args.run_dir)
    return f"finished trials stay in {run}; continue with: dfc-ray sweep --resume --run-dir {run}"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="Run a sweep spec end to end: harvest, Tune trials, report.")
    p.add_argument("spec", nargs="?", default=None,
                   help=f"shipped spec name or YAML path (default: {DEFAULT_SPEC}; with --resume: the run's own)")
    p.add_argument("--storage", default="runs", help="where run folders go: a path or s3://bucket/prefix")
    p.add_argument("--run-dir", default=None, help="this run's folder (default: <storage>/<spec>-<time>)")
    p.add_argument("--store", default=None, help="activation store root (default: <storage>/harvests)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --run-dir")
    p.add_argument("--accept-spec-changes", action="store_true",
                   help="with --resume: continue even though RUN/spec.yaml was edited since the run started (the "
                        "changed fields are recorded in run.json and the report); refused without it")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local one)")
    p.add_argument("--no-eval", action="store_true", help="train only: skip evaluation and steering")
    p.add_argument("--quiet", action="store_true", help="no live table")
    p.add_argument("--plan", action="store_true",
                   help="run nothing: print the sweep's work (rows, bytes, FLOPs per stage, actors, memory) and cost")
    p.add_argument("--costs", default=None, metavar="RUN_OR_JSON",
                   help="with --plan: measured rates from a finished run folder (its costs.json) or a costs JSON")
    p.set_defaults(func=_sweep_command, interrupted=_interrupted)
