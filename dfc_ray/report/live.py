"""The live view: what the user watches while a sweep's trials run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dfc_ray.metrics import Metric, number, shown_in
from dfc_ray.report.render import short_config

TUNE_STATUSES = {"terminated": "ok", "error": "failed"}  # Ray Tune's names, lower-cased
STATUS_WIDTH = 8  # "diverged"
CONFIG_MIN = 24
"""Columns a row keeps for its config before it shows another metric (a wider screen shows more of both)."""
REFRESH_PER_SECOND = 1
"""Redraws of the live view per second (see LiveView)."""
LIVE_LINES = 4
"""Lines the view spends around its rows: the progress line, the table header, the summary line, a spare."""


class LiveView:
    """A progress line that never wraps; the newest finished trials as far as the screen allows, then every
    running one (always shown), the finished ones left out summed up in one line. A row per trial: its id
    (never cut), status, optimizer step out of its total, its axis values (cut to fit) and as many of the
    registry's "live" metrics as fit: 80 columns show loss, FVU A/B and Δ A, 120 all of them.

    On a terminal it redraws in place once a second (rich Live, which asks `__rich_console__` at every
    refresh, so the clock ticks and updates show within the second): a render of 48 rows costs ~10 ms of the
    CPU the trials run on (organism48 in a tmux pane took 5 min 47 s redrawing 4 times a second plus at every
    report, 5 min 32 s at once a second; 5 min 10 s with --quiet). Elsewhere (CI logs, files) it prints one
    line per trial state change. The sweep calls `update` from its Tune callback.
    """

    def __init__(self, total: int, console: Console | None = None, axes: Sequence[str] | None = None,
                 title: str = "sweep") -> None:
        self.total, self.title, self.axes = total, title, axes
        self.console = console or Console()
        self.trials: dict[str, dict[str, Any]] = {}
        self.finished: list[str] = []
        """Finished trial ids, oldest first: the view shows the newest."""
        self.started = time.monotonic()
        # Ray's and libraries' own stderr lines go to the run's log (the driver redirects them), not into the view
        self._live = (Live(self, console=self.console, refresh_per_second=REFRESH_PER_SECOND, redirect_stderr=False)
                      if self.console.is_terminal else None)

    def __enter__(self) -> "LiveView":
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live:
            self._live.refresh()
            self._live.stop()

    def counts(self) -> dict[str, int]:
        """Trials finished ok, failed, and running now (pending ones are in none of these)."""
        statuses = [t["status"] for t in self.trials.values()]
        done, running = statuses.count("ok"), sum(s in ("running", "pending") for s in statuses)
        return {"done": done, "failed": len(statuses) - done - running, "running": statuses.count("running")}

    def update(self, trial_id: str, config: dict[str, Any], status: str, metrics: dict[str, Any] | None = None) -> None:
        """Record a trial's state; `metrics` merge into what it reported before (step, loss, FVU, Δ …).
        Tune's own statuses are accepted too (TERMINATED → ok, ERROR → failed)."""
        status = TUNE_STATUSES.get(status.lower(), status.lower())
        trial = self.trials.setdefault(trial_id, {"config": config, "status": None, "metrics": {}})
        changed = trial["status"] != status
        trial["config"], trial["status"] = config, status
        trial["metrics"].update(metrics or {})
        if changed and trial_id in self.finished:
            self.finished.remove(trial_id)
        if changed and status not in ("running", "pending"):
            self.finished.append(trial_id)
        if not self._live and changed:  # a live view shows the change at its next redraw
            self.console.print(Text(self._line(trial_id)), soft_wrap=True)

    def forget(self, trial_id: str) -> None:
        """Drop a trial (a lost one whose re-run takes its place)."""
        self.trials.pop(trial_id, None)
        if trial_id in self.finished:
            self.finished.remove(trial_id)

    def _axes(self, config: dict[str, Any]) -> list[str]:
        return list(self.axes) if self.axes is not None else \
            [k for k, v in config.items() if number(v) is not None or isinstance(v, str)]

    def _config(self, config: dict[str, Any]) -> str:
        return short_config(config, self._axes(config))

    def _values(self, config: dict[str, Any]) -> str:
        """The config's axis values alone (the column's heading names the axes): `768 16 dfc-5pct`."""
        return " ".join(f"{config[a]:g}" if number(config.get(a)) is not None else str(config.get(a))
                        for a in self._axes(config) if a in config)

    @staticmethod
    def _step(trial: dict[str, Any]) -> str:
        """The optimizer step out of the trial's total: the last training report's, or all of them once done."""
        m = trial["metrics"]
        total = m.get("steps") if m.get("phase") == "done" else trial["config"].get("steps")
        step = m.get("steps") if m.get("phase") == "done" else m.get("step")
        if step is None:
            return ""
        return f"{step}/{total}" if total else str(step)

    def _progress(self) -> str:
        c = self.counts()
        return (f"{c['done'] + c['failed']}/{self.total} finished: {c['done']} ok, {c['failed']} failed, "
                f"{c['running']} running")

    def _line(self, trial_id: str) -> str:
        trial = self.trials[trial_id]
        parts = [f"[{self._progress()}]", trial_id, self._config(trial["config"]), trial["status"]]
        parts += [f"{m.label}={m.text(trial['metrics'][m.name])}" for m in shown_in("live")
                  if m.name in trial["metrics"]]
        if trial["metrics"].get("error"):
            parts.append(f"error: {str(trial['metrics']['error']).splitlines()[0]}")
        return "  ".join(p for p in parts if p)

    def _progress_line(self, width: int) -> Table:
        """Title, bar, counts and the clock on one line of at most `width` columns: the bar shrinks first
        (down to nothing), then the title is cut."""
        elapsed = int(time.monotonic() - self.started)
        counts = f"{self._progress()}  {elapsed // 60}:{elapsed % 60:02d}"
        c = self.counts()
        bar = min(30, width - len(counts) - len(self.title) - 4)
        line = Table.grid(padding=(0, 1))
        line.add_column(no_wrap=True, overflow="ellipsis", max_width=max(1, width - len(counts) - 2 - max(bar, 0)))
        cells: list[Any] = [Text(self.title, style="bold")]
        if bar >= 8:
            line.add_column(width=bar)
            cells.append(ProgressBar(total=max(self.total, 1), completed=c["done"] + c["failed"], width=bar))
        line.add_column(no_wrap=True, overflow="ellipsis")
        cells.append(Text(counts))
        line.add_row(*cells)
        return line

    @staticmethod
    def _cell(metric: Metric, trial: dict[str, Any]) -> str:
        """A metric's cell: "—" when it is missing or not a finite number (an objective a trial without
        evaluation reports as NaN)."""
        value = trial["metrics"].get(metric.name)
        return metric.text(value) if number(value) is not None or isinstance(value, str) else "—"

    def _columns(self, width: int, rows: list[dict[str, Any]], fixed: int) -> list[tuple[Metric, int]]:
        """The live metrics a row has room for, with their widths, in the registry's order: as many as fit beside
        the `fixed` columns (id, status, step) while the config keeps `CONFIG_MIN` columns; so a wide terminal
        shows them all."""
        room = width - fixed - CONFIG_MIN
        chosen = []
        for metric in shown_in("live"):
            need = max([len(metric.label), *(len(self._cell(metric, r)) for r in rows)])
            if need + 2 > room:
                break
            chosen.append((metric, need))
            room -= need + 2
        return chosen

    def _shown(self, height: int) -> tuple[list[str], str]:
        """Which trials get a row (running and pending first, then the newest finished ones, oldest of those
        first) and the line that sums up the finished ones left out."""
        active = [i for i, t in self.trials.items() if t["status"] in ("running", "pending")]
        room = max(0, height - LIVE_LINES - len(active))
        recent = self.finished[len(self.finished) - room:] if room else []
        hidden = [i for i in self.finished if i not in recent]
        if not hidden:
            return recent + active, ""
        ok = sum(self.trials[i]["status"] == "ok" for i in hidden)
        failed = f", {len(hidden) - ok} failed" if len(hidden) > ok else ""
        return recent + active, f"… and {len(hidden)} earlier finished trials ({ok} ok{failed})"

    def render(self, width: int, height: int) -> Group:
        """The view for a screen of `width` × `height`: progress line first (rich Live crops at the bottom).
        Every column has a computed width, so a row never takes a second line and the id is never cut."""
        ids, summary = self._shown(height)
        rows = [self.trials[i] for i in ids]
        steps = [self._step(r) for r in rows]
        widths = [max([5, *map(len, ids)]), STATUS_WIDTH, max([4, *map(len, steps)])]
        columns = self._columns(width, rows, sum(w + 2 for w in widths))
        config = width - sum(w + 2 for w in widths) - sum(w + 2 for _, w in columns)  # 2 between columns
        table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, expand=False,
                      header_style="bold underline")
        for name, w in zip(("trial", "status", "step"), widths):
            table.add_column(name, no_wrap=True, width=w, justify="right" if name == "step" else "left")
        heading = " ".join(self.axes) if self.axes else "config"
        table.add_column(Text(heading, no_wrap=True, overflow="ellipsis"), no_wrap=True, overflow="ellipsis",
                         width=max(1, config))
        for metric, w in columns:
            table.add_column(metric.label, no_wrap=True, width=w, justify="right")
        for trial_id, trial, step in zip(ids, rows, steps):
            status = trial["status"]
            style = "bold" if status == "running" else "red" if status not in ("ok", "pending") else ""
            table.add_row(Text(trial_id, style=style), status, step, Text(self._values(trial["config"])),
                          *(self._cell(m, trial) for m, _ in columns))
        parts: list[Any] = [self._progress_line(width), table]
        if summary:
            parts.append(Text(summary, no_wrap=True, overflow="ellipsis", style="dim"))
        return Group(*parts)

    def _render(self) -> Group:
        return self.render(self.console.size.width, self.console.size.height)

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        yield self.render(options.max_width, options.height or console.size.height)
