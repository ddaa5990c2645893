"""The live view: what the user watches while a sweep's trials run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dfc_ray.metrics import number, shown_in
from dfc_ray.report.render import short_config

TUNE_STATUSES = {"terminated": "ok", "error": "failed"}  # Ray Tune's names, lower-cased


class LiveView:
    """A row per trial and a done/failed/running bar; its metric columns are the registry's "live" ones.

    On a terminal it redraws in place (rich Live); elsewhere (CI logs, files) it prints one line
    per trial state change. The sweep calls `update` from its Tune callback.
    """

    def __init__(self, total: int, console: Console | None = None, axes: Sequence[str] | None = None,
                 title: str = "sweep") -> None:
        self.total, self.title, self.axes = total, title, axes
        self.console = console or Console()
        self.trials: dict[str, dict[str, Any]] = {}
        self._live = (Live(self._render(), console=self.console, refresh_per_second=4)
                      if self.console.is_terminal else None)

    def __enter__(self) -> "LiveView":
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live:
            self._live.update(self._render())
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
        if self._live:
            self._live.update(self._render())
        elif changed:
            self.console.print(Text(self._line(trial_id)), soft_wrap=True)

    def _config(self, config: dict[str, Any]) -> str:
        axes = self.axes if self.axes is not None else \
            [k for k, v in config.items() if number(v) is not None or isinstance(v, str)]
        return short_config(config, axes)

    @staticmethod
    def _step(trial: dict[str, Any]) -> str:
        step = trial["metrics"].get("step", trial["metrics"].get("training_iteration"))
        steps = trial["config"].get("steps")
        return "" if step is None else f"{step}/{steps}" if steps else str(step)

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

    def _render(self) -> Group:
        table = Table(title=self.title, title_justify="left")
        columns = shown_in("live")
        for column in ("trial", "config", "status", "step", *(m.label for m in columns)):
            table.add_column(column)
        for trial_id, trial in self.trials.items():
            table.add_row(trial_id, Text(self._config(trial["config"])), trial["status"], self._step(trial),
                          *(m.text(trial["metrics"].get(m.name)) for m in columns))
        c = self.counts()
        progress = Table.grid(padding=(0, 2))
        progress.add_row(ProgressBar(total=max(self.total, 1), completed=c["done"] + c["failed"], width=40),
                         Text(self._progress()))
        return Group(progress, table)  # bar first: Live crops what does not fit at the bottom
