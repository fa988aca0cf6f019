"""Architecture families: what a family's decoder layers are called, and how its layer
outputs are put in one canonical form, found by the checkpoint's `model_type`.

Everything the suite compares at the output (log-probs) is the same for every family. What
differs is inside: a Gemma 3 layer has four norms around its two blocks, a Qwen3 attention
normalises its queries and keys per head, a Mixture-of-Experts block has a router, a
DeepSeek-V2 attention compresses keys and values into a latent that the cache holds. Layer
capture (engines/capture.py) and localization (compare/localize.py) read those facts from
the family adapter, one module per family in this package:

    llama        Llama, and the families laid out the same (Mistral, Qwen2)
    qwen3        Qwen3 dense and Qwen3-MoE (qk-norm; routed experts)
    gemma3       Gemma 3 (sandwich norms, scaled embedding, sliding-window layers)
    deepseek_v2  DeepSeek-V2 and V3 (multi-head latent attention; shared and routed experts)

A family is registered by name with the module that defines it (`register` adds one at run
time, as engines/base.py does for backends); `family_for` picks it by `model_type`, and a
model type no adapter names is read as Llama-style, which is what most decoder-only
checkpoints are. Importing this package imports no adapter: each is loaded when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Every point a decoder layer can have, in the order a token's hidden state passes them, with
# the name a report gives it. A family has a subset; the order is the same for all, so a
# comparison sorts any family's points with this one list.
SUBMODULES: dict[str, str] = {
    "input_norm": "input norm",
    "q_a_norm": "query latent norm",  # MLA: the compressed query, normalised
    "kv_a_norm": "key-value latent norm",  # MLA: the compressed keys and values (cached)
    "q_norm": "query norm",  # qk-norm: per head, before the rotary embedding
    "k_norm": "key norm",
    "attn": "attention",
    "post_attn_norm": "post-attention norm",
    "pre_mlp_norm": "pre-MLP norm",  # Gemma's second norm of the sandwich
    "router": "MoE router",  # the gate's logits over the experts
    "shared_experts": "shared experts",
    "mlp": "MLP",  # the whole block: a dense MLP or the experts' weighted sum
    "post_mlp_norm": "post-MLP norm",
}


@dataclass(frozen=True)
class Family:
    """One architecture family's layer layout.

    `points` maps each sub-module point the family has to the attribute paths that reach it
    from a decoder layer, in Transformers and in vLLM (the first path that exists is hooked:
    the two name a few modules differently). The embedding, each layer's output and the
    final norm are the same for every family and need no names.
    """

    name: str
    model_types: tuple[str, ...]
    points: Mapping[str, tuple[str, ...]]
    description: str = ""

    def __post_init__(self) -> None:
        unknown = [p for p in self.points if p not in SUBMODULES]
        if unknown:
            raise ValueError(f"family {self.name}: unknown points {unknown}; "
                             f"expected some of {', '.join(SUBMODULES)}")


LLAMA_POINTS = {
    "input_norm": ("input_layernorm",),
    "attn": ("self_attn",),
    "post_attn_norm": ("post_attention_layernorm",),
    "mlp": ("mlp",),
}

_BUILTIN = {
    "llama": "llm_parity.families.llama",
    "qwen3": "llm_parity.families.qwen3",
    "qwen3_moe": "llm_parity.families.qwen3",
    "gemma3": "llm_parity.families.gemma3",
    "deepseek_v2": "llm_parity.families.deepseek_v2",
}
_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> None:
    """Add (or replace) a family at run time, for a model type the package does not know."""
    _REGISTERED[family.name] = family


def family(name: str) -> Family:
    """The family registered under `name` (an adapter module's FAMILIES)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    try:
        module = importlib.import_module(_BUILTIN[name])
    except KeyError:
        raise KeyError(f"unknown family {name!r}; expected one of: "
                       f"{', '.join(names())}") from None
    return module.FAMILIES[name]


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_BUILTIN, *_REGISTERED]))


def family_for(model_type: str | None) -> Family:
    """The family whose adapter names `model_type`; Llama's layout for one none names."""
    for name in names():
        found = family(name)
        if model_type in found.model_types:
            return found
    return family("llama")


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's settings of a config.json: a multimodal checkpoint (Gemma 3's
    image-text one, for example) nests them under `text_config`; its own top-level keys
    fill what the nested one lacks."""
    nested = config.get("text_config")
    if not isinstance(nested, Mapping):
        return dict(config)
    return {**{k: v for k, v in config.items() if k != "text_config"}, **nested}
