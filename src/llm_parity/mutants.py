"""Deliberately broken copies of a checkpoint, the way real ports go wrong.

Each mutant is a function that edits a copied checkpoint directory in place (config.json
or the safetensors weights). They prove the suite's detection power: a correct suite must
fail every broken mutant and pass every benign one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

Mutant = Callable[[Path], None]


def _edit_config(path: Path, **changes) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=2))


def _edit_weights(path: Path, edit: Callable[[dict], dict]) -> None:
    import torch  # noqa: F401  (safetensors.torch needs it)
    from safetensors.torch import load, save

    weights_path = path / "model.safetensors"
    # Read into memory, not a memory map: the same file is rewritten below.
    tensors = edit(load(weights_path.read_bytes()))
    weights_path.write_bytes(save(tensors, metadata={"format": "pt"}))


def _layer_names(tensors: dict, layer: int) -> list[str]:
    return [k for k in tensors if f".layers.{layer}." in k]


def rope_theta(path: Path) -> None:
    """Positional encoding configured wrong: RoPE base 10x off."""
    config = json.loads((path / "config.json").read_text())
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    changes = {"rope_theta": float(theta) * 10}
    if "rope_parameters" in config:
        changes["rope_parameters"] = {**config["rope_parameters"], "rope_theta": float(theta) * 10}
    _edit_config(path, **changes)


def layer_noise(path: Path, layer: int = 1, scale: float = 0.5, seed: int = 0) -> None:
    """One layer's matrices perturbed by noise at half their spread (a bad shard conversion)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def edit(tensors):
        for name in _layer_names(tensors, layer):
            t = tensors[name]
            if t.ndim == 2:
                noise = torch.randn(t.shape, generator=generator) * scale * t.float().std()
                tensors[name] = (t.float() + noise).to(t.dtype)
        return tensors

    _edit_weights(path, edit)


def nan_weights(path: Path) -> None:
    """Non-finite numbers in the final norm: every logit becomes NaN."""

    def edit(tensors):
        name = next(k for k in tensors if k.endswith("norm.weight") and ".layers." not in k)
        tensors[name] = tensors[name].clone()
        tensors[name][0] = float("nan")
        return tensors

    _edit_weights(path, edit)


MUTANTS: dict[str, Mutant] = {
    "rope_theta": rope_theta,
    "layer_noise": layer_noise,
    "nan_weights": nan_weights,
}


def make_mutant(source: Path, dest: Path, kind: str) -> Path:
    """Copy `source` to `dest` and break it as `kind` says."""
    if kind not in MUTANTS:
        raise ValueError(f"unknown mutant {kind!r}; expected one of: {', '.join(MUTANTS)}")
    shutil.copytree(source, dest)
    MUTANTS[kind](dest)
    return dest
