"""Where a checkpoint comes from, and what it is (card, parameter count, hash).

`--model` is a local directory or a hub id. A hub id is looked up in the ModelScope cache
first, then the HuggingFace cache, and only then downloaded (ModelScope first), unless the
environment says offline. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_parity.config.checkpoint import (
    check_checkpoint_dir,
    is_local_reference,
    weight_files,
)
from llm_parity.errors import ModelError
from llm_parity.families import family_for, text_config

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE", "LLM_PARITY_OFFLINE")

@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as the user gave it
    path: Path  # a local checkpoint directory
    source: str  # embedded, local, modelscope-cache, hf-cache, modelscope, huggingface


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def resolve_model(name: str | None, label: str = "--model") -> ResolvedModel:
    """Turn what the user named into a checkpoint directory on this machine."""
    if not name:
        from llm_parity.runner.toymodel import toy_model_dir

        return ResolvedModel("llm-parity/toy", toy_model_dir(), "embedded")
    if is_local_reference(name):
        path = Path(name).expanduser().resolve()
        check_checkpoint_dir(path, label)
        return ResolvedModel(name, path, "local")
    tried = []
    for source, finder in (("modelscope-cache", _modelscope_cache), ("hf-cache", _hf_cache)):
        path = finder(name)
        if path is not None:
            check_checkpoint_dir(path, f"{label} {name} ({source})")
            return ResolvedModel(name, path, source)
        tried.append(source)
    if offline():
        raise ModelError(
            f"{label}: {name} is not in the ModelScope cache ({_modelscope_root()}) nor the "
            f"HuggingFace cache ({_hf_root()}), and downloads are off (offline environment)"
        )
    errors = []
    for source, fetch in (("modelscope", _modelscope_download), ("huggingface", _hf_download)):
        try:
            path = fetch(name)
        except Exception as exc:  # every hub failure is reported together below
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        if path is not None:
            check_checkpoint_dir(path, f"{label} {name} ({source})")
            return ResolvedModel(name, path, source)
        errors.append(f"{source}: client not installed")
    raise ModelError(
        f"{label}: cannot find {name}: not a local directory, not in the ModelScope or "
        f"HuggingFace caches, and not downloadable ({'; '.join(errors)})"
    )


def _modelscope_root() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))


def _modelscope_cache(name: str) -> Path | None:
    org, model = name.split("/")
    root = _modelscope_root()
    # Newer ModelScope releases store models/<org>/<name> with dots escaped as ___.
    for candidate in (
        root / "models" / org / model.replace(".", "___"),
        root / "models" / org / model,
        root / org / model.replace(".", "___"),
        root / org / model,
    ):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _hf_root() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _hf_cache(name: str) -> Path | None:
    repo = _hf_root() / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    if not snapshots.is_dir():
        return None
    # No usable refs/main: ask huggingface_hub, which knows which snapshot is current,
    # rather than guess from modification times.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not installed, or it cannot tell offline
        pass
    found = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise ModelError(
            f"--model {name}: the HuggingFace cache {repo} holds {len(found)} snapshots "
            f"({', '.join(sorted(s.name[:12] for s in found))}) and no refs/main to say which "
            "is current; pass the snapshot directory itself as --model")
    return None


def _modelscope_download(name: str) -> Path | None:
    try:
        from modelscope import snapshot_download
    except ImportError:
        return None
    return Path(snapshot_download(name))


def _hf_download(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    return Path(snapshot_download(name))


# ---------------------------------------------------------------- what a checkpoint is


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def checkpoint_card(path: Path) -> dict[str, Any]:
    """Architecture and size facts, read from config.json and safetensors headers only."""
    outer = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = text_config(outer)  # a multimodal config nests the language model's
    files = weight_files(path)
    card: dict[str, Any] = {
        "architecture": (outer.get("architectures") or [outer.get("model_type", "?")])[0],
        "model_type": config.get("model_type"),
        "family": family_for(config.get("model_type")).name,
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "attention_heads": config.get("num_attention_heads"),
        "kv_heads": config.get("num_key_value_heads"),
        "vocab_size": config.get("vocab_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "rope_theta": config.get("rope_theta")
        or (config.get("rope_parameters") or {}).get("rope_theta"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "weight_dtype": config.get("torch_dtype") or config.get("dtype"),
        "weight_files": [p.name for p in files],
        "weight_bytes": sum(p.stat().st_size for p in files),
        "parameters": None,
        "tensors": None,
    }
    if files and all(p.suffix == ".safetensors" for p in files):
        params = tensors = 0
        for p in files:
            for key, info in safetensors_header(p).items():
                if key == "__metadata__":
                    continue
                tensors += 1
                count = 1
                for dim in info["shape"]:
                    count *= dim
                params += count
        card["parameters"], card["tensors"] = params, tensors
    return card


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json and every weight file, in name order."""
    digest = hashlib.sha256()
    for p in [path / "config.json", *weight_files(path)]:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
