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
from typing import Any

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


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _rope_theta(config: dict) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                 or 10000.0)


def _set_rope(path: Path, **parameters) -> None:
    """Write RoPE settings where both transformers generations read them (4.x rope_scaling
    and rope_theta, 5.x rope_parameters)."""
    config = _config(path)
    theta = parameters.pop("rope_theta", _rope_theta(config))
    changes: dict = {"rope_theta": theta}
    rope = {"rope_theta": theta, "rope_type": "default", **parameters}
    if "rope_parameters" in config or parameters:
        changes["rope_parameters"] = rope
    if parameters:
        changes["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    _edit_config(path, **changes)


def rope_theta(path: Path) -> None:
    """Positional encoding configured wrong: RoPE base 10x off."""
    _set_rope(path, rope_theta=_rope_theta(_config(path)) * 10)


def rope_yarn(path: Path) -> None:
    """A long-context RoPE scaling (YaRN, factor 4 over 512 positions) the model never had:
    the low-frequency dimensions move, which matters most far into a long context."""
    _set_rope(path, rope_type="yarn", factor=4.0, original_max_position_embeddings=512)


def rope_llama3(path: Path) -> None:
    """Llama-3.1-style RoPE frequency scaling (factor 8, 2048-token original context) copied
    into a model trained without it: only the slowest rotary dimensions move, so short
    prompts barely change and long contexts drift."""
    _set_rope(path, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=2048)


def _heads(tensor, heads: int):
    return tensor.reshape(heads, tensor.shape[0] // heads, *tensor.shape[1:])


def rotary_layout(path: Path) -> None:
    """q and k rows in the interleaved rotary layout while the engine expects the split
    halves (the permutation a Meta-to-HF conversion applies, applied twice)."""
    config = _config(path)

    def permute(t, heads):
        dim = t.shape[0] // heads
        return (t.reshape(heads, 2, dim // 2, -1).transpose(1, 2).reshape(t.shape))

    def edit(tensors):
        for name in list(tensors):
            if name.endswith("q_proj.weight"):
                tensors[name] = permute(tensors[name], config["num_attention_heads"]).contiguous()
            elif name.endswith("k_proj.weight"):
                tensors[name] = permute(tensors[name], config["num_key_value_heads"]).contiguous()
        return tensors

    _edit_weights(path, edit)


def kv_head_order(path: Path) -> None:
    """Grouped-query attention regrouped: the KV heads in reverse order, so each group of
    query heads attends with another group's keys and values (a sharding/reshape bug)."""
    config = _config(path)
    kv = config["num_key_value_heads"]

    def edit(tensors):
        for name in list(tensors):
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                heads = _heads(tensors[name], kv)
                tensors[name] = heads.flip(0).reshape(tensors[name].shape).contiguous()
        return tensors

    _edit_weights(path, edit)


def layer_dropped(path: Path) -> None:
    """The last decoder layer lost in conversion (num_hidden_layers one short)."""
    last = _config(path)["num_hidden_layers"] - 1

    def edit(tensors):
        for name in _layer_names(tensors, last):
            del tensors[name]
        return tensors

    _edit_weights(path, edit)
    _edit_config(path, num_hidden_layers=last)


def layer_duplicated(path: Path, layer: int = 1) -> None:
    """One layer's weights written over the next one's (an off-by-one in a shard index)."""

    def edit(tensors):
        for name in _layer_names(tensors, layer):
            tensors[name.replace(f".layers.{layer}.", f".layers.{layer + 1}.")] = tensors[name].clone()
        return tensors

    _edit_weights(path, edit)


def gate_up_swapped(path: Path) -> None:
    """The MLP's gate and up projections swapped, as a converter that splits a fused
    gate_up matrix in the wrong order does: silu(up) * gate instead of silu(gate) * up."""

    def edit(tensors):
        for name in list(tensors):
            if name.endswith("mlp.gate_proj.weight"):
                up = name.replace("gate_proj", "up_proj")
                tensors[name], tensors[up] = tensors[up], tensors[name]
        return tensors

    _edit_weights(path, edit)


def kv_head_zeroed(path: Path, layer: int = 2) -> None:
    """One KV head's value projection zeroed in one layer, as a tensor-parallel shard that
    was never loaded leaves it: a quarter of one layer's attention output lost."""
    kv = _config(path)["num_key_value_heads"]

    def edit(tensors):
        name = f"model.layers.{layer}.self_attn.v_proj.weight"
        heads = _heads(tensors[name].clone(), kv)
        heads[-1] = 0
        tensors[name] = heads.reshape(tensors[name].shape).contiguous()
        return tensors

    _edit_weights(path, edit)


def norm_offset(path: Path) -> None:
    """RMSNorm weights stored as w - 1 for an engine that multiplies by (1 + w), loaded by
    one that multiplies by w (the Gemma convention on a Llama checkpoint)."""

    def edit(tensors):
        for name in list(tensors):
            if name.endswith("norm.weight"):
                tensors[name] = (tensors[name].float() - 1.0).to(tensors[name].dtype)
        return tensors

    _edit_weights(path, edit)


def norm_epsilon(path: Path) -> None:
    """RMSNorm epsilon 1e-3 instead of the model's 1e-5 (a default taken from elsewhere)."""
    _edit_config(path, rms_norm_eps=1e-3)


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


def weight_noise(path: Path) -> None:
    """One layer's matrices off by noise at a tenth of their spread (a lossy conversion of
    one shard, at quantization scale): small enough that the first token barely moves."""
    layer_noise(path, layer=1, scale=0.1)


def _quantize(t, bits: int):
    """Symmetric per-output-channel round-to-nearest, dequantized back to t's dtype."""
    levels = 2 ** (bits - 1) - 1
    w = t.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
    return ((w / scale).round().clamp(-levels, levels) * scale).to(t.dtype)


def quantized_int4(path: Path) -> None:
    """Every linear weight through 4-bit per-channel round-to-nearest (a quantized port
    passed off as the bf16 model: error far above bf16 rounding)."""

    def edit(tensors):
        for name in list(tensors):
            if ".layers." in name and tensors[name].ndim == 2:
                tensors[name] = _quantize(tensors[name], 4)
        return tensors

    _edit_weights(path, edit)


def untied_head_scaled(path: Path, scale: float = 1.05) -> None:
    """Tied embeddings untied with the output head 5% too large (an embedding scale such as
    Gemma's sqrt(hidden) applied on the wrong side): every top-1 token stays the same, only
    the distribution's sharpness moves."""

    def edit(tensors):
        embed = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = (embed.float() * scale).to(embed.dtype)
        return tensors

    _edit_weights(path, edit)
    _edit_config(path, tie_word_embeddings=False)


def nan_weights(path: Path) -> None:
    """Non-finite numbers in the final norm: every logit becomes NaN."""

    def edit(tensors):
        name = next(k for k in tensors if k.endswith("norm.weight") and ".layers." not in k)
        tensors[name] = tensors[name].clone()
        tensors[name][0] = float("nan")
        return tensors

    _edit_weights(path, edit)


# ------------------------------------------------- broken at one known place (localization)


def head_swapped(path: Path, layer: int = 0) -> None:
    """Two query heads of one layer swapped (a head permutation lost in a conversion): each
    head's output reaches the output projection in the other's columns."""
    config = _config(path)
    heads = config["num_attention_heads"]

    def edit(tensors):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        split = _heads(tensors[name].clone(), heads)
        split[[0, 1]] = split[[1, 0]]
        tensors[name] = split.reshape(tensors[name].shape).contiguous()
        return tensors

    _edit_weights(path, edit)


def gate_up_swapped_middle(path: Path) -> None:
    """Gate and up projections swapped in the middle layer only (one shard of a fused
    gate_up matrix split in the wrong order)."""
    middle = _config(path)["num_hidden_layers"] // 2

    def edit(tensors):
        gate = f"model.layers.{middle}.mlp.gate_proj.weight"
        up = gate.replace("gate_proj", "up_proj")
        tensors[gate], tensors[up] = tensors[up], tensors[gate]
        return tensors

    _edit_weights(path, edit)


def norm_last(path: Path, scale: float = 1.5) -> None:
    """The last layer's post-attention norm weight 1.5x what it should be (a norm scale
    folded twice in one layer)."""
    last = _config(path)["num_hidden_layers"] - 1

    def edit(tensors):
        name = f"model.layers.{last}.post_attention_layernorm.weight"
        tensors[name] = (tensors[name].float() * scale).to(tensors[name].dtype)
        return tensors

    _edit_weights(path, edit)


def projection_noise(path: Path, layer: int = 1, scale: float = 0.5, seed: int = 0) -> None:
    """Noise at half its spread on one projection: layer 1's value projection."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def edit(tensors):
        name = f"model.layers.{layer}.self_attn.v_proj.weight"
        t = tensors[name]
        noise = torch.randn(t.shape, generator=generator) * scale * t.float().std()
        tensors[name] = (t.float() + noise).to(t.dtype)
        return tensors

    _edit_weights(path, edit)


def attention_scale(path: Path, scale: float = 1.5) -> None:
    """Attention logits 1.5x too sharp in every layer (a softmax scale of 1.5/sqrt(d)
    instead of 1/sqrt(d), carried in the query projections)."""

    def edit(tensors):
        for name in list(tensors):
            if name.endswith("q_proj.weight"):
                tensors[name] = (tensors[name].float() * scale).to(tensors[name].dtype)
        return tensors

    _edit_weights(path, edit)


# ---------------------------------------------------------------- benign changes


def resaved(path: Path) -> None:
    """Loaded by Transformers and saved again (tensor order, metadata and the tied head as
    Transformers writes them): the numbers are the same, the suite must pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_parity.engines._torch import transformers_dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(
        path, **{transformers_dtype_kwarg(): torch.bfloat16})
    for stale in path.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(path, safe_serialization=True)


def bf16_rerounded(path: Path, seed: int = 0) -> None:
    """Every weight moved by up to one bf16 rounding step, as a round trip through float32
    with another rounding mode gives: the suite must not cry wolf."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def edit(tensors):
        for name in list(tensors):
            t = tensors[name]
            if t.dtype == torch.bfloat16:
                w = t.float()
                # up to one bf16 step (8 significant bits) either way, then round to nearest:
                # about half the weights land on a neighbouring bf16 value
                jitter = (torch.rand(w.shape, generator=generator) - 0.5) * w.abs() * 2.0 ** -7
                tensors[name] = (w + jitter).to(torch.bfloat16)
        return tensors

    _edit_weights(path, edit)


# name -> (mutant, broken?): broken ones the suite must fail, benign ones it must pass.
CATALOGUE: dict[str, tuple[Mutant, bool]] = {
    "rope_theta": (rope_theta, True),
    "rope_yarn": (rope_yarn, True),
    "rope_llama3": (rope_llama3, True),
    "rotary_layout": (rotary_layout, True),
    "kv_head_order": (kv_head_order, True),
    "layer_dropped": (layer_dropped, True),
    "layer_duplicated": (layer_duplicated, True),
    "gate_up_swapped": (gate_up_swapped, True),
    "kv_head_zeroed": (kv_head_zeroed, True),
    "norm_offset": (norm_offset, True),
    "norm_epsilon": (norm_epsilon, True),
    "weight_noise": (weight_noise, True),
    "layer_noise": (layer_noise, True),
    "quantized_int4": (quantized_int4, True),
    "untied_head_scaled": (untied_head_scaled, True),
    "head_swapped": (head_swapped, True),
    "gate_up_swapped_middle": (gate_up_swapped_middle, True),
    "norm_last": (norm_last, True),
    "projection_noise": (projection_noise, True),
    "attention_scale": (attention_scale, True),
    "resaved": (resaved, False),
    "bf16_rerounded": (bf16_rerounded, False),
}
MUTANTS: dict[str, Mutant] = {**{name: m for name, (m, _) in CATALOGUE.items()},
                              "nan_weights": nan_weights}
BROKEN = tuple(name for name, (_, broken) in CATALOGUE.items() if broken)
BENIGN = tuple(name for name, (_, broken) in CATALOGUE.items() if not broken)


# Where localization must find each mutant: (layer, module). The layer is an index,
# "middle" (num_hidden_layers // 2), "last", or "any"; None for the embedding, the final norm or
# the output head; the module is a capture point (compare/localize.py) or "head", or None
# where any sub-module of that layer may be the first to read the change. A mutant whose
# damage is global (every layer, or the positions) points at layer 0. Benign ones: nothing.
LOCATIONS: dict[str, tuple[int | str | None, str | None]] = {
    "rope_theta": (0, "attn"),
    "rope_yarn": (0, "attn"),
    # Only the slowest rotary dimensions move: it shows in the attention of the first layer
    # that leans on them (layer 1 of the toy model), whichever that is.
    "rope_llama3": ("any", "attn"),
    "rotary_layout": (0, "attn"),
    "kv_head_order": (0, "attn"),
    "layer_dropped": ("last", "missing"),
    "layer_duplicated": (2, None),
    "gate_up_swapped": (0, "mlp"),
    "kv_head_zeroed": (2, "attn"),
    "norm_offset": (0, "input_norm"),
    "norm_epsilon": (0, "input_norm"),
    "weight_noise": (1, "attn"),
    "layer_noise": (1, "attn"),
    "quantized_int4": (0, "attn"),
    "untied_head_scaled": (None, "head"),
    "head_swapped": (0, "attn"),
    "gate_up_swapped_middle": ("middle", "mlp"),
    "norm_last": ("last", "post_attn_norm"),
    "projection_noise": (1, "attn"),
    "attention_scale": (0, "attn"),
}


def expected_location(kind: str, config: dict) -> tuple[int | None, str | None] | None:
    """(layer, module) localization must name for mutant `kind` of a model with `config`
    (its unbroken config.json), or None for a benign change."""
    if kind not in LOCATIONS:
        return None
    layer, module = LOCATIONS[kind]
    layers = config["num_hidden_layers"]
    named = {"last": layers - 1, "middle": layers // 2, "any": None}  # any: this module
    return (named[layer] if isinstance(layer, str) else layer), module


def location_matches(expected: tuple[int | None, str | None] | None, found: Any) -> bool:
    """Whether a Localization (compare/localize.py) names where `expected_location` says;
    a benign change (None) must name nothing."""
    if expected is None:
        return not found.diverged
    layer, module = expected
    if module == "head" or layer is not None:
        if found.layer != layer:
            return False
    elif found.layer is None:  # "any" layer: a layer must be named
        return False
    return module is None or found.module == module


def make_mutant(source: Path, dest: Path, kind: str) -> Path:
    """Copy `source` to `dest` and break it as `kind` says."""
    if kind not in MUTANTS:
        raise ValueError(f"unknown mutant {kind!r}; expected one of: {', '.join(MUTANTS)}")
    shutil.copytree(source, dest)
    MUTANTS[kind](dest)
    return dest


# The founding report's four gates: each prompt's first token, absolute bounds.
FOUNDING_GATES = ("top1_match_rate", "cosine_mean", "kl_mean", "spearman_mean")


def detection(verdict: dict) -> dict:
    """What caught a candidate, read from its JSON verdict: the founding protocol's four
    gates alone, and the whole suite (every gate, per-prompt gates included)."""
    failed_gates = [g["name"] for g in verdict.get("gates", []) if not g["passed"]]
    failed_prompt_gates = sorted({
        f"{view}:{g['name']}"
        for view in ("prompts", "sequences", "decodes")
        for entry in verdict.get(view, [])
        for g in entry.get("gates", []) if not g["passed"]
    })
    founding_failed = [name for name in failed_gates if name in FOUNDING_GATES]
    first_flips = [p for p in verdict.get("prompts", []) if not p.get("top1_match", True)]
    return {
        "verdict": verdict["verdict"],
        "founding_caught": verdict["verdict"] == "error" or bool(founding_failed),
        # The founding gates failed only through top-1 flips at near-ties: a flip bf16
        # rounding alone can cause, so the same gate fails correct ports now and then.
        "founding_near_ties_only": founding_failed == ["top1_match_rate"]
        and all(p.get("near_tie") for p in first_flips),
        "suite_caught": verdict["verdict"] != "pass",
        "failed_gates": failed_gates,
        "failed_prompt_gates": failed_prompt_gates,
        "error": verdict.get("error"),
    }
