"""Import the seed study's published crosscoders as dfc-ray checkpoints (docs/replication.md).

The study saved a folder with `config.json` (`activation_dim`, `dict_size`, `k`, optional `n_a`, `n_b`)
and `model.pt`, a torch state dict: `W_enc` (2, d, D), `b_enc` (D), `W_dec` (D, 2, d), `b_dec` (2, d) and,
for DFC variants, the buffers `enc_mask` (2, D) and `dec_mask` (D, 2). Its forward is
`pre = einsum("bmd,mdf->bf", x, W_enc) + b_enc`, ReLU, per-sample TopK(k) (no decoder-norm ranking), and
`x̂ = einsum("bf,fmd->bmd", f, W_dec·dec_mask) + b_dec`; `encode` does not apply `enc_mask` (the forbidden
encoder weights were zero from initialisation on). Model 0 is A, features [0, n_a) A-exclusive, then
n_b B-exclusive, then shared.

The import maps those weights onto dfc-ray's structural partition blocks, which have no room for a
forbidden weight: a non-zero one is refused unless the caller allows dropping it, and then the drop is
recorded. The study did not save its normalization statistics, so the checkpoint either takes them from
a dfc-ray harvest of the same layer or is marked `normalization: unknown` (identity statistics: raw in,
raw out, as the study's splice did) and `require_known_normalization` refuses to judge it unless the
caller chooses raw explicitly. What the import did lives in `import.json` next to the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import torch
from torch import Tensor

from dfc_ray.config import DFCConfig
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.fs import RunFolder, open_fs, redact
from dfc_ray.store import load_norm_stats, read_manifest

IMPORT_RECORD = "import.json"
"""The sidecar file an imported checkpoint carries (a native checkpoint has none)."""
Normalization = Literal["trained", "harvest", "unknown"]
"""Where a checkpoint's normalization statistics come from: fitted by dfc-ray's trainer ("trained"),
taken from a dfc-ray harvest at import ("harvest"), or not known (identity: raw in, raw out)."""

_WEIGHTS = {"W_enc": "(2, d, D)", "b_enc": "(D,)", "W_dec": "(D, 2, d)", "b_dec": "(2, d)"}
_MASKS = {"enc_mask": "(2, D)", "dec_mask": "(D, 2)"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


# ---------------------------------------------------------------- reading the study's folder


MAX_CONFIG_BYTES = 1 << 20
"""Largest config.json read (1 MiB; the study's is a few hundred bytes)."""


def _read_checked(fs: pafs.FileSystem, path: str, where: str, limit: int) -> bytes:
    """The file at `path`, read only when it is a regular file of at most `limit` bytes: a FIFO would block the
    read forever, and a device such as /dev/zero would be read until memory runs out."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type != pafs.FileType.File or info.size is None:
        raise ValueError(f"{where}: not a regular file (a folder, FIFO or device); expected the study's file")
    if info.size > limit:
        raise ValueError(f"{where}: {info.size:,} bytes; expected at most {limit:,} for this file")
    with fs.open_input_stream(path) as handle:
        return handle.read()


def _read_local_or_s3(src: str, name: str, limit: int) -> bytes:
    try:
        fs, root = open_fs(src)
        return _read_checked(fs, f"{root}/{name}", f"{redact(src)}/{name}", limit)
    except FileNotFoundError:
        raise FileNotFoundError(f"{redact(src)}: not a seed-study checkpoint (no {name})") from None
    except OSError as err:  # pyarrow reports a missing S3 object or bucket as OSError too
        if "does not exist" in str(err) or "NoSuchBucket" in str(err) or "NoSuchKey" in str(err):
            raise FileNotFoundError(f"{redact(src)}: not a seed-study checkpoint (no {name})") from None
        raise ValueError(f"{redact(src)}/{name}: cannot be read ({str(err).splitlines()[0]})") from None


def _read_hub(src: str, name: str, limit: int) -> bytes:
    from huggingface_hub import hf_hub_download  # deferred: only hub sources need it
    from huggingface_hub.utils import logging as hub_logging  # deferred: as above

    owner, repo, *sub = src.split("/")
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line below
    try:
        path = hf_hub_download(f"{owner}/{repo}", name, subfolder="/".join(sub) or None)
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo/file: all end in one line
        reason = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else "no detail"
        raise ValueError(f"{src}: hub id, but {name} could not be fetched from the Hugging Face Hub "
                         f"({type(err).__name__}: {reason}); copy the folder to a local path or s3:// and "
                         f"import from there") from None
    return _read_checked(pafs.LocalFileSystem(), str(Path(path).resolve()), f"{src}/{name}", limit)


def read_source_file(src: str, name: str, limit: int) -> bytes:
    """One file of a seed-study folder, at most `limit` bytes: a local path, file://, s3://bucket/prefix, or a
    hub id `owner/repo[/subfolder]` when no local folder of that name exists."""
    is_hub = "://" not in src and not os.path.exists(src) and _HUB_ID.match(src)
    return _read_hub(src, name, limit) if is_hub else _read_local_or_s3(src, name, limit)


def _state_bytes_limit(config: dict[str, Any]) -> int:
    """Largest model.pt read for `config`: every tensor it may hold (masks too) in float64, plus 1 MiB of
    pickle framing; a float32 file is half of it."""
    d, size = config["activation_dim"], config["dict_size"]
    return 8 * (4 * d * size + size + 2 * d + 4 * size) + (1 << 20)


def read_seed_config(src: str) -> dict[str, Any]:
    """The study's config.json: positive integers `activation_dim`, `dict_size`, `k`; `n_a`/`n_b` optional."""
    where = f"{redact(src)}/config.json"
    try:
        raw = json.loads(read_source_file(src, "config.json", MAX_CONFIG_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{where}: not valid JSON") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object with activation_dim, dict_size, k")
    for key in ("activation_dim", "dict_size", "k", "n_a", "n_b"):
        value = raw.get(key)
        required = key in ("activation_dim", "dict_size", "k")
        if value is None and not required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if required else 0):
            raise ValueError(f"{where}: field {key!r} is {value!r}; expected "
                             f"{'a positive integer' if required else 'an integer >= 0'}")
    if raw["k"] > raw["dict_size"]:
        raise ValueError(f"{where}: k={raw['k']} exceeds dict_size={raw['dict_size']}")
    return raw


def read_seed_state(src: str, config: dict[str, Any]) -> dict[str, Tensor]:
    """model.pt as float32 tensors, loaded weights-only (a pickle that holds code is refused, never run),
    with exactly the study's tensor names and the shapes config.json implies."""
    where = f"{redact(src)}/model.pt"
    data = read_source_file(src, "model.pt", _state_bytes_limit(config))
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch raises many types for truncated/unsafe files
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
        raise ValueError(f"{where}: not a weights-only torch state dict ({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{where}: expected a state dict of named tensors, got {type(state).__name__}")
    names = set(state)
    has_masks = names & set(_MASKS)
    expected = set(_WEIGHTS) | (set(_MASKS) if has_masks else set())
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"{where}: tensors {sorted(names)}; expected {sorted(_WEIGHTS)} plus, for a DFC, both of "
                         f"{sorted(_MASKS)} (missing {missing or 'none'}, unexpected {extra or 'none'})")
    d, size = config["activation_dim"], config["dict_size"]
    shapes = {"W_enc": (2, d, size), "b_enc": (size,), "W_dec": (size, 2, d), "b_dec": (2, d),
              "enc_mask": (2, size), "dec_mask": (size, 2)}
    for name, tensor in state.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}; config.json "
                             f"(activation_dim={d}, dict_size={size}) implies {shapes[name]}")
        if not torch.isfinite(tensor.float()).all():
            raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values")
    return {name: tensor.float() for name, tensor in state.items()}


# ---------------------------------------------------------------- partition and exclusivity


def partition_from_masks(state: dict[str, Tensor], config: dict[str, Any], where: str) -> tuple[int, int]:
    """(n_a, n_b) read from the masks (0, 0 for a plain crosscoder), checked against config.json's."""
    if "enc_mask" not in state:
        for key in ("n_a", "n_b"):
            if config.get(key):
                raise ValueError(f"{where}: config.json has {key}={config[key]} but model.pt has no masks "
                                 f"(a plain crosscoder); expected enc_mask and dec_mask")
        return 0, 0
    enc, dec = state["enc_mask"], state["dec_mask"]
    for name, mask in (("enc_mask", enc), ("dec_mask", dec)):
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{where}/model.pt: {name} holds values other than 0 and 1")
    if not torch.equal(enc.T, dec):
        feature = int((enc.T != dec).any(1).nonzero()[0])
        raise ValueError(f"{where}/model.pt: enc_mask and dec_mask disagree at feature {feature}")
    a_only, b_only = (enc[0] == 1) & (enc[1] == 0), (enc[0] == 0) & (enc[1] == 1)
    if (hidden := (enc.sum(0) == 0).nonzero()).numel():
        raise ValueError(f"{where}/model.pt: feature {int(hidden[0])} is masked out of both models")
    n_a, n_b = int(a_only.sum()), int(b_only.sum())
    if not (a_only[:n_a].all() and b_only[n_a:n_a + n_b].all()):
        raise ValueError(f"{where}/model.pt: the masks do not order features as A-exclusive, then B-exclusive, "
                         f"then shared ({n_a} A-only and {n_b} B-only features found elsewhere)")
    for key, found in (("n_a", n_a), ("n_b", n_b)):
        if config.get(key) is not None and config[key] != found:
            raise ValueError(f"{where}: config.json has {key}={config[key]} but the masks give {key}={found}")
    return n_a, n_b


def forbidden_norms(state: dict[str, Tensor], n_a: int, n_b: int) -> dict[str, tuple[int, Tensor]]:
    """Per-feature L2 norms of the weights exclusivity forbids, by block, with the block's first feature:
    an A-exclusive feature's encoder row over B and decoder row into B, and the B-exclusive mirror images."""
    a, b = slice(0, n_a), slice(n_a, n_a + n_b)
    w_enc, w_dec = state["W_enc"], state["W_dec"]
    return {
        "encoder: A-exclusive reading B": (0, w_enc[1, :, a].norm(dim=0)),
        "encoder: B-exclusive reading A": (n_a, w_enc[0, :, b].norm(dim=0)),
        "decoder: A-exclusive writing B": (0, w_dec[a, 1].norm(dim=1)),
        "decoder: B-exclusive writing A": (n_a, w_dec[b, 0].norm(dim=1)),
    }


def check_exclusivity(state: dict[str, Tensor], n_a: int, n_b: int, allow_leaky: bool,
                      where: str) -> dict[str, dict[str, Any]]:
    """What a conversion drops: {block: {features, max_norm, max_feature, total_norm}} for every block with
    a non-zero forbidden weight ({} when exclusivity holds exactly). Raises unless `allow_leaky`.

    The study's decode multiplied W_dec by dec_mask, so dropped decoder weights were never used by it;
    dropped encoder weights were (its encode ignored enc_mask), so they change the codes."""
    dropped = {}
    for block, (first, norms) in forbidden_norms(state, n_a, n_b).items():
        if (norms > 0).any():
            worst = int(norms.argmax())
            dropped[block] = {"features": int((norms > 0).sum()), "max_norm": float(norms[worst]),
                              "max_feature": first + worst, "total_norm": float(norms.norm())}
    if dropped and not allow_leaky:
        block, worst = max(dropped.items(), key=lambda item: item[1]["max_norm"])
        rows = sum(entry["features"] for entry in dropped.values())
        raise ValueError(f"{where}/model.pt: {rows} forbidden weight rows are not zero; the largest is "
                         f"{block} at feature {worst['max_feature']} (norm {worst['max_norm']:.4g}); "
                         f"import with --allow-leaky to drop them and record it")
    return dropped


# ---------------------------------------------------------------- conversion


def convert(state: dict[str, Tensor], config: dict[str, Any], n_a: int, n_b: int) -> DedicatedFeatureCrosscoder:
    """The study's weights as a dfc-ray crosscoder with identity normalization: per-sample TopK on ReLU
    pre-activations without decoder-norm ranking, as the study's encode; forbidden weights left out."""
    d, size = config["activation_dim"], config["dict_size"]
    cfg = DFCConfig(d_model=d, dict_size=size, k=config["k"], a_exclusive=n_a / size, b_exclusive=n_b / size,
                    sparsity="topk", decoder_norm_selection=False, aux_k=0)
    if (cfg.n_a_exclusive, cfg.n_b_exclusive) != (n_a, n_b):
        raise ValueError(f"partition n_a={n_a}, n_b={n_b} of dict_size={size} cannot be expressed as DFCConfig "
                         f"fractions (they give {cfg.n_a_exclusive}, {cfg.n_b_exclusive})")
    cc = DedicatedFeatureCrosscoder(cfg)
    w_enc, w_dec, s = state["W_enc"], state["W_dec"], n_a + n_b
    with torch.no_grad():
        cc.enc_a.copy_(w_enc[0, :, :n_a].T)
        cc.dec_a.copy_(w_dec[:n_a, 0])
        cc.enc_b.copy_(w_enc[1, :, n_a:s].T)
        cc.dec_b.copy_(w_dec[n_a:s, 1])
        cc.enc_s.copy_(w_enc[:, :, s:].permute(2, 0, 1).reshape(size - s, 2 * d))
        cc.dec_s.copy_(w_dec[s:].reshape(size - s, 2 * d))
        cc.b_enc.copy_(state["b_enc"])
        cc.b_dec.copy_(state["b_dec"])
    return cc.eval()


def _norm_from_store(cc: DedicatedFeatureCrosscoder, store_uri: str, layer: int) -> dict[str, Any]:
    """Put a harvest's statistics into `cc`; returns what import.json records about them."""
    stats = load_norm_stats(store_uri, layer)
    if stats.mean.shape[1] != cc.cfg.d_model:
        raise ValueError(f"{redact(store_uri)} layer {layer}: d_model {stats.mean.shape[1]}, but the crosscoder "
                         f"has activation_dim {cc.cfg.d_model}")
    with torch.no_grad():
        cc.norm_mean.copy_(torch.from_numpy(stats.mean).float())
        cc.norm_scale.copy_(torch.from_numpy(stats.scale).float())
    models = list(read_manifest(store_uri, layer).spec.models)
    return {"store": redact(store_uri), "layer": layer, "rows": stats.count, "models": models}


def import_seed(src: str, out: str, *, norm_from: str | None = None, layer: int | None = None,
                allow_leaky: bool = False) -> dict[str, Any]:
    """Convert the study's checkpoint folder `src` into a dfc-ray checkpoint at `out` (a path or s3://);
    returns the import record written to `out/import.json`. Every check runs before anything is written."""
    if (norm_from is None) != (layer is None):
        raise ValueError("--norm-from and --layer go together: the statistics of the harvested layer the "
                         "crosscoder was trained on")
    target = RunFolder(out) if "://" in out else None
    if target is None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{out}: a file, not a folder; expected an empty or new folder for the checkpoint")
    taken = target.read_text("config.json") is not None if target else (Path(out) / "config.json").exists()
    if taken:
        raise ValueError(f"{redact(out)}: already holds a checkpoint (config.json); choose an empty folder")
    where = redact(src)
    config = read_seed_config(src)
    state = read_seed_state(src, config)
    n_a, n_b = partition_from_masks(state, config, where)
    dropped = check_exclusivity(state, n_a, n_b, allow_leaky, where)
    cc = convert(state, config, n_a, n_b)
    norm_record = _norm_from_store(cc, norm_from, layer) if norm_from is not None else None
    record = {
        "format": "seed-study",
        "source": where,
        "study_config": config,
        "partition": {"n_a": n_a, "n_b": n_b, "n_shared": config["dict_size"] - n_a - n_b,
                      "from": "masks" if "enc_mask" in state else "plain crosscoder (no masks)"},
        "normalization": "harvest" if norm_record else "unknown",
        "norm_from": norm_record,
        "dropped": dropped,
    }
    text = json.dumps(record, indent=2) + "\n"
    if target is None:
        # import.json first: a checkpoint interrupted mid-write never passes for a native one.
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / IMPORT_RECORD).write_text(text)
        cc.save(out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / IMPORT_RECORD).write_text(text)
            cc.save(tmp)
            target.upload_dir(Path(tmp))
    return record


# ---------------------------------------------------------------- judging an imported checkpoint


def read_import_record(checkpoint: str) -> dict[str, Any] | None:
    """A checkpoint's import.json (path or s3://), or None for a checkpoint dfc-ray trained itself."""
    fs, root = open_fs(checkpoint)
    if fs.get_file_info(f"{root}/{IMPORT_RECORD}").type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{root}/{IMPORT_RECORD}") as handle:
        try:
            record = json.loads(handle.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{redact(checkpoint)}/{IMPORT_RECORD}: not valid JSON") from None
    if not isinstance(record, dict) or record.get("normalization") not in ("harvest", "unknown"):
        raise ValueError(f"{redact(checkpoint)}/{IMPORT_RECORD}: field 'normalization' should be "
                         f"'harvest' or 'unknown'")
    return record


def require_known_normalization(checkpoint: str, allow_raw: bool) -> Normalization:
    """Where the checkpoint's normalization comes from; refuses an `unknown` one (an import without
    --norm-from) unless the caller explicitly judges it raw in, raw out (`allow_raw`, the study's way)."""
    record = read_import_record(checkpoint)
    if record is None:
        return "trained"
    if record["normalization"] == "unknown" and not allow_raw:
        raise ValueError(f"{redact(checkpoint)}: normalization unknown (imported without --norm-from); "
                         f"re-import with --norm-from STORE --layer L, or judge it raw in/raw out explicitly (the "
                         f"protocol switch normalization: none: --protocol seed or --switch normalization=none on "
                         f"the command line, eval.protocol in a spec)")
    return record["normalization"]
