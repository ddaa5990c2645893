"""Resolve a model pair (A = RL-tuned, B = base) and its tokenizer from a spec.

A model reference is one of: ``organism`` (the embedded tiny pair shipped in the package), a local
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

from dfc_ray.config import ORGANISM, PairSpec
from dfc_ray.generation import decoder_layers
from dfc_ray.preflight import resolve_device
from dfc_ray.tooluse.task import Task
from dfc_ray.tooluse.tasks import prompt_lengths

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAUSAL_LM = "a decoder-only causal LM (llama, mistral, gemma, qwen, olmo, phi3, gpt_neox, …)"
"""What a pair's models must be (`unhookable` says why one is not), in the one-line refusals."""


def resolved_device(spec: PairSpec) -> str:
    """The torch device `spec.device` names (``auto``: cuda when available, else cpu); one-line ValueError
    when this machine lacks it."""
    return resolve_device(spec.device, "pair.device")


def _local_dir(reference: str, role: str) -> str:
    """Path or hub id usable by `from_pretrained`; the organism and s3:// become local folders."""
    if reference == ORGANISM:
        # deferred: the organism package loads transformers
        from dfc_ray.organism import PAIR_DIR

        return str(PAIR_DIR / {"a": "a", "b": "b", "tokenizer": "tokenizer"}[role])
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
    """The transformers config of model ``a`` or ``b`` (no weights loaded); `local_only`: never download. A
    multimodal wrapper's (Gemma-3 ≥ 4B) widths and depths are in `config.get_text_config()`, its language model's."""
    # deferred: transformers takes seconds to import
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_local_dir(getattr(spec, role), role), local_files_only=local_only)


def unhookable(config) -> str | None:
    """Why harvest and the judges could not run a model of `config`, or None: it must load as a transformers
    causal LM (a multimodal wrapper such as Gemma3ForConditionalGeneration does, through its language model)
    whose decoder blocks `decoder_layers` finds. Built without weights (meta device), so a spec check refuses
    what a harvest would, before any weights load."""
    # deferred: transformers takes seconds to import
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):  # transformers lists every causal LM class: not a line to show
        return f"model_type {config.model_type!r} is not a transformers causal LM"
    try:
        decoder_layers(model)
    except ValueError:
        return f"{type(model).__name__} has no decoder blocks at .model.layers"
    return None


def family_mismatch(config_a, config_b) -> str | None:
    """What B would have to be to pair with A, or None when both are one architecture at one width: a crosscoder
    pairs their residual streams feature by feature, which means something for an RL fine-tune and its base."""
    a, b = config_a.get_text_config(), config_b.get_text_config()
    if a.model_type != b.model_type:
        return f"a model of A's architecture ({a.model_type}; B is {b.model_type}): a fine-tune and its base"
    if a.hidden_size != b.hidden_size:
        return (f"a model of A's width (hidden_size {a.hidden_size}, B has {b.hidden_size}): a crosscoder needs "
                "equal widths")
    return None


def check_same_family(spec: PairSpec, config_a, config_b) -> None:
    """ValueError (one line) when B cannot pair with A (`family_mismatch`)."""
    mismatch = family_mismatch(config_a, config_b)
    if mismatch is not None:
        raise ValueError(f"pair.b = {spec.b!r}: expected {mismatch}")


def check_pair(spec: PairSpec, local_only: bool = False):
    """A's language-model config, once both configs say harvest and the judges can run the pair (`unhookable`,
    `check_same_family`); ValueError (one line) before any weights load."""
    configs = {role: load_config(spec, role, local_only) for role in ("a", "b")}
    for role, config in configs.items():
        reason = unhookable(config)
        if reason is not None:
            raise ValueError(f"pair.{role} = {getattr(spec, role)!r}: expected {CAUSAL_LM}, but {reason}")
    check_same_family(spec, configs["a"], configs["b"])
    return configs["a"].get_text_config()


def load_model(spec: PairSpec, role: str) -> torch.nn.Module:
    """Load model ``a`` or ``b`` of the pair in eval mode on the spec's device and dtype."""
    # deferred: transformers takes seconds to import
    from transformers import AutoModelForCausalLM

    reference = getattr(spec, role)
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    if spec.revision and reference != ORGANISM and not Path(reference).exists():
        kwargs["revision"] = spec.revision
    model = AutoModelForCausalLM.from_pretrained(_local_dir(reference, role), **kwargs)
    return model.to(resolved_device(spec)).eval()


def load_tokenizer(spec: PairSpec, local_only: bool = False):
    """The pair's tokenizer, left-padded (batched generation and last-token indexing rely on it);
    `local_only`: never download."""
    # deferred: transformers takes seconds to import
    from transformers import AutoTokenizer

    reference = spec.tokenizer or spec.b
    tokenizer = AutoTokenizer.from_pretrained(_local_dir(reference, "tokenizer" if reference == ORGANISM else "b"),
                                              local_files_only=local_only)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_chat_template(tokenizer, where: str) -> None:
    """ValueError (one line) when `tokenizer` has no chat template to render tool prompts with: a base checkpoint B
    often ships none, and the tokenizer defaults to B's."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer {tokenizer.name_or_path!r} (pair.tokenizer, default model B's) has "
                         "no chat template to render tool prompts; expected one that has (pair.tokenizer or "
                         "--tokenizer naming model A's)")


def load_pair(spec: PairSpec) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(model_a, model_b, tokenizer), checked to be one architecture at one width (`check_same_family`)."""
    model_a, model_b = load_model(spec, "a"), load_model(spec, "b")
    check_same_family(spec, model_a.config, model_b.config)
    return model_a, model_b, load_tokenizer(spec)


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
    limits = [getattr(load_config(spec, role, local_only).get_text_config(), "max_position_embeddings", None)
              for role in ("a", "b")]
    known = [int(limit) for limit in limits if limit]
    return min(known) if known else None


def check_prompts_fit(spec: PairSpec, tasks: list[Task], new_tokens: int, where: str, prompt_format: str = "chat",
                      local_only: bool = False) -> None:
    """ValueError (one line naming the longest prompt's task) when a prompt plus `new_tokens` generated tokens runs past
    the models' positions: a model past its trained length answers, but the answer measures nothing. Chat prompts need
    a tokenizer with a chat template (`require_chat_template`)."""
    if not tasks:
        return
    tokenizer = load_tokenizer(spec, local_only)
    if prompt_format == "chat":
        require_chat_template(tokenizer, where)
    limit = max_positions(spec, local_only)
    if limit is None:
        return
    lengths = prompt_lengths(tokenizer, tasks, prompt_format, spec.dialect)
    worst = max(range(len(tasks)), key=lengths.__getitem__)
    if lengths[worst] + new_tokens > limit:
        raise ValueError(f"{where}: task {tasks[worst].id}: a prompt of {lengths[worst]:,} tokens + {new_tokens} new "
                         f"tokens runs past the models' {limit:,} positions (max_position_embeddings); expected "
                         "shorter prompts or fewer new tokens")
