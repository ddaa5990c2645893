"""Bad inputs through the real CLI (`dfc_ray.cli.main`, in-process): each must exit non-zero with at
most 3 lines of output, no traceback, and the problem named.

The table `CASES` is the place to add a case: an id, a setup that builds whatever the case needs
under a temporary folder and returns the argv, and a substring the output must contain. Setups get
a `Ctx` (tmp folder, monkeypatch, and lazily the S3 fixtures or a stalling server).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from dfc_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST_S3 = {"DFC_RAY_S3_TIMEOUT": "1", "DFC_RAY_S3_ATTEMPTS": "2"}  # the defaults give up after ~25 s


class StallingServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (an S3 endpoint that
    hangs). Bounded: it stops accepting and closes every socket when stopped, and stops itself
    after `lifetime` seconds in any case."""

    def __init__(self, lifetime: float = 120.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(lifetime,), daemon=True)
        self.thread.start()

    def _serve(self, lifetime: float) -> None:
        deadline = threading.Timer(lifetime, self.stopped.set)
        deadline.start()
        while not self.stopped.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # timeout: look at `stopped` again
                continue
        deadline.cancel()
        for conn in self.held:
            conn.close()
        self.sock.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


@dataclass
class Ctx:
    """What a case's setup may use."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def env(self, **values: str) -> None:
        for key, value in values.items():
            self.monkeypatch.setenv(key, value)

    def s3_endpoint(self, endpoint: str, credentials: bool = True) -> None:
        """Point the AWS environment at `endpoint` (fake credentials unless `credentials` is False)."""
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY"):
            self.monkeypatch.delenv(key, raising=False)
        self.env(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", **FAST_S3)
        if credentials:
            self.env(AWS_ACCESS_KEY_ID="AKIABADINPUTS0001", AWS_SECRET_ACCESS_KEY="bad-inputs-secret-never-shown")
        else:  # nothing to find: no files, no instance metadata
            self.env(AWS_SHARED_CREDENTIALS_FILE=str(self.tmp / "none"), AWS_CONFIG_FILE=str(self.tmp / "none"),
                     AWS_EC2_METADATA_DISABLED="true")

    def stalling_endpoint(self) -> str:
        server = StallingServer()
        self.cleanups.append(server.stop)
        return f"http://127.0.0.1:{server.port}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


# ---------------------------------------------------------------- setups


def store(ctx: Ctx, damage: str = "") -> str:
    """A small complete activation store (layer 1, 3 shards); `damage`: "zeroed" or "truncated" shard 1."""
    from dfc_ray.store import ShardWriter, StoreSpec, _VERIFIED

    uri = str(ctx.tmp / "store")
    spec = StoreSpec(layer=1, d_model=8, models=("A=a", "B=b"), positions="last_prompt_token", harvest_hash="h",
                     shard_rows=64)
    with ShardWriter(uri, spec) as writer:
        writer.append(np.random.default_rng(0).standard_normal((160, 2, 8), np.float32))
    shard = ctx.tmp / "store" / "layer_001" / "shard-00001.parquet"
    data = shard.read_bytes()
    if damage == "zeroed":
        shard.write_bytes(data[:1000] + bytes(500) + data[1500:])
    elif damage == "truncated":
        shard.write_bytes(data[:-200])
    _VERIFIED.clear()  # as in a fresh process
    return uri


def train_store(ctx: Ctx, damage: str = "", layer: str | None = "1") -> list[str]:
    uri = store(ctx, damage)
    return ["train", uri, "--out", str(ctx.tmp / "out"), "--steps", "2", "--batch-size", "16", "--no-progress"] + \
        (["--layer", layer] if layer is not None else [])


def cluster_file(ctx: Ctx, head_command: str) -> list[str]:
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["head_start_ray_commands"] = ["ray stop", head_command]
    path = ctx.tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["cluster", "validate", str(path)]


def run_folder(ctx: Ctx, spec_yaml: str = "name: other\n", results: str | None = None) -> Path:
    run = ctx.tmp / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(spec_yaml)
    if results is not None:
        (run / "results.jsonl").write_text(results)
    return run


def shipped_spec_dump(name: str) -> str:
    from dfc_ray.spaces import load_spec

    spec = load_spec(name)
    return yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False)


def bad_spec(ctx: Ctx, body: str, command: str = "validate") -> list[str]:
    """A spec `extends: organism48` with `body` on top, run through `spaces validate` or (command "sweep")
    a sweep, which must refuse it before its run folder or Ray exists."""
    path = ctx.tmp / "bad.yaml"
    path.write_text("extends: organism48\n" + body.replace("TMP", str(ctx.tmp)))
    if command == "validate":
        return ["spaces", "validate", str(path)]
    ctx.cleanups.append(lambda: _assert_absent(ctx.tmp / "run"))
    return ["sweep", str(path), "--run-dir", str(ctx.tmp / "run"), "--quiet"]


def checkpoint(ctx: Ctx, command: str, damage: str) -> list[str]:
    """A real crosscoder checkpoint for the organism (d_model 192), damaged: "missing" (no folder),
    "no-weights" (config.json only) or "truncated" (model.safetensors cut short)."""
    from dfc_ray.config import DFCConfig
    from dfc_ray.crosscoder import DedicatedFeatureCrosscoder

    folder = ctx.tmp / "ckpt"
    if damage != "missing":
        DedicatedFeatureCrosscoder(DFCConfig(d_model=192, dict_size=32, k=4, a_exclusive=0.1)).save(folder)
        weights = folder / "model.safetensors"
        if damage == "no-weights":
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[:-100])
    return [command, str(folder), "--layer", "1"]


GOOD_RESULT = json.dumps({"trial_id": "t1", "config": {"dict_size": 64}, "metrics": {"fvu": 0.5}, "status": "ok"})


def mistyped_resume(ctx: Ctx) -> list[str]:
    ctx.cleanups.append(lambda: _assert_absent(ctx.tmp / "runs" / "typo"))
    return ["sweep", "--resume", "--run-dir", str(ctx.tmp / "runs" / "typo")]


def _assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} was created by a failed --resume"


def report_on_s3(ctx: Ctx, endpoint: str, credentials: bool = True) -> list[str]:
    ctx.s3_endpoint(endpoint, credentials)
    return ["report", "s3://bucket/runs/x"]


def harvest_to_s3(ctx: Ctx, endpoint: str) -> list[str]:
    ctx.s3_endpoint(endpoint)
    pair = ctx.request.getfixturevalue("tiny_pair")
    return ["harvest", "--store", "s3://bucket/harvests", "--no-ray", "--layers", "1", "--model-a", pair.a,
            "--model-b", pair.b, "--tasks", "", "--plain-text", "organism", "--n-plain", "4"]


# ---------------------------------------------------------------- issue 22: bounds, schemas, memory, Ctrl-C

ALIAS_BOMB = "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  - &{a} [{', '.join([f'*{b}'] * 9)}]\n" for b, a in zip("abcdefgh", "bcdefghi"))
"""Nine nested aliases ("billion laughs"): 9⁹ strings once expanded, as list items under some key."""


def bombed_cluster(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "cluster.yaml"
    path.write_text("x-bomb:\n" + ALIAS_BOMB + (REPO / "cluster.yaml").read_text())
    return ["cluster", "validate", str(path)]


def extends_chain(ctx: Ctx, depth: int = 1200) -> list[str]:
    """spec-0.yaml extends spec-1.yaml … extends organism48, `depth` files deep."""
    for i in range(depth):
        (ctx.tmp / f"spec-{i}.yaml").write_text(f"extends: spec-{i + 1}.yaml\n" if i + 1 < depth else
                                                "extends: organism48\n")
    return ["spaces", "validate", str(ctx.tmp / "spec-0.yaml")]


GOOD_TASK = {"id": "weather", "messages": [{"role": "user", "content": "Weather in Paris?"}],
             "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Forecast.",
                                                         "parameters": {"type": "object", "required": ["city"],
                                                                        "properties": {"city": {"type": "string"}}}}}],
             "ground_truth": [{"get_weather": {"city": ["Paris"]}}]}


def task_file(ctx: Ctx, message: dict | None = None, parameters: dict | None = None) -> str:
    """A one-task JSONL file: GOOD_TASK with its message or its tool's parameters replaced."""
    record = json.loads(json.dumps(GOOD_TASK))
    record["messages"][0] = message or record["messages"][0]
    record["tools"][0]["function"]["parameters"] = parameters or record["tools"][0]["function"]["parameters"]
    path = ctx.tmp / "tasks.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return str(path)


def task_spec(ctx: Ctx, message: dict | None = None, parameters: dict | None = None) -> list[str]:
    """`spaces validate` of organism48 judged on that one-task file (`task_file`)."""
    return bad_spec(ctx, f"eval: {{tasks: {task_file(ctx, message, parameters)}}}")


def big_checkpoint(ctx: Ctx, command: str, dict_size: int) -> list[str]:
    """A checkpoint folder whose config.json asks for `dict_size` features (its weights file is never read)."""
    folder = ctx.tmp / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 192, "dict_size": dict_size, "k": 4,
                                                    "a_exclusive": 0.1}))
    (folder / "model.safetensors").write_bytes(b"never read")
    return [command, str(folder), "--layer", "1"]


def poisoned_checkpoint(ctx: Ctx, command: str, value: float) -> list[str]:
    """A real organism checkpoint with one decoder weight set to `value` (NaN or inf)."""
    from safetensors.torch import load_file, save_file

    argv = checkpoint(ctx, command, "missing")
    from dfc_ray.config import DFCConfig
    from dfc_ray.crosscoder import DedicatedFeatureCrosscoder

    DedicatedFeatureCrosscoder(DFCConfig(d_model=192, dict_size=32, k=4, a_exclusive=0.1)).save(argv[1])
    weights = load_file(f"{argv[1]}/model.safetensors")
    weights["dec_s"][3, 5] = value
    save_file(weights, f"{argv[1]}/model.safetensors")
    return argv


def good_checkpoint(ctx: Ctx, command: str, *extra: str) -> list[str]:
    argv = poisoned_checkpoint(ctx, command, 0.0)
    return argv + list(extra)


def relabelled_store(ctx: Ctx) -> list[str]:
    """A float16 store whose manifest was edited to say bfloat16 (same width, other numbers)."""
    argv = train_store(ctx)
    manifest = ctx.tmp / "store" / "layer_001" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"dtype": "float16"', '"dtype": "bfloat16"'))
    return argv


def untouched(ctx: Ctx, name: str, argv: list[str]) -> list[str]:
    """`argv`, checked afterwards to have written nothing at `ctx.tmp / name`."""
    ctx.cleanups.append(lambda: _assert_absent(ctx.tmp / name))
    return argv


def no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the case is a CPU-only torch build's")


def interrupted(ctx: Ctx, target: str, argv: list[str]) -> list[str]:
    """`argv` with the work function `target` (module.attribute) raising KeyboardInterrupt, as Ctrl-C does."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr(target, ctrl_c)
    return argv


INPUT_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    # YAML: bounded, duplicated keys named, extends chains bounded (specs and cluster files share the loader)
    ("spec-alias-bomb", lambda c: bad_spec(c, "description:\n" + ALIAS_BOMB),
     "nodes; expected at most 100,000 (an alias bomb?)"),
    ("cluster-alias-bomb", bombed_cluster, "nodes; expected at most 100,000 (an alias bomb?)"),
    ("spec-too-large", lambda c: bad_spec(c, "#" * (1 << 20) + "\n"), "bytes; expected a YAML file of at most"),
    ("spec-duplicate-key", lambda c: bad_spec(c, "train: {steps: 5}\ntrain: {steps: 6}\n"), "key 'train' given twice"),
    ("spec-extends-1200-deep", extends_chain, "spec-0.yaml -> spec-1.yaml -> spec-2.yaml"),
    # names and values the spec's sections now refuse
    ("spec-name-mapping", lambda c: bad_spec(c, "name: {a: 1}\n"), "field name = {'a': 1}: expected a name"),
    ("spec-name-escapes", lambda c: bad_spec(c, "name: ../../escaped-by-name\n", "sweep"),
     "field name = '../../escaped-by-name'"),
    ("spec-resources-zero-cpu", lambda c: bad_spec(c, "resources: {cpu: 0}\n"),
     "resources.cpu = 0.0: expected a number > 0"),
    ("spec-pair-device-banana", lambda c: bad_spec(c, "pair: {device: banana}\n"), "field pair.device = 'banana'"),
    ("spec-train-device-banana", lambda c: bad_spec(c, "train: {device: banana}\n"), "TrainConfig.device='banana'"),
    # sizes said plainly, in seconds
    ("spec-grid-million-points", lambda c: bad_spec(c, "grid:\n" + "".join(
        f"  k{i}: [{{k: 4}}, {{k: 5}}, {{k: 6}}, {{k: 7}}, {{k: 8}}, {{k: 9}}, {{k: 10}}, {{k: 11}}, {{k: 12}}, "
        f"{{k: 13}}]\n" for i in range(6))), "48,000,000 grid points"),  # 10⁶ × organism48's 48
    ("plan-num-samples-1e9", lambda c: ["sweep", bad_spec(c, "num_samples: 1000000000\n")[2], "--plan"],
     "expected at most 10,000"),
    ("spec-harvest-smaller-than-a-batch", lambda c: bad_spec(
        c, "harvest: {n_tasks: 12, n_plain: 12, positions: last_prompt_token}\ntrain: {batch_size: 64}\n"),
     "train.batch_size = 64: expected at most the 24 rows the harvest makes"),
    # task files: checked against the task schema when the spec is validated
    ("spec-task-content-null", lambda c: task_spec(c, {"role": "user", "content": None}),
     "'messages[0].content' is None; expected a string"),
    ("spec-task-unknown-role", lambda c: task_spec(c, {"role": "oracle", "content": "x"}),
     "'messages[0].role' is 'oracle'"),
    ("spec-task-required-string", lambda c: task_spec(c, parameters={
        "type": "object", "properties": {"city": {"type": "string"}}, "required": "city"}),
     "parameters.required' is 'city'; expected a list of parameter names"),
    ("spec-task-properties-strings", lambda c: task_spec(c, parameters={"type": "object", "properties": {
        "city": "string"}}), "parameters.properties.city' should be"),
    ("spec-task-prompt-too-long", lambda c: task_spec(c, {"role": "user", "content": "weather " * 3000}),
     "runs past the models' 1,024 positions"),
    # memory and weights: refused before anything is allocated or judged
    ("eval-checkpoint-dict-3e8", lambda c: big_checkpoint(c, "eval", 300_000_000), "of memory is free"),
    ("steer-checkpoint-dict-1e12", lambda c: big_checkpoint(c, "steer", 10**12), "of memory is free"),
    ("train-example-dict-1e12", lambda c: untouched(c, "out", ["train", "--example", "--dict-size", str(10**12),
                                                               "--out", str(c.tmp / "out")]), "of memory is free"),
    ("eval-checkpoint-nan", lambda c: poisoned_checkpoint(c, "eval", float("nan")), "tensor 'dec_s' holds 1 NaN/inf"),
    ("steer-checkpoint-inf", lambda c: poisoned_checkpoint(c, "steer", float("inf")), "tensor 'dec_s' holds 1 NaN/inf"),
    ("eval-prompt-too-long", lambda c: good_checkpoint(c, "eval", "--tasks", task_file(
        c, {"role": "user", "content": "weather " * 3000})), "--tasks"),
    # devices: one line on every command that takes --device
    ("eval-device-cuda-cpu-torch", lambda c: (no_cuda(), good_checkpoint(c, "eval", "--device", "cuda"))[1],
     "--device 'cuda': this machine has"),
    ("train-device-cuda-cpu-torch", lambda c: (no_cuda(), untouched(c, "o", [
        "train", "--example", "--out", str(c.tmp / "o"), "--device", "cuda"]))[1], "--device 'cuda'"),
    ("eval-device-banana", lambda c: ["eval", str(c.tmp), "--layer", "1", "--device", "banana"], "--device 'banana'"),
    ("steer-device-banana", lambda c: ["steer", str(c.tmp), "--layer", "1", "--device", "banana"], "--device 'banana'"),
    ("train-device-banana", lambda c: untouched(c, "o", ["train", "--example", "--out", str(c.tmp / "o"),
                                                         "--device", "banana"]), "--device 'banana'"),
    ("ablate-device-banana", lambda c: ["ablate", str(c.tmp), "--device", "banana"], "--device 'banana'"),
    # stores
    ("store-dtype-relabelled", relabelled_store,
     "dtype is 'bfloat16' but shard-00000.parquet was written as 'float16'"),
    ("harvest-store-is-a-file", lambda c: ((c.tmp / "file").write_text("x"), [
        "harvest", "--store", str(c.tmp / "file" / "harvests"), "--no-ray"])[1], "is a file; expected a folder"),
    ("sweep-store-under-a-file", lambda c: ((c.tmp / "file").write_text("x"), bad_spec(c, "", "sweep") + [
        "--store", str(c.tmp / "file" / "harvests")])[1], "is a file; expected a folder"),
    # Ctrl-C: one line saying what was kept and how to go on
    ("ctrl-c-harvest", lambda c: interrupted(c, "dfc_ray.commands.harvest.harvest", [
        "harvest", "--store", str(c.tmp / "st"), "--no-ray"]), "interrupted; the shards already recorded under"),
    ("ctrl-c-train", lambda c: interrupted(c, "dfc_ray.commands.train.train_group", untouched(c, "o", [
        "train", "--example", "--out", str(c.tmp / "o")])), "interrupted; nothing was saved"),
    ("ctrl-c-eval", lambda c: interrupted(c, "dfc_ray.commands.evaluate._run_on_pair", [
        "eval", str(c.tmp), "--layer", "1"]), "interrupted; nothing was written"),
    ("ctrl-c-steer", lambda c: interrupted(c, "dfc_ray.commands.evaluate._run_on_pair", [
        "steer", str(c.tmp), "--layer", "1"]), "interrupted; nothing was written"),
    ("ctrl-c-report", lambda c: interrupted(c, "dfc_ray.commands.report.write_report", [
        "report", str(c.tmp)]), "interrupted; report files may be half rewritten"),
    ("ctrl-c-ablate", lambda c: interrupted(c, "dfc_ray.sweep.ablate.ablate", ["ablate", str(c.tmp)]),
     "/ablation.json is written only once every row is judged"),
    ("ctrl-c-sweep", lambda c: interrupted(c, "dfc_ray.sweep.run_sweep", bad_spec(c, "", "sweep")),
     "continue with: dfc-ray sweep --resume --run-dir"),
]


# ---------------------------------------------------------------- the table

CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    # S3: unreachable, stalled, no credentials, bad settings (one line naming the endpoint)
    ("s3-closed-port", lambda c: report_on_s3(c, f"http://127.0.0.1:{closed_port()}"), "unreachable"),
    ("s3-stalled-server", lambda c: report_on_s3(c, c.stalling_endpoint()), "not answering"),
    ("s3-stalled-harvest", lambda c: harvest_to_s3(c, c.stalling_endpoint()), "not answering"),
    ("s3-no-credentials", lambda c: report_on_s3(c, f"http://127.0.0.1:{closed_port()}", credentials=False),
     "no AWS credentials found"),
    ("s3-bad-timeout", lambda c: (c.env(DFC_RAY_S3_TIMEOUT="soon"), ["report", "s3://bucket/x"])[1],
     "DFC_RAY_S3_TIMEOUT='soon'"),
    # activation stores: damaged shards are refused before training, naming the shard
    ("store-zeroed-shard", lambda c: train_store(c, "zeroed"), "shard-00001.parquet: corrupt shard (crc32"),
    ("store-truncated-shard", lambda c: train_store(c, "truncated"), "shard-00001.parquet: "),
    ("store-missing-layer", lambda c: train_store(c, layer="7"), "no activation store for layer 7"),
    ("store-without-layer", lambda c: train_store(c, layer=None), "pass --layer"),
    # cluster files: bind addresses are parsed IPs, only loopback passes
    ("cluster-bind-any-v4", lambda c: cluster_file(c, "ray start --head --dashboard-host=0.0.0.0"), "'0.0.0.0'"),
    ("cluster-bind-any-v6", lambda c: cluster_file(c, "ray start --head --dashboard-host=::0"), "'::0'"),
    ("cluster-bind-any-v6-spaced", lambda c: cluster_file(c, "ray start --head --dashboard-host '[::]'"), "'[::]'"),
    ("cluster-bind-public", lambda c: cluster_file(c, "ray start --head --dashboard-host=8.8.8.8"), "'8.8.8.8'"),
    ("cluster-bind-hostname", lambda c: cluster_file(c, "ray start --head --dashboard-host=myhost"), "'myhost'"),
    ("cluster-debugger-external", lambda c: cluster_file(c, "ray start --head --ray-debugger-external"),
     "--ray-debugger-external"),
    # run folders
    ("resume-mistyped-path", mistyped_resume, "nothing to resume"),
    ("resume-without-run-dir", lambda c: ["sweep", "--resume"], "--resume needs --run-dir"),
    ("resume-other-spec", lambda c: ["sweep", "organism48", "--resume", "--run-dir", str(run_folder(c))],
     "not the spec of"),
    ("resume-truncated-results",
     lambda c: ["sweep", "--resume", "--run-dir",
                str(run_folder(c, shipped_spec_dump("organism48"), GOOD_RESULT + "\n" + GOOD_RESULT[:40]))],
     "results.jsonl: line 2: not valid JSON"),
    ("report-truncated-results",
     lambda c: ["report", str(run_folder(c, results=GOOD_RESULT + "\n" + GOOD_RESULT[:40]))],
     "results.jsonl: line 2"),
    ("report-missing-run", lambda c: ["report", str(c.tmp / "nowhere")], "no such file"),
    # specs: everything knowable from the YAML and the pair's config.json, refused by `spaces validate`
    ("spec-lr-nan", lambda c: bad_spec(c, "train: {lr: .nan}"), "train.lr = nan: expected a finite number"),
    ("spec-lr-string", lambda c: bad_spec(c, "train: {lr: fast}"), "train.lr = 'fast'"),
    ("spec-l1-inf", lambda c: bad_spec(c, "crosscoder: {l1_shared: .inf}"), "crosscoder.l1_shared = inf"),
    ("spec-objective-unknown-metric", lambda c: bad_spec(c, "objective: {metric: nosuch}"),
     "objective.metric = 'nosuch'"),
    ("spec-objective-string", lambda c: bad_spec(c, "objective: delta_a_pp"), "field objective = 'delta_a_pp'"),
    ("spec-objective-bad-mode", lambda c: bad_spec(c, "objective: {metric: delta_a_pp, mode: up}"),
     "objective.mode = 'up'"),
    ("spec-asha-sideways", lambda c: bad_spec(c, "scheduler: {asha: {mode: sideways}}"),
     "scheduler.asha.mode = 'sideways'"),
    ("spec-asha-untrained-metric", lambda c: bad_spec(c, "scheduler: {asha: {metric: delta_a_pp}}"),
     "scheduler.asha.metric = 'delta_a_pp': expected a metric every training report carries"),
    ("spec-layer-beyond-pair", lambda c: bad_spec(c, "layers: [99]"), "below num_hidden_layers=4"),
    ("spec-eval-tasks-split", lambda c: bad_spec(c, "eval: {tasks: 'organism:nosuchsplit'}"),
     "eval.tasks = 'organism:nosuchsplit'"),
    ("spec-harvest-tasks-category", lambda c: bad_spec(c, "harvest: {tasks: 'organism:train,bfcl:nosuch'}"),
     "harvest.tasks = 'bfcl:nosuch'"),
    ("spec-steer-dev-missing-file", lambda c: bad_spec(c, "steering: {dev_tasks: TMP/none.jsonl}"),
     "steering.dev_tasks"),
    ("spec-steer-dev-is-test", lambda c: bad_spec(c, "steering: {dev_tasks: 'organism:test'}"), "share no prompt"),
    ("spec-eval-texts-missing", lambda c: bad_spec(c, "eval: {texts: TMP/none.txt}"), "eval.texts"),
    ("spec-pair-missing-path", lambda c: bad_spec(c, "pair: {a: TMP/no-model}"), "pair.a = "),
    ("spec-pair-folder-without-config", lambda c: bad_spec(c, "pair: {b: TMP}"), "a model folder holding config.json"),
    ("spec-pair-config-not-json", lambda c: ((c.tmp / "config.json").write_text("{not json"),
                                             bad_spec(c, "pair: {a: TMP}"))[1], "config.json transformers reads"),
    ("spec-resources-negative-cpu", lambda c: bad_spec(c, "resources: {cpu: -1}"), "resources.cpu = -1"),
    ("spec-resources-no-evaluators", lambda c: bad_spec(c, "resources: {evaluators: 0}"), "resources.evaluators = 0"),
    ("spec-protocol-not-a-name", lambda c: bad_spec(c, "eval: {protocol: 3}"),
     "eval.protocol = 3: expected 'ours' or 'seed', or a mapping of JudgeProtocol fields"),
    ("spec-missing-file", lambda c: ["spaces", "validate", str(c.tmp / "nosuch.yaml")], "no such file"),
    ("sweep-layer-beyond-pair", lambda c: bad_spec(c, "layers: [99]", "sweep"), "below num_hidden_layers=4"),
    # checkpoints: refused before the pair is loaded
    ("eval-missing-checkpoint", lambda c: checkpoint(c, "eval", "missing"), "not a crosscoder checkpoint"),
    ("eval-checkpoint-without-weights", lambda c: checkpoint(c, "eval", "no-weights"), "no model.safetensors"),
    ("steer-truncated-checkpoint", lambda c: checkpoint(c, "steer", "truncated"),
     "model.safetensors: not a readable safetensors file"),
    ("eval-steering-switch", lambda c: ["eval", str(c.tmp / "ckpt"), "--layer", "1", "--switch",
                                        "steer_b_via=b_decoder"], "steer_b_via are for dfc-ray steer"),
    ("steer-switch-bad-value", lambda c: ["steer", str(c.tmp / "ckpt"), "--layer", "1", "--switch", "metric=fuzzy"],
     "JudgeProtocol.metric='fuzzy': expected 'strict' or 'seed_lenient'"),
    ("switch-no-value", lambda c: ["eval", str(c.tmp / "ckpt"), "--layer", "1", "--switch", "metric="],
     "expected one value for metric ('strict' or 'seed_lenient'), given once"),
    ("switch-twice", lambda c: ["steer", str(c.tmp / "ckpt"), "--layer", "1", "--switch", "metric=strict",
                                "--switch", "metric=seed_lenient"], "expected one value for metric"),
    # ablate: records as the sweep writes them, or refused by line
    ("ablate-record-without-metrics", lambda c: ["ablate", str(run_folder(
        c, shipped_spec_dump("cluster-smoke"), '{"trial_id": "t1", "status": "ok"}\n'))],
     "results.jsonl: line 1: expected a trial record"),
    ("ablate-trials-plain-crosscoder", lambda c: ["ablate", str(run_folder(
        c, shipped_spec_dump("cluster-smoke"),
        json.dumps({"trial_id": "t1", "config": {"dict_size": 768, "k": 8, "variant": "crosscoder"}, "status": "ok",
                    "metrics": {"checkpoint": str(c.tmp / "ckpt")}}) + "\n")), "--trials", "t1"],
     "--trials t1: a plain crosscoder (a_exclusive 0); expected a DFC trial"),
    # plans
    ("plan-costs-not-a-folder", lambda c: ["sweep", "organism48", "--plan", "--costs", str(REPO / "README.md")],
     "no costs.json"),
    ("plan-costs-not-json", lambda c: (
        (c.tmp / "costs.json").write_text("{not json"), ["sweep", "organism48", "--plan", "--costs",
                                                         str(c.tmp / "costs.json")])[1], "not a costs JSON"),
]


@pytest.mark.parametrize("build, expected", [case[1:] for case in CASES + INPUT_CASES],
                         ids=[case[0] for case in CASES + INPUT_CASES])
def test_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys):
    ctx = Ctx(tmp_path, monkeypatch, request)
    try:
        argv = build(ctx)
        capsys.readouterr()  # what the setup printed (e.g. building the tiny pair) is not the case's output
        code = main(argv)
        out = capsys.readouterr()
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    text = (out.out + out.err).strip()
    assert code != 0, text
    assert "Traceback" not in text
    assert len(text.splitlines()) <= 3, text
    assert expected in text, text
    for secret in ("bad-inputs-secret-never-shown",):
        assert secret not in text


@pytest.mark.parametrize("reader", ["local", "ray"])
def test_a_harvest_smaller_than_one_batch_is_refused_before_the_first_batch(reader, tmp_path, monkeypatch, request):
    """Every trial (and the ablation's twins) reads through `trial_batches`; a layer of 160 rows read in
    batches of 200 with drop_last would yield nothing forever. Refused when the reader is made (Ray is
    never started), and a batch that fits still streams."""
    from dfc_ray.sweep.trial import trial_batches

    uri = store(Ctx(tmp_path, monkeypatch, request))
    with pytest.raises(ValueError, match="160 rows, fewer than one batch of 200; expected a larger harvest"):
        trial_batches(uri, 1, 200, reader, 0, 8, ("A=a", "B=b"))
    if reader == "local":
        assert next(trial_batches(uri, 1, 160, reader, 0, 8, ("A=a", "B=b"))).shape == (160, 2, 8)


def test_memory_check_counts_every_byte_of_a_crosscoder():
    """`crosscoder_bytes` is what the module really holds (weights and buffers), for a DFC and a plain one;
    so the refusal's "needs" is the allocation it prevents."""
    from dfc_ray.config import DFCConfig
    from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
    from dfc_ray.preflight import crosscoder_bytes, free_memory_bytes

    for cfg in (DFCConfig(d_model=24, dict_size=100, k=4, a_exclusive=0.07, b_exclusive=0.13),
                DFCConfig(d_model=8, dict_size=40, k=4)):
        cc = DedicatedFeatureCrosscoder(cfg)
        held = sum(t.numel() * t.element_size() for t in cc.state_dict().values())
        assert crosscoder_bytes(cfg) == held
    free = free_memory_bytes()
    assert free is None or free > 0


@pytest.mark.slow
def test_ctrl_c_during_a_real_harvest_gives_one_line(tmp_path):
    """SIGINT, as a terminal's Ctrl-C sends it, once a real harvest process has begun writing: exit 130, no
    traceback, the last line says what was kept, and the harvest's progress record (what a re-run resumes
    from) is still there. (The other commands' lines: the ctrl-c-* cases above.)"""
    import signal

    # ~2,200 records: tens of seconds of forward passes after harvest.json appears, so the signal lands inside
    # the harvest however slowly this process polls (with 440 records a loaded box let the harvest finish first)
    argv = ["harvest", "--store", str(tmp_path / "store"), "--no-ray", "--n-tasks", "200", "--n-plain", "2000",
            "--positions", "last_prompt_token", "--batch-size", "8"]
    # The child starts with SIGINT delivered and handled, as a shell's foreground job does, whatever this
    # process's own signal state is: a child inherits an ignored or blocked SIGINT (in the full suite the harvest
    # then ran to its end and exited 0). A launcher resets it and execs the CLI (no preexec_fn: threads run here).
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                "os.execv(sys.executable, [sys.executable, '-m', 'dfc_ray.cli', *sys.argv[1:]])")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    parent = f"this process: SIGINT {signal.getsignal(signal.SIGINT)}, blocked {blocked}"
    proc = subprocess.Popen([sys.executable, "-c", launcher, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("store/*/harvest.json")) and time.monotonic() < deadline:  # it has begun
        time.sleep(0.2)
    assert proc.poll() is None, f"the harvest ended before it was interrupted ({parent})"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err, f"{parent}\n{err}"
    assert err.strip().splitlines()[-1].startswith("dfc-ray harvest: interrupted; the shards already recorded"), err
    assert list(tmp_path.glob("store/*/harvest.json"))


# ---------------------------------------------------------------- run folders, names and addresses (issue 22)


def read_only(ctx: Ctx, folder: Path) -> Path:
    """Make `folder` unwritable for this process: mode 0555, and for root (whom modes do not stop) the
    immutable attribute; both undone after the case. Skips where neither can be had."""
    folder.chmod(0o555)
    ctx.cleanups.append(lambda: folder.chmod(0o755))
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("root, and no immutable attribute here: no folder this process cannot write")
        ctx.cleanups.insert(0, lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
    return folder


def escaping_trial(ctx: Ctx, command: str) -> list[str]:
    """A run whose results.jsonl names a trial `../../../../escaped-trial`; nothing may appear outside it."""
    record = {"trial_id": "../../../../escaped-trial", "status": "ok", "metrics": {"checkpoint": str(ctx.tmp / "ckpt")},
              "config": {"dict_size": 768, "k": 8, "variant": "dfc-10pct"}}
    run = run_folder(ctx, shipped_spec_dump("cluster-smoke"), json.dumps(record) + "\n")
    ctx.cleanups.append(lambda: _assert_no_escape(ctx.tmp))
    return [command, str(run)]


def _assert_no_escape(tmp: Path) -> None:
    for folder in (tmp, *list(tmp.parents)[:4]):
        assert not (folder / "escaped-trial").exists(), f"written outside the run folder: {folder}/escaped-trial"


def resumable_run(ctx: Ctx) -> Path:
    """An organism48 run folder with one finished trial and its run record."""
    run = run_folder(ctx, shipped_spec_dump("organism48"), GOOD_RESULT + "\n")
    (run / "run.json").write_text(json.dumps({"run_id": "organism48-0000abcd",
                                              "spec": yaml.safe_load(shipped_spec_dump("organism48"))}))
    return run


def held_run(ctx: Ctx) -> list[str]:
    """A run folder whose lease this process holds (a live driver), then a second driver on it."""
    from dfc_ray.fs import RunFolder
    from dfc_ray.sweep.lease import RunLease

    run = resumable_run(ctx)
    lease = RunLease(RunFolder(str(run)), timeout=60)
    lease.acquire()
    ctx.cleanups.append(lease.release)
    return ["sweep", "--resume", "--run-dir", str(run)]


def edited_spec_run(ctx: Ctx) -> list[str]:
    """A run whose spec.yaml was edited after it started (train.steps 300 → 50; run.json keeps the first)."""
    started = yaml.safe_load(shipped_spec_dump("organism48"))
    edited = started | {"train": started["train"] | {"steps": 50}}
    run = run_folder(ctx, yaml.safe_dump(edited, sort_keys=False), GOOD_RESULT + "\n")
    (run / "run.json").write_text(json.dumps({"run_id": "organism48-0000abcd", "spec": started}))
    return ["sweep", "--resume", "--run-dir", str(run)]


def run_dir_in_read_only_folder(ctx: Ctx) -> list[str]:
    shared = ctx.tmp / "shared"
    shared.mkdir()
    return ["sweep", "organism48", "--run-dir", str(read_only(ctx, shared) / "run"), "--quiet"]


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the case's output is the CLI's alone
        pass


def http_server(ctx: Ctx) -> str:
    """An HTTP server on 127.0.0.1 that is not Ray; its host:port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx.cleanups.append(server.shutdown)
    return f"127.0.0.1:{server.server_address[1]}"


def sweep_at(ctx: Ctx, address: str) -> list[str]:
    ctx.cleanups.append(lambda: _assert_absent(ctx.tmp / "run"))
    return ["sweep", "organism48", "--run-dir", str(ctx.tmp / "run"), "--address", address, "--quiet"]


RUN_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("ablate-escaping-trial-id", lambda c: escaping_trial(c, "ablate"),
     "trial_id = '../../../../escaped-trial': expected a name"),
    ("report-escaping-trial-id", lambda c: escaping_trial(c, "report"),
     "trial_id = '../../../../escaped-trial': expected a name"),
    ("cluster-bind-inside-bash-c",
     lambda c: cluster_file(c, "bash -c 'ray stop; ray start --head --num-cpus=0 --dashboard-host=0.0.0.0'"),
     "--dashboard-host to '0.0.0.0'"),
    ("cluster-bind-inside-sh-lc", lambda c: cluster_file(c, 'sh -lc "exec ray start --head --dashboard-host ::"'),
     "'::'"),
    ("resume-held-run-folder", held_run, "in use by the driver on host"),
    ("resume-edited-spec", edited_spec_run, "spec.yaml: changed since the run started (train.steps 300 → 50)"),
    ("resume-spec-alias-bomb", lambda c: ["sweep", "--resume", "--run-dir",
                                          str(run_folder(c, "x-bomb:\n" + ALIAS_BOMB, GOOD_RESULT + "\n"))],
     "spec.yaml: its aliases expand to"),
    ("ablate-spec-alias-bomb", lambda c: ["ablate", str(run_folder(c, "x-bomb:\n" + ALIAS_BOMB, GOOD_RESULT + "\n"))],
     "spec.yaml: its aliases expand to"),
    ("resume-read-only-run", lambda c: ["sweep", "--resume", "--run-dir", str(read_only(c, resumable_run(c)))],
     "cannot write there"),
    ("report-read-only-run", lambda c: ["report", str(read_only(c, run_folder(c, results=GOOD_RESULT + "\n")))],
     "or pass --out FOLDER"),
    ("sweep-run-dir-in-read-only-folder", run_dir_in_read_only_folder, "cannot write there"),
    ("sweep-address-closed-port", lambda c: sweep_at(c, f"127.0.0.1:{closed_port()}"), "nothing answers there"),
    ("sweep-address-not-ray", lambda c: sweep_at(c, http_server(c)), "a server answers there, but not Ray's"),
    ("sweep-address-http-url", lambda c: sweep_at(c, "http://127.0.0.1:8265"), "an HTTP address"),
    ("sweep-ray-address-env-closed-port", lambda c: (c.env(RAY_ADDRESS=f"127.0.0.1:{closed_port()}"),
                                                     ["sweep", "--resume", "--run-dir", str(resumable_run(c))])[1],
     "RAY_ADDRESS '127.0.0.1:"),
    ("harvest-address-not-ray", lambda c: ["harvest", "--store", str(c.tmp / "store"), "--address", http_server(c)],
     "a server answers there, but not Ray's"),
    ("lease-timeout-not-seconds", lambda c: (c.env(DFC_RAY_LEASE_TIMEOUT="soon"), ["sweep", "--resume", "--run-dir",
                                                                                 str(resumable_run(c))])[1],
     "DFC_RAY_LEASE_TIMEOUT='soon': expected seconds between 2 and 86400"),
]


@pytest.mark.parametrize("build, expected", [case[1:] for case in RUN_CASES], ids=[case[0] for case in RUN_CASES])
def test_run_folder_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys):
    test_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys)


# ---------------------------------------------------------------- issues 29 and 31 (helper "validate"): meaning,
# sizes, addresses, devices, import-seed, results integrity

VALIDATE_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("spec-lr-negative", lambda c: bad_spec(c, "train: {lr: -0.001}"), "TrainConfig.lr=-0.001: expected a number > 0"),
    ("spec-betas-above-one", lambda c: bad_spec(c, "train: {betas: [1.5, 0.999]}"),
     "TrainConfig.betas=(1.5, 0.999): expected two numbers in [0, 1)"),
    ("spec-weight-decay-negative", lambda c: bad_spec(c, "train: {weight_decay: -1}"),
     "TrainConfig.weight_decay=-1.0: expected a number >= 0"),
    ("spec-name-250-characters", lambda c: bad_spec(c, f"name: {'n' * 250}\n", "sweep"),
     "field name = 'nnnnnnnnnnnnnnnnnnnn'… (250 characters): expected a name of at most 100 characters"),
    ("spec-unknown-keys-int-and-null", lambda c: bad_spec(c, "1: x\n~: y\n"),
     "field 1 = 'x': expected one of the sections name, description"),
    ("spec-unknown-key-null", lambda c: bad_spec(c, "~: y\n"), "field None = 'y': expected one of the sections"),
    ("spec-description-date", lambda c: bad_spec(c, "description: 2024-05-01\n", "sweep"),
     "field description = datetime.date(2024, 5, 1): expected a string, number, true/false, list or mapping, not "
     "a YAML date (quote it: '2024-05-01')"),
    ("spec-localize-when-nan", lambda c: bad_spec(c, "steering: {localize_when: {dict_size: .nan}}"),
     "expected a finite number for each crosscoder field"),
    ("spec-localize-when-matches-nothing", lambda c: bad_spec(c, "steering: {localize_when: {dict_size: 12345}}"),
     "field steering.localize_when = {'a_exclusive': 0.05, 'l1_excl': 0.0, 'dict_size': 12345}: expected crosscoder "
     "fields that at least one DFC grid point has (else the causal tests curve, ablate_b, patch_a never run)"),
    ("spec-dict-size-1e12", lambda c: bad_spec(c, "grid: {dict_size: [1000000000000]}\n"),
     "a trial needs 3182.1 TB (weights, gradients, Adam moments, a batch of 256), more than the 2.0 TB"),
    ("plan-dict-size-1e12", lambda c: ["sweep", bad_spec(c, "grid: {dict_size: [1000000000000]}\n")[2], "--plan"],
     "expected a crosscoder a machine can train"),
]


def seed_folder(ctx: Ctx, config: str) -> list[str]:
    """import-seed of a study folder whose config.json is `config`: "fifo" (a named pipe nobody writes) or
    "dev-zero" (a symlink to /dev/zero)."""
    folder = ctx.tmp / "study"
    folder.mkdir()
    if config == "fifo":
        os.mkfifo(folder / "config.json")
    else:
        (folder / "config.json").symlink_to("/dev/zero")
    return ["import-seed", str(folder), "--out", str(ctx.tmp / "imported")]


def own_pid_namespace() -> list[str] | None:
    """The command prefix that runs a process in a PID namespace of its own, where no other process is visible
    (`unshare --pid --fork --mount-proc`, which needs root); None where this machine cannot."""
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    if shutil.which("unshare") is None:
        return None
    done = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if done.returncode == 0 else None


def test_address_auto_with_no_cluster_on_the_machine_is_refused_before_anything_is_written(tmp_path):
    """`sweep --address auto` where no Ray cluster runs: one line, and no run folder. Ray's "auto" finds a cluster
    by its address file (RAY_TMPDIR: an empty folder here) or by its processes, so the sweep runs where no other
    process is visible (its own PID namespace): the other test worker's clusters are not on "this machine".
    Without that (not root): only while no cluster runs here."""
    prefix = own_pid_namespace()
    if prefix is None:
        from ray._private.services import find_gcs_addresses

        if find_gcs_addresses():
            pytest.skip("no PID namespace of its own here, and a Ray cluster runs on this machine")
        prefix = []
    spec = tmp_path / "bad.yaml"
    spec.write_text("extends: organism48\n")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(tmp_path / "ray-tmp"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, "-m", "dfc_ray.cli", "sweep", str(spec), "--run-dir",
                           str(tmp_path / "run"), "--quiet", "--address", "auto"], env=env, capture_output=True,
                          text=True, timeout=300)
    text = (done.stdout + done.stderr).strip()
    assert done.returncode != 0 and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "--address 'auto': no running Ray cluster found on this machine" in text, text
    assert not (tmp_path / "run").exists()


VALIDATE_CASES += [
    ("sweep-address-port-99999", lambda c: bad_spec(c, "", "sweep") + ["--address", "127.0.0.1:99999"],
     "--address '127.0.0.1:99999': invalid port 99999; expected a port from 1 to 65535"),
    ("sweep-address-ray-client", lambda c: bad_spec(c, "", "sweep") + ["--address", "ray://127.0.0.1:10001"],
     "--address 'ray://127.0.0.1:10001': a Ray Client address, which dfc-ray's driver cannot use"),
    ("sweep-ray-address-env-ray-client", lambda c: (c.env(RAY_ADDRESS="ray://127.0.0.1:6379"),
                                                   bad_spec(c, "", "sweep"))[1], "RAY_ADDRESS 'ray://127.0.0.1:6379'"),
    ("import-seed-config-fifo", lambda c: seed_folder(c, "fifo"),
     "study/config.json: not a regular file (a folder, FIFO or device)"),
    ("import-seed-config-dev-zero", lambda c: seed_folder(c, "dev-zero"),
     "study/config.json: not a regular file (a folder, FIFO or device)"),
    ("import-seed-out-is-a-file", lambda c: ((c.tmp / "taken").write_text("x"), [
        "import-seed", str(c.tmp / "study"), "--out", str(c.tmp / "taken")])[1],
     "taken: a file, not a folder; expected an empty or new folder for the checkpoint"),
]


COSTS = {"device": "cpu (2 cores)", "measured_on": "organism48 (d_model 192, 4 blocks)", "d_model": 192,
         "harvest": 1e9, "train": 2e9, "judge": 3e9}


def costs_file(ctx: Ctx, **changes) -> list[str]:
    """`sweep organism48 --plan --costs` of a costs JSON with `changes` on top of a good one (NaN as JSON's NaN)."""
    path = ctx.tmp / "costs.json"
    path.write_text(json.dumps(COSTS | changes))
    return ["sweep", "organism48", "--plan", "--costs", str(path)]


VALIDATE_CASES += [
    ("plan-costs-train-zero", lambda c: costs_file(c, train=0),
     "costs.json: field train = 0: expected a finite FLOP/s rate > 0, or null (not measured)"),
    ("plan-costs-train-negative", lambda c: costs_file(c, train=-5e9),
     "field train = -5000000000.0: expected a finite"),
    ("plan-costs-judge-nan", lambda c: costs_file(c, judge=float("nan")), "field judge = nan: expected a finite"),
    ("plan-costs-train-text", lambda c: costs_file(c, train="fast"), "field train = 'fast': expected a finite"),
    ("plan-costs-device-number", lambda c: costs_file(c, device=7),
     "field device = 7: expected a non-empty string (where the rates were measured)"),
    ("plan-costs-unknown-field", lambda c: costs_file(c, trian=1e9), "field trian = 1000000000.0: expected no such"),
    ("plan-costs-not-an-object", lambda c: ((c.tmp / "costs.json").write_text("[1, 2]"), [
        "sweep", "organism48", "--plan", "--costs", str(c.tmp / "costs.json")])[1],
     "expected a costs JSON object (the costs.json a finished sweep writes), got list"),
]


def results_without_run_record(ctx: Ctx, hashed: str) -> list[str]:
    """`sweep --resume` of an organism48 run folder without run.json (as from before it existed) whose spec.yaml
    was edited (train.steps 300 → 50) after its one trial ran; `hashed`: "none" (an old record without
    spec_hash) or "original" (the record carries the hash of the spec it ran under)."""
    from dfc_ray.sweep.results import spec_hash

    started = yaml.safe_load(shipped_spec_dump("organism48"))
    edited = started | {"train": started["train"] | {"steps": 50}}
    record = json.loads(GOOD_RESULT) | ({"spec_hash": spec_hash(started)} if hashed == "original" else {})
    run = run_folder(ctx, yaml.safe_dump(edited, sort_keys=False), json.dumps(record) + "\n")
    return ["sweep", "--resume", "--run-dir", str(run)]


VALIDATE_CASES += [
    ("resume-duplicate-trial-id", lambda c: ["sweep", "--resume", "--run-dir", str(run_folder(
        c, shipped_spec_dump("organism48"), GOOD_RESULT + "\n" + GOOD_RESULT.replace('"dict_size": 64',
                                                                                    '"dict_size": 128') + "\n"))],
     "results.jsonl: lines 1 and 2 both record trial 't1'; expected each trial once"),
    ("report-duplicate-trial-id", lambda c: ["report", str(run_folder(c, results=GOOD_RESULT + "\n" + GOOD_RESULT))],
     "results.jsonl: lines 1 and 2 both record trial 't1'"),
    ("resume-no-run-json-unhashed-results", lambda c: results_without_run_record(c, "none"),
     "spec.yaml: no run.json beside it, and 1 of its 1 recorded trials carry no spec hash (e.g. t1)"),
    ("resume-no-run-json-edited-spec", lambda c: results_without_run_record(c, "original"),
     "spec.yaml: no run.json beside it, and 1 of its 1 recorded trials ran under another spec (e.g. t1)"),
]


VALIDATE_CASES += [
    ("sweep-train-device-cuda-no-gpu", lambda c: (no_cuda(), bad_spec(c, "train: {device: cuda}", "sweep"))[1],
     "field train.device = 'cuda': this machine (a local cluster) has no GPU; expected 'cpu' or 'auto'"),
    ("sweep-pair-device-cuda-no-gpu", lambda c: (no_cuda(), bad_spec(c, "pair: {device: 'cuda:1'}", "sweep"))[1],
     "field pair.device = 'cuda:1': this machine (a local cluster) has no GPU; expected 'cpu' or 'auto'"),
]


def test_a_run_without_run_json_resumes_when_its_results_match_spec_yaml(tmp_path):
    """Without run.json, a resume compares spec.yaml with the spec_hash each recorded trial carries: equal, it
    resumes silently; edited, only with --accept-spec-changes, which records the unknown start."""
    from dfc_ray.sweep.driver import _open_run
    from dfc_ray.sweep.results import spec_hash

    ctx = Ctx(tmp_path, pytest.MonkeyPatch(), None)  # type: ignore[arg-type]
    spec = yaml.safe_load(shipped_spec_dump("organism48"))
    run = run_folder(ctx, yaml.safe_dump(spec, sort_keys=False),
                     json.dumps(json.loads(GOOD_RESULT) | {"spec_hash": spec_hash(spec)}) + "\n")
    _, resumed, record = _open_run(None, str(run), resume=True)
    assert resumed.name == "organism48" and "spec_changes" not in record
    (run / "spec.yaml").write_text(yaml.safe_dump(spec | {"train": spec["train"] | {"steps": 50}}, sort_keys=False))
    _, resumed, record = _open_run(None, str(run), resume=True, accept_spec_changes=True)
    assert resumed.train["steps"] == 50
    assert record["spec_changes"][0]["changes"] == ["unknown: no run.json, and 1 of its 1 recorded trials ran "
                                                    "under another spec"]


def test_a_costs_file_that_follows_the_schema_still_plans(tmp_path, capsys):
    """The schema refuses only what is wrong: the good costs file above (and a stage not measured, null) plans."""
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(COSTS | {"harvest": None}))
    assert main(["sweep", "organism48", "--plan", "--costs", str(path)]) == 0
    assert "rates measured on cpu (2 cores)" in capsys.readouterr().out


@pytest.mark.parametrize("build, expected", [case[1:] for case in VALIDATE_CASES],
                         ids=[case[0] for case in VALIDATE_CASES])
def test_validate_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys):
    test_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys)


def test_the_pairs_width_tightens_the_memory_bound(tmp_path):
    """At validation the trial memory bound uses d_model 1 (a lower bound); against the pair it uses the
    pair's width (organism: 192), so a dictionary only a wide pair makes too large is refused there."""
    from dfc_ray.config import SpecError
    from dfc_ray.spaces import check_against_pair, load_spec

    path = tmp_path / "wide.yaml"
    path.write_text("extends: organism48\ngrid: {dict_size: [300000000], k: [8], variant: [{a_exclusive: 0.05}]}\n"
                    "steering: {localize_when: null}\n")
    spec = load_spec(str(path))  # 3e8 features: about 1 TB at d_model 1, 4.6 TB at 192
    with pytest.raises(SpecError, match="at d_model 192 a trial needs"):
        check_against_pair(spec)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_yaml_is_read_only_from_a_regular_file(kind, tmp_path):
    """`load_yaml` (specs, cluster files) refuses a FIFO, which would block the read forever, and a link to
    /dev/zero, whose size says 0 and whose read never ends."""
    from dfc_ray.yamlio import load_yaml

    path = tmp_path / "spec.yaml"
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"spec.yaml: not a regular file \(a folder, FIFO or device\); expected a "
                                         "YAML file"):
        load_yaml(path)


# ---------------------------------------------------------------- leases and paths a run's files name (#29.2, #31)


def leased_run(ctx: Ctx, **fields: object) -> list[str]:
    """A resumable run folder whose lease.json holds `fields` over a plausible lease (or is a directory)."""
    run = resumable_run(ctx)
    if not fields:
        (run / "lease.json").mkdir()
    else:
        now = time.time()
        lease = {"token": "ab" * 16, "host": "h1", "pid": 7, "started": now, "heartbeat": now, "timeout": 90} | fields
        (run / "lease.json").write_text(json.dumps(lease))
    return ["sweep", "--resume", "--run-dir", str(run)]


def ablate_with(ctx: Ctx, **metrics: object) -> list[str]:
    """A finished DFC trial whose record names `metrics` paths; nothing may be written where they point."""
    run = ctx.tmp / "run"
    record = {"trial_id": "t1", "status": "ok", "config": {"dict_size": 768, "k": 8, "variant": "dfc-10pct"},
              "metrics": {"checkpoint": str(run / "checkpoints" / "t1")} | metrics}
    run_folder(ctx, shipped_spec_dump("cluster-smoke"), json.dumps(record) + "\n")
    before = sorted(p for p in ctx.tmp.rglob("*") if "run" not in p.relative_to(ctx.tmp).parts[:1])
    ctx.cleanups.append(lambda: _assert_unchanged(ctx.tmp, before))
    return ["ablate", str(run), "--checkpoints", "1"]


def _assert_unchanged(tmp: Path, before: list[Path]) -> None:
    after = sorted(p for p in tmp.rglob("*") if "run" not in p.relative_to(tmp).parts[:1])
    assert after == before, f"written outside the run folder: {sorted(set(after) - set(before))}"


LEASE_AND_PATH_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("lease-heartbeat-not-a-time", lambda c: leased_run(c, heartbeat="yesterday"),
     "lease.json: heartbeat = 'yesterday': expected a finite Unix time"),
    ("lease-heartbeat-nan", lambda c: leased_run(c, heartbeat=float("nan")),
     "lease.json: heartbeat = nan: expected a finite Unix time"),
    ("lease-timeout-infinite", lambda c: leased_run(c, timeout=float("inf")),
     "lease.json: timeout = inf: expected seconds > 0 and at most 86400"),
    ("lease-a-directory", leased_run, "lease.json: a directory; expected the lease file a driver writes"),
    ("lease-newer-fields-still-held", lambda c: leased_run(c, format_version=2, extra={"x": 1}),
     "in use by the driver on host h1 (pid 7)"),
    ("lease-timeout-tiny", lambda c: (c.env(DFC_RAY_LEASE_TIMEOUT="0.001"),
                                      ["sweep", "--resume", "--run-dir", str(resumable_run(c))])[1],
     "DFC_RAY_LEASE_TIMEOUT='0.001': expected seconds between 2 and 86400 (a timeout spans 4 heartbeats"),
    ("ablate-harvest-store-elsewhere", lambda c: ablate_with(c, harvest_store=str(c.tmp / "elsewhere" / "x" / "0123")),
     "results.jsonl: trial t1: metrics.harvest_store = "),
    ("ablate-harvest-store-dotdot", lambda c: ablate_with(c, harvest_store=str(c.tmp / "run" / ".." / "x" / "0123")),
     "outside the run's storage; expected a harvest under"),
    ("ablate-checkpoint-elsewhere", lambda c: ablate_with(c, checkpoint=str(c.tmp / "elsewhere" / "ckpt")),
     "results.jsonl: trial t1: metrics.checkpoint = "),
]


@pytest.mark.parametrize("build, expected", [case[1:] for case in LEASE_AND_PATH_CASES],
                         ids=[case[0] for case in LEASE_AND_PATH_CASES])
def test_lease_and_run_path_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys):
    test_bad_input_gives_one_clear_line(build, expected, tmp_path, monkeypatch, request, capsys)
