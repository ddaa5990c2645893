"""Writing a report's files: report.json, report.md, plots/*.png, report.html and the named features'
feature_cards.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfc_ray.report.build import TrialResult, load_results, run_report
from dfc_ray.report.plots import write_plots
from dfc_ray.report.render import to_markdown


def write_report(run_dir: str | Path, results: Sequence[TrialResult] | None = None,
                 run_info: dict[str, Any] | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.json, report.md, plots/*.png, report.html and feature_cards.json (the cards of the features
    the report names) into `out_dir` (default: `run_dir`, local only)
    from `results` (default: `<run_dir>/results.jsonl`) and the run's ablation.json when it has one.
    Returns the report dict."""
    if out_dir is None:
        if str(run_dir).startswith("s3://"):
            raise ValueError(f"write_report: run {run_dir!r} is on S3; give a local out_dir for the report files")
        out_dir = str(run_dir).removeprefix("file://")
    # deferred: the cards read checkpoints and stores (torch); importing dfc_ray.report stays light
    from dfc_ray.report.features import report_cards, write_cards
    from dfc_ray.report.html import write_html

    results = load_results(run_dir) if results is None else results
    report = run_report(run_dir, results, run_info)
    out_dir = Path(out_dir)
    report["plots"] = write_plots(report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(to_markdown(report))
    cards, note = report_cards(run_dir, report, results)
    if cards:
        write_cards(out_dir, cards)
    write_html(report, out_dir, cards, note)
    return report
