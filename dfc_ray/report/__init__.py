"""Sweep reports: everything a user sees of a sweep's results.

- build.py: `load_results(run)` reads `<run>/results.jsonl` (a folder, file:// or s3:// prefix);
  `build_report(results, run_info, protocol_ablation)` computes the `report.json` content: headline
  mean ± std over successful trials next to the seed study's published numbers, per-axis breakdowns,
  best features, and `dfc-ray ablate`'s ours-vs-the-study's-protocol rows (`load_ablation(run)`);
  `run_report(run)` does all three for a run folder.
- render.py: the verdict per layer, the run header and the tables, printed by `print_report` (the first
  screen; `full=True` every table) and written as markdown by `to_markdown`.
- plots.py: plots/*.png (`plot_choices`: which are drawn, which left out and why). write.py:
  `write_report(run)` writes report.json, report.md and plots.
- live.py: `LiveView`, the table shown while trials run.

Metric labels, formats and placement come from dfc_ray/metrics.py. Everything after `build_report`
reads only the report dict, so a report can be re-rendered from report.json alone. What each
section and plot means: docs/report.md. The CLI (`dfc-ray report RUN`) is dfc_ray/commands/report.py.
"""

from dfc_ray.report.build import (ABLATION, RESULTS, SEED_STUDY, TrialResult, build_report, load_ablation,
                                  load_results, min_set_size, run_report, stored_run_info, summarize, varying_axes)
from dfc_ray.report.live import LiveView
from dfc_ray.report.plots import write_plots
from dfc_ray.report.render import Section, print_report, sections, to_markdown
from dfc_ray.report.write import write_report

__all__ = ["ABLATION", "RESULTS", "SEED_STUDY", "LiveView", "Section", "TrialResult", "build_report", "load_ablation",
           "load_results", "min_set_size", "print_report", "run_report", "sections", "stored_run_info", "summarize",
           "to_markdown", "varying_axes", "write_plots", "write_report"]
