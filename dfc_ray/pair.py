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
    target = cache_dir() / "models" / key
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
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars on stdout would tear a sweep's live view
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


HASH_CACHE = "file-hashes.json"
"""The per-file content hashes `file_sha256` keeps, in the dfc-ray cache folder ($DFC_RAY_CACHE, else
~/.cache/dfc-ray) of each machine: absolute path → size, mtime, ctime, inode and sha256."""
MAX_HASH_ENTRIES = 2000
"""Entries the hash cache may hold before those of files that no longer exist are dropped."""
HASH_CHUNK = 8 << 20
"""Bytes read per step while hashing a file (streamed: a 6 GB weights file never sits in memory)."""


def cache_dir() -> Path:
    """dfc-ray's cache folder on this machine (s3:// model mirrors, file hashes)."""
    return Path(os.environ.get("DFC_RAY_CACHE", Path.home() / ".cache" / "dfc-ray"))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's whole content, computed once per version of the file: the result is cached under
    its path with its size, modification and change times and inode (an in-place edit changes the times; a
    user can reset the mtime, not the ctime), so later calls cost a stat."""
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    cache_file = cache_dir() / HASH_CACHE
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: hashes are recomputed, never trusted blindly
        cache = {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    if len(cache) >= MAX_HASH_ENTRIES:
        cache = {name: value for name, value in cache.items() if os.path.exists(name)}
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:  # written whole and renamed: a concurrent reader sees the old cache or the new one
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{HASH_CACHE}.{os.getpid()}.partial")
        partial.write_text(json.dumps(cache))
        partial.replace(cache_file)
    except OSError:  # a read-only home: the hash is still right, only recomputed next time
        pass
    return digest.hexdigest()


def _folder_identity(folder: Path) -> str:
    """Every file of a local model folder (hidden ones aside) as `relative path:size:sha256`, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(folder).parts))
    return ";".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{file_sha256(p)}" for p in files)


def _s3_identity(uri: str) -> str:
    """Every object under an s3:// model prefix as `key:size:ETag`, sorted: S3 writes whole objects, and a
    rewritten object gets a new ETag (an MD5 of its content, or of its parts for a multipart upload), so the
    listing alone names the content without downloading it."""
    from dfc_ray.fs import s3fs_client  # deferred: pyarrow and s3fs load only for s3:// models

    prefix = uri[len("s3://"):].rstrip("/")
    found = s3fs_client().find(prefix, detail=True)
    return ";".join(f"{key[len(prefix) + 1:]}:{info.get('size')}:{str(info.get('ETag', '')).strip(chr(34))}"
                    for key, info in sorted(found.items()))


def pair_fingerprint(spec: PairSpec) -> str:
    """A content key for caching harvests (and for judges to know their pair): the weights' full content, not
    their names. Local folders (and the organism) are keyed by a sha256 of every file (`file_sha256`, computed
    once per file version), s3:// prefixes by their objects' ETags, hub ids by id + revision."""
    digest = hashlib.sha256()
    for role in ("a", "b"):
        reference = getattr(spec, role)
        digest.update(f"{role}={reference}@{spec.revision};".encode())
        if reference.startswith("s3://"):
            digest.update(_s3_identity(reference).encode())
            continue
        folder = Path(_local_dir(reference, role))
        if folder.is_dir():
            digest.update(_folder_identity(folder).encode())
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
