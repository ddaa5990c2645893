"""Watching a sweep: the live view at 80 and 120 columns, Ray's noise kept out of it, TensorBoard runs per
trial against the optimizer step, the Optuna study optuna-dashboard reads, and resume (ids, progress line,
a finished run)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_sweep import read_results, write_spec

from dfc_ray.fs import RunFolder
from dfc_ray.report.live import LiveView

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dfc-3pct", "dfc-5pct-l1", "crosscoder-l1", "dfc-10pct")


def sweep_view(n: int) -> tuple[LiveView, list[str]]:
    """A view of `n` trials of 300 steps: all but two finished (one in seven failed), two running at step 120."""
    view = LiveView(n, console=Console(quiet=True), axes=["dict_size", "k", "variant"], title="organism48")
    running = []
    for i in range(n):
        trial_id = f"{i:08x}"
        config = {"dict_size": (768, 1536)[i % 2], "k": (8, 16, 32)[i % 3], "variant": VARIANTS[i % 4], "steps": 300}
        view.update(trial_id, config, "running", {"phase": "train", "step": 120, "loss": 0.3, "fvu_a": 0.41})
        if i < n - 2:
            view.update(trial_id, config, "failed" if i % 7 == 3 else "ok",
                        {"phase": "done", "steps": 300, "fvu_a": 0.123, "delta_a_pp": 0.0, "steer_reference_pp": 40.0})
        else:
            running.append(trial_id)
    return view, running


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("n", [2, 48])
def test_live_view_shows_running_trials_in_one_line_each(width, n):
    """At 30 lines the running trials always show, ids whole, one line per trial, nothing past the width; the
    progress line is one line; the step is the optimizer's out of the trial's total; 120 columns show more."""
    view, running = sweep_view(n)
    console = Console(width=width, height=30, record=True, file=open(os.devnull, "w"))
    console.print(view.render(width, 30))
    lines = console.export_text().splitlines()
    assert len(lines) <= 30 and all(len(line) <= width for line in lines)
    assert lines[0].startswith("organism48") and f"{n - 2}/{n} finished" in lines[0] and "2 running" in lines[0]
    for trial_id in running:
        row = next(line for line in lines if line.startswith(trial_id + " "))
        assert "running" in row and "120/300" in row
    finished_rows = [line for line in lines if re.match(r"[0-9a-f]{8} ", line) and "300/300" in line]
    if n == 48:
        assert 20 <= len(finished_rows) < 46 and "earlier finished trials" in lines[-1]
        hidden = 46 - len(finished_rows)
        assert f"… and {hidden} earlier finished trials" in lines[-1]
    else:
        assert not finished_rows
    header = lines[1]
    assert ("reference Δ" in header) == (width >= 120) and "FVU A" in header


def test_ray_noise_goes_to_the_run_log(tmp_path):
    """What is written to stderr while the view draws (Ray's C++ lines on file descriptor 2, Python's warnings and
    notices through sys.stderr) lands in driver.log."""
    import sys

    from dfc_ray.sweep.driver import DRIVER_LOG, stderr_to_log

    run = RunFolder(str(tmp_path / "run"))
    with stderr_to_log(run, True):
        os.write(2, b"core_worker.cc:1234: constructor arguments in the object store\n")
        print("Progress bars disabled", file=sys.stderr)
    log = (tmp_path / "run" / DRIVER_LOG).read_text()
    assert "core_worker.cc:1234" in log and "Progress bars disabled" in log
    with stderr_to_log(run, False):
        os.write(2, b"")
    assert (tmp_path / "run" / DRIVER_LOG).read_text() == log


def test_trial_ids_follow_the_grid_point():
    """The same grid point asks for the same id until it is taken; the next trial of that point gets another."""
    from dfc_ray.sweep.search import TrialIds

    ids = TrialIds(("dict_size", "variant"))
    first = ids.assign({"dict_size": 64, "variant": "dfc", "lr": 0.1})
    again = ids.assign({"dict_size": 64, "variant": "dfc", "lr": 0.2})
    other = ids.assign({"dict_size": 128, "variant": "dfc"})
    assert len({first, again, other}) == 3 and all(re.fullmatch("[0-9a-f]{8}", i) for i in (first, again, other))
    resumed = TrialIds(("dict_size", "variant"), {first, other})  # `again` was running when the driver stopped
    assert resumed.assign({"dict_size": 64, "variant": "dfc"}) == again


def test_concurrency_keeps_only_the_judges_own_cpus_out():
    """organism48 on 2 CPUs: its four judge replicas hold 0.25 CPU each, so two 0.5-CPU trials run at once (it
    reserved a whole CPU per replica and ran one); without judges four; an explicit cap wins."""
    from dataclasses import replace

    from dfc_ray.spaces import load_spec
    from dfc_ray.sweep.search import max_concurrent

    spec = load_spec("organism48")
    assert spec.resources.judge_cpus() == 1.0
    assert max_concurrent(spec, cpus=2) == 2 and max_concurrent(spec, judged=False, cpus=2) == 4
    assert max_concurrent(replace(spec, resources=replace(spec.resources, evaluator_gpu=1.0)), cpus=2) == 4
    assert max_concurrent(replace(spec, resources=replace(spec.resources, max_concurrent=3)), cpus=2) == 3


def test_a_trial_without_its_objective_is_told_to_optuna_as_failed_with_the_reason():
    """A NaN objective (e.g. Δ A under `--no-eval`): Optuna refuses NaN and would leave the trial RUNNING; it is
    told as FAIL, with `objective_missing` saying why. A measured one completes."""
    import optuna

    from dfc_ray.sweep.search import ObjectiveAtTheEnd

    space = {"k": optuna.distributions.CategoricalDistribution([8, 16])}
    search = ObjectiveAtTheEnd(space=space, metric="delta_a_pp", mode="max", seed=0)
    for trial_id, value in (("t1", float("nan")), ("t2", 5.0)):
        search.suggest(trial_id)
        search.on_trial_complete(trial_id, {"delta_a_pp": value, "reason": ""})
    unmeasured, measured = search._ot_study.trials
    assert unmeasured.state == optuna.trial.TrialState.FAIL and measured.state == optuna.trial.TrialState.COMPLETE
    assert unmeasured.user_attrs["objective_missing"] == "delta_a_pp not measured (no judges)"
    assert measured.value == 5.0 and "objective_missing" not in measured.user_attrs


def test_resume_of_a_finished_run_starts_nothing(tiny_pair, tmp_path, capsys):
    """Every trial recorded and reported: `--resume` says so, exits 0, and Ray never starts."""
    import ray

    from dfc_ray.cli import main
    from dfc_ray.spaces import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_pair))
    run = tmp_path / "done"
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False))
    from dfc_ray.sweep.results import spec_hash

    records = [{"trial_id": f"t{i}", "config": point, "metrics": {}, "status": "ok",
                "spec_hash": spec_hash(spec.raw | {"name": spec.name})}  # as a sweep records them
               for i, point in enumerate(spec.grid_points())]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "report.json").write_text(json.dumps({"n_trials": len(records)}))
    assert not ray.is_initialized()
    assert main(["sweep", "--resume", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: finished, all 4 trials done (4 ok): nothing to resume; report: {run}/report.md" in out
    assert not ray.is_initialized() and not (run / "tune").exists() and not (run / "run.json").exists()


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag → (step, value) of every scalar in a TensorBoard run's event files (TFRecord framing of Event
    protos, read with tensorboardX's own proto classes: TensorBoard itself is not installed here)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def dashboard_command() -> str:
    """The README's optuna-dashboard line."""
    return next(line for line in (REPO / "README.md").read_text().splitlines() if "optuna-dashboard --host" in line)


def test_tensorboard_optuna_and_resume_of_a_small_sweep(tiny_pair, ray_cluster, tmp_path, capsys):
    """Two trials: each is a TensorBoard run `tensorboard/<trial id>` with `train/loss` against the optimizer
    step; the Optuna study (loaded as optuna-dashboard loads the README's path) names its objective and carries
    each trial's dfc id and FVUs. A trial whose record is missing (it was running when the driver stopped) runs
    again under its id on `--resume`, into the same TensorBoard run."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from dfc_ray.spaces import load_spec
    from dfc_ray.sweep import run_sweep
    from dfc_ray.sweep.results import TENSORBOARD

    path = write_spec(tmp_path, tiny_pair, grid={"dict_size": [64, 128]})
    run = tmp_path / "runs" / "tiny"
    run_sweep(load_spec(path), str(run), evaluate=False, live=False)
    results = read_results(run)
    ids = sorted(r["trial_id"] for r in results)
    assert len(ids) == 2 and sorted(p.name for p in (run / TENSORBOARD).iterdir()) == ids
    for trial_id in ids:
        scalars = event_scalars(run / TENSORBOARD / trial_id)
        steps = [step for step, _ in scalars["train/loss"]]
        assert steps == sorted(steps) and steps[0] == 3 and steps[-1] == 30  # every 3rd of 30 optimizer steps
        assert "train/fvu_a" in scalars and not any(tag.startswith("ray/") for tag in scalars)
    assert not list((run / "tune").rglob("events.out.tfevents*"))  # Tune's own TBX logger is off

    command = dashboard_command()
    journal = re.search(r"127\.0\.0\.1 ([^`\s]+)", command).group(1)
    assert not journal.startswith("journal:") and journal.endswith("runs/<run>/optuna.journal")
    dashboard_path = str(run / "optuna.journal")  # <run> filled in; optuna-dashboard opens a plain path so:
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(dashboard_path)))
    assert study.metric_names == ["FVU [fvu]"]
    attrs = {t.user_attrs["dfc_trial_id"]: t.user_attrs for t in study.trials}
    assert sorted(attrs) == ids and all(0 < attrs[i]["fvu_a"] < 1.5 and "fvu_b" in attrs[i] for i in ids)
    assert "best" in study.user_attrs

    kept, dropped = results
    (run / "results.jsonl").write_text(json.dumps(kept) + "\n")  # as if `dropped` had been running
    (run / "report.json").unlink()
    capsys.readouterr()
    run_sweep(None, str(run), resume=True, evaluate=False, live=False)
    assert "1 of 2 trials done (1 ok), running 1" in capsys.readouterr().out
    after = {r["trial_id"]: r for r in read_results(run)}
    assert sorted(after) == ids and after[kept["trial_id"]] == kept
    assert after[dropped["trial_id"]]["config"]["dict_size"] == dropped["config"]["dict_size"]
    steps = [step for step, _ in event_scalars(run / TENSORBOARD / dropped["trial_id"])["train/loss"]]
    assert steps == sorted(set(steps))  # the re-run replaced its partial curve, no second copy
    assert sorted(p.name for p in (run / TENSORBOARD).iterdir()) == ids


def test_harvest_bar_follows_the_parts_progress_files(tmp_path):
    """Ray workers rewrite their part's progress after every group: the driver's bar counts those groups, so it
    moves within a part (it sat at 0% until a whole part ended)."""
    from dfc_ray.harvest import _part_progress, _watch_parts

    def write(part: int, rows: list[int]) -> None:
        (tmp_path / _part_progress(part)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / _part_progress(part)).write_text(json.dumps({"group_rows": rows, "group_nodes": [""] * len(rows)}))

    seen: list[int] = []
    write(0, [32, 32])
    with _watch_parts(str(tmp_path), [0, 1], seen.append, True):
        write(1, [32])
    assert seen and seen[-1] == 3


def test_objective_is_a_spec_section_with_one_or_several_metrics(tiny_pair, tmp_path):
    """`objective` is config.Objective: a metric or a list with one mode each; a mismatch is one line."""
    from dfc_ray.config import SpecError
    from dfc_ray.spaces import load_spec

    both = {"metric": ["delta_a_pp", "fvu"], "mode": ["max", "min"]}
    spec = load_spec(write_spec(tmp_path, tiny_pair, objective=both))
    assert spec.metrics == ["delta_a_pp", "fvu"] and spec.modes == ["max", "min"]
    assert load_spec(write_spec(tmp_path, tiny_pair, objective=None)).metrics == ["delta_a_pp"]
    with pytest.raises(SpecError, match=r"objective.mode = 'max'.*one per metric \(2\)"):
        load_spec(write_spec(tmp_path, tiny_pair, objective={"metric": ["delta_a_pp", "fvu"], "mode": "max"}))


def test_a_tie_is_not_called_best():
    """The study's `best` attribute names a trial only when its value is the best alone."""
    import optuna

    from dfc_ray.sweep.search import best_note

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial_id, value in (("aa", 0.0), ("bb", 0.0), ("cc", -2.0)):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"dfc_trial_id": trial_id}))
    assert best_note(study, ["Δ A (pp)"]) == "2 of 3 trials tie at Δ A (pp) = 0: no single best trial"
    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={"dfc_trial_id": "dd"}))
    assert best_note(study, ["Δ A (pp)"]) == "trial dd (Δ A (pp) = 1.5)"
