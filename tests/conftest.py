"""Shared test fixtures: a real S3 endpoint (moto server) and a real local Ray cluster.

- `s3_server` (session): a `moto` S3 server on 127.0.0.1 and a free port, with fake credentials.
- `s3_bucket` (function): the standard AWS variables point at that server for one test (restored
  after), and a fresh bucket is created; yields its `s3://bucket` URI.
- `tiny_pair` (session): two random-weight Qwen2 models (d_model 32, 3 blocks, A ≠ B) and a small
  organism-style tokenizer, saved as folders; a `PairSpec` pointing at them.
- `one_thread` (module): torch runs single-threaded for the module (tiny-tensor tests).
- `ray_cluster` (module): `ray.init(num_cpus=2, include_dashboard=False)` on a new local cluster,
  shut down at the end of the module (a module's `RAY_CPUS` sets another count of logical CPUs).

The suite runs on two pytest-xdist workers, a test module per worker at a time (`-n 2 --dist loadfile
--no-loadscope-reorder`, the README's test command): most of its time is spent waiting on Ray and subprocesses,
so two modules at once fit on two cores. `pytest_collection_modifyitems` hands out the longest modules first.

Without a GPU, Triton's interpreter runs the CUDA path's kernels on CPU tensors (tests/test_kernels.py):
TRITON_INTERPRET must be set before anything imports triton, hence here, first.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class S3Server:
    """A running moto S3 server and the environment that points AWS clients at it."""

    endpoint: str
    """http://127.0.0.1:<port>."""
    env: dict[str, str]
    """AWS_ENDPOINT_URL, fake AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Recognizable fake secrets, so tests can assert they never leak into files, logs or errors.
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIADFCRAYTESTKEY0001",
           "AWS_SECRET_ACCESS_KEY": "dfc-ray-test-secret-do-not-leak", "AWS_DEFAULT_REGION": "us-east-1"}
    yield S3Server(endpoint, env)
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the test S3 server; AWS env vars point at it for this test only."""
    import boto3

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    name = f"dfc-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_cluster(s3_server, request):
    """A fresh local Ray cluster for one test module.

    Ray 2.60 turns token authentication on for every new local cluster (and writes a token to
    ~/.ray/auth_token). This test cluster instead runs with RAY_AUTH_MODE=disabled and listens on
    127.0.0.1 only (`cluster.loopback_only`): nothing outside this machine can reach it and no file
    lands in $HOME.
    `address="local"` always starts a new cluster, never one found through RAY_ADDRESS or /tmp/ray.
    The test S3 environment is set while the cluster starts, so Ray workers (which inherit the
    raylet's environment, like nodes configured for a real endpoint) can read `s3_bucket` stores.
    """
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    from dfc_ray.cluster import loopback_only

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        # The auth mode is cached per process: refresh it (an earlier cluster may have used tokens).
        reset_auth_token_state()
        with pytest.MonkeyPatch.context() as worker_env:
            for key, value in s3_server.env.items():
                worker_env.setenv(key, value)
            loopback_only()  # every server on 127.0.0.1, as `dfc-ray sweep` starts its clusters
            ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False,
                     _node_ip_address="127.0.0.1")
        try:
            yield ray
        finally:
            ray.shutdown()
    reset_auth_token_state()  # back to the caller's own auth mode


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on a shared 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_pair(root):
    """Two random-weight Qwen2 models (A ≠ B, d_model 32, 3 blocks) and a small organism-style
    tokenizer, saved as folders under `root`; returns a `PairSpec` pointing at them.
    initializer_range 0.2 gives sharp logits, so argmax has no near-ties a rounding could flip."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dfc_ray.organism import world
    from dfc_ray.organism.tokenizer import template_only, train_tokenizer
    from dfc_ray.pair import PairSpec
    from dfc_ray.tooluse import render_prompt

    renderer = template_only()
    texts = world.plain_text(200, 1) + [render_prompt(renderer, t) for t in world.load_split("dev")[:100]]
    tokenizer = train_tokenizer(texts, vocab_size=600)
    tokenizer.save_pretrained(root / "tokenizer")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                             tie_word_embeddings=True, initializer_range=0.2)
        Qwen2ForCausalLM(config).save_pretrained(root / name)
    return PairSpec(a=str(root / "a"), b=str(root / "b"), tokenizer=str(root / "tokenizer"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """The `make_tiny_pair` pair, built once per test session."""
    return make_tiny_pair(tmp_path_factory.mktemp("pair"))


LONGEST_MODULES = ("test_multinode.py", "test_lease.py", "test_sweep.py", "test_sweep_s3.py", "test_run_identity.py",
                   "test_harvest.py", "test_family_sweeps.py", "test_s3_outage.py")
"""Test modules by their measured time, longest first (docs/BENCHMARKS.md, "The test suite"). Only an order:
a module missing here runs after them, a stale entry costs minutes of wall time, never a result."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, each module's tests in their own order: with two workers taking whole modules
    in collection order, a three-minute module never starts while the other worker has nothing left to run."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
