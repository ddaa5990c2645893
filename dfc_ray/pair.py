"""Resolve a model pair (A = RL-tuned, B = base) and its tokenizer from a spec.

A model reference is one of: ``organism`` (the embedded tiny pair shipped in the package; ``organism-llama3``
its llama3-dialect twin), a local
folder, an ``s3://`` prefix (downloaded once to a local cache), or a hub id (``Qwen/Qwen2.5-3B``;
needs network on the machine that loads it). Weights never travel through Ray's object store:
actors receive a `PairSpec` and load it themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from dfc_ray.config import ORGANISM_PAIRS, PairSpec
from dfc_ray.preflight import resolve_device
from dfc_ray.tooluse.task import Task
from dfc_ray.tooluse.tasks import prompt_lengths

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolved_device(spec: PairSpec) -> str:
    """The torch device `spec.device` names (``auto``: cuda when available, else cpu); one-line ValueError
    when this machine lacks it."""
    return resolve_device(spec.device, "pair.device")


def _local_dir(reference: str, role: str) -> str:
    """Path or hub id usable by `from_pretrained`; the organism and s3:// become local folders."""
    if reference in ORGANISM_PAIRS:
        # deferred: the organism package loads transformers
        from dfc_ray.organism import reference_dir

        return str(reference_dir(reference, role))
    if reference.startswith("s3://"):
        return _download_s3_prefix(reference)
    return reference


def _download_s3_prefix(uri: str) -> str:
    """Mirror an s3:// model folder into ~/.cache/dfc-ray/models (skipping files already complete)."""
    from dfc_ray.fs import s3fs_client  # deferred: pyarrow and s3fs load only for s3:// models

    fs = s3fs_client()
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = Path(os.environ.get("DFC_RAY_CACHE", Path.home() / ".cache" / "dfc-ray")) / "models" / key
    target.mkdir(parents=True, exist_ok=True)
    prefix = uri[len("s3://"):].rstrip("/")
    for remote in fs.find(prefix):
        local = target / remote[len(prefix) + 1:]
        if local.exists() and local.stat().st_size == fs.size(remote):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        fs.get(remote, str(partial))
        partial.rename(local)
    return str(target)


def load_config(spec: PairSpec, role: str, local_only: bool = False):
    """The transformers config of model ``a`` or ``b`` (no weights loaded); `local_only`: never download."""
    # deferred: transformers takes seconds to import
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_local_dir(getattr(spec, role), role), local_files_only=local_only)


def load_model(spec: PairSpec, role: str) -> torch.nn.Module:
    """Load model ``a`` or ``b`` of the pair in eval mode on the spec's device and dtype."""
    # deferred: transformers takes seconds to import
    from transformers import AutoModelForCausalLM

    reference = getattr(spec, role)
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    if spec.revision and reference not in ORGANISM_PAIRS and not Path(reference).exists():
        kwargs["revision"] = spec.revision
    model = AutoModelForCausalLM.from_pretrained(_local_dir(reference, role), **kwargs)
    return model.to(resolved_device(spec)).eval()


def load_tokenizer(spec: PairSpec, local_only: bool = False):
    """The pair's tokenizer, left-padded (batched generation and last-token indexing rely on it);
    `local_only`: never download."""
    # deferred: transformers takes seconds to import
    from transformers import AutoTokenizer

    reference = spec.tokenizer or spec.b
    role = "tokenizer" if reference in ORGANISM_PAIRS else "b"
    tokenizer = AutoTokenizer.from_pretrained(_local_dir(reference, role), local_files_only=local_only)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pair(spec: PairSpec) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(model_a, model_b, tokenizer), checked to share d_model and vocabulary."""
    model_a, model_b = load_model(spec, "a"), load_model(spec, "b")
    tokenizer = load_tokenizer(spec)
    d_a, d_b = model_a.config.hidden_size, model_b.config.hidden_size
    if d_a != d_b:
        raise ValueError(f"pair: A ({spec.a}) has d_model {d_a} but B ({spec.b}) has {d_b}; "
                         "a crosscoder needs equal widths")
    return model_a, model_b, tokenizer


def pair_fingerprint(spec: PairSpec) -> str:
    """A content key for caching harvests: weights' identities, not just their names.

    Local folders (and the organism) are keyed by the sizes and modification-free checksums of
    their config and the first MiB of each weights file; hub ids by id + revision.
    """
    digest = hashlib.sha256()
    for role in ("a", "b"):
        reference = getattr(spec, role)
        digest.update(f"{role}={reference}@{spec.revision};".encode())
        folder = Path(_local_dir(reference, role)) if not reference.startswith("s3://") else None
        if folder is not None and folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in (".json", ".safetensors"):
                    with path.open("rb") as handle:
                        digest.update(f"{path.name}:{path.stat().st_size}:".encode() + handle.read(1 << 20))
    digest.update(json.dumps({"tokenizer": spec.tokenizer or spec.b, "dtype": spec.dtype}).encode())
    return digest.hexdigest()[:20]


def max_positions(spec: PairSpec, local_only: bool = False) -> int | None:
    """The fewest positions either model was built for (config.json's max_position_embeddings), None when
    neither says."""
    limits = [getattr(load_config(spec, role, local_only), "max_position_embeddings", None) for role in ("a", "b")]
    known = [int(limit) for limit in limits if limit]
    return min(known) if known else None


def check_prompts_fit(spec: PairSpec, tasks: list[Task], new_tokens: int, where: str, prompt_format: str = "chat",
                      local_only: bool = False) -> None:
    """ValueError (one line naming the longest prompt's task) when a prompt plus `new_tokens` generated tokens runs past
    the models' positions: a model past its trained length answers, but the answer measures nothing."""
    limit = max_positions(spec, local_only)
    if limit is None or not tasks:
        return
    lengths = prompt_lengths(load_tokenizer(spec, local_only), tasks, prompt_format, spec.dialect)
    worst = max(range(len(tasks)), key=lengths.__getitem__)
    if lengths[worst] + new_tokens > limit:
        raise ValueError(f"{where}: task {tasks[worst].id}: a prompt of {lengths[worst]:,} tokens + {new_tokens} new "
                         f"tokens runs past the models' {limit:,} positions (max_position_embeddings); expected "
                         "shorter prompts or fewer new tokens")
