"""Broken ports the way they go wrong in the families Llama does not cover.

Each family has its own bugs: Qwen3's qk-norm weights loaded from another layer, experts
of a Mixture-of-Experts layer reordered against their router, top-k weights not
renormalised, DeepSeek's multi-head latent attention given its rotary slice from the wrong
end of the compressed projection, Gemma's (1 + w) norms written as 1 + w for an engine that
adds the one again, its local layers' RoPE base taken from the global layers. Each mutant
edits a copied checkpoint (config.json or the weights) the way a converter or a loader
would, and says where localization must find it (`mutants.LOCATIONS`' form).
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_parity.testing.mutants import _config, _edit_config, _edit_weights

# ------------------------------------------------------------------------------- Qwen3


def qk_norm_from_other_layer(path: Path, layer: int = 1) -> None:
    """Layer 1's query- and key-norm weights are layer 2's (a loader that indexes the
    per-layer norms off by one): the projections are right, each head's scale is not."""

    def edit(tensors):
        for which in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{which}.weight"
            tensors[name] = tensors[name.replace(f".{layer}.", f".{layer + 1}.")].clone()
        return tensors

    _edit_weights(path, edit)


def qk_norm_lost(path: Path) -> None:
    """The query and key norms not loaded (an engine model class written for Qwen2, which
    has none): every layer's weights left at one."""

    def edit(tensors):
        for name in list(tensors):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                tensors[name] = tensors[name].clone().fill_(1.0)
        return tensors

    _edit_weights(path, edit)


# ------------------------------------------------------------------- Mixture of Experts


def experts_permuted(path: Path, layer: int = 1) -> None:
    """One MoE layer's experts stored in reverse order while its router is not (expert
    shards concatenated in the wrong order): each token reaches other experts than its
    router chose."""

    def edit(tensors):
        prefix = f"model.layers.{layer}.mlp.experts."
        names = [n for n in tensors if n.startswith(prefix)]
        experts = 1 + max(int(n[len(prefix):].split(".", 1)[0]) for n in names)
        old = {n: tensors[n] for n in names}
        for name in names:
            index, rest = name[len(prefix):].split(".", 1)
            tensors[name] = old[f"{prefix}{experts - 1 - int(index)}.{rest}"]
        return tensors

    _edit_weights(path, edit)


def topk_not_renormalised(path: Path) -> None:
    """The chosen experts' weights used as the softmax left them, not renormalised to sum
    to one (`norm_topk_prob` lost in a config conversion)."""
    _edit_config(path, norm_topk_prob=False)


def router_from_other_layer(path: Path, layer: int = 2) -> None:
    """Layer 2's router is layer 1's (a per-layer gate indexed off by one): the experts are
    right, the tokens are sent to the wrong ones."""

    def edit(tensors):
        name = f"model.layers.{layer}.mlp.gate.weight"
        tensors[name] = tensors[name.replace(f".{layer}.", f".{layer - 1}.")].clone()
        return tensors

    _edit_weights(path, edit)


# -------------------------------------------------------------------------- DeepSeek MLA


def mla_rope_side(path: Path) -> None:
    """The compressed key-value projection's rotary slice moved from the end to the front
    (a converter that reads the split as [rope, latent] instead of [latent, rope]): the
    cached latent and the rotary key are both wrong from the first layer on."""
    rope = int(_config(path)["qk_rope_head_dim"])

    def edit(tensors):
        import torch

        for name in list(tensors):
            if name.endswith("kv_a_proj_with_mqa.weight"):
                w = tensors[name]
                tensors[name] = torch.cat([w[-rope:], w[:-rope]]).contiguous()
        return tensors

    _edit_weights(path, edit)


def shared_experts_lost(path: Path, layer: int = 2) -> None:
    """One layer's shared expert not loaded (left at zero): only the routed experts
    contribute there."""

    def edit(tensors):
        for name in list(tensors):
            if f".layers.{layer}.mlp.shared_experts." in name:
                tensors[name] = tensors[name].clone().zero_()
        return tensors

    _edit_weights(path, edit)


def routed_scaling(path: Path) -> None:
    """The routed experts' output scaled by 2.5 (`routed_scaling_factor` taken from a larger
    DeepSeek model's config)."""
    _edit_config(path, routed_scaling_factor=2.5)


# ----------------------------------------------------------------------------- Gemma 3


def norm_plus_one(path: Path) -> None:
    """Every Gemma RMSNorm weight stored as 1 + w for an engine that adds the one itself
    (the (1 + w) convention applied twice): each norm scales by 2 + w."""

    def edit(tensors):
        for name in list(tensors):
            if name.endswith("norm.weight"):
                tensors[name] = (tensors[name].float() + 1.0).to(tensors[name].dtype)
        return tensors

    _edit_weights(path, edit)


def local_rope_base(path: Path) -> None:
    """The local (sliding-window) layers' RoPE base taken from the global layers' (one
    rope_theta for all layers, as a converter that knows only one): the local layers'
    positions rotate 100x slower."""
    config = _config(path)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "sliding_attention" in rope:
        rope = json.loads(json.dumps(rope))
        rope["sliding_attention"]["rope_theta"] = rope["full_attention"]["rope_theta"]
        _edit_config(path, rope_parameters=rope)
    global_theta = (config.get("rope_theta")
                    or (rope or {}).get("full_attention", {}).get("rope_theta"))
    _edit_config(path, rope_local_base_freq=global_theta)


def sliding_window_narrowed(path: Path) -> None:
    """The local layers' window read as 16 tokens instead of the model's (a window given
    in the wrong unit): local attention sees a fraction of what it was trained on."""
    _edit_config(path, sliding_window=16)


# (mutant, broken, where localization must find it: (layer, module) as in mutants.LOCATIONS)
FAMILY_CATALOGUE: dict[str, dict[str, tuple]] = {
    "qwen3": {
        "qk_norm_from_other_layer": (qk_norm_from_other_layer, True, (1, "q_norm")),
        "qk_norm_lost": (qk_norm_lost, True, (0, "q_norm")),
    },
    "qwen3_moe": {
        "experts_permuted": (experts_permuted, True, (1, "mlp")),
        "topk_not_renormalised": (topk_not_renormalised, True, (0, "mlp")),
        "router_from_other_layer": (router_from_other_layer, True, (2, "router")),
    },
    "deepseek_v2": {
        "mla_rope_side": (mla_rope_side, True, (0, "kv_a_norm")),
        "shared_experts_lost": (shared_experts_lost, True, (2, "shared_experts")),
        "routed_scaling": (routed_scaling, True, (1, "mlp")),
    },
    "gemma3": {
        "norm_plus_one": (norm_plus_one, True, (0, "input_norm")),
        "local_rope_base": (local_rope_base, True, (0, "attn")),
        "sliding_window_narrowed": (sliding_window_narrowed, True, (0, "attn")),
    },
}


def family_mutant(source: Path, dest: Path, family: str, kind: str) -> Path:
    """Copy `source` to `dest` and break it as the family's mutant `kind` says."""
    import shutil

    catalogue = FAMILY_CATALOGUE.get(family)
    if catalogue is None or kind not in catalogue:
        known = ", ".join(catalogue or ())
        raise ValueError(f"unknown {family} mutant {kind!r}; expected one of: {known}")
    shutil.copytree(source, dest)
    catalogue[kind][0](dest)
    return dest
