"""Llama, and the families laid out like it.

A decoder layer is an RMSNorm, attention ending in `o_proj`, a second RMSNorm and a gated
MLP ending in `down_proj`, with the same attribute names in Transformers and vLLM. Mistral,
Qwen2 and SmolLM2 (a Llama) share the layout; a model type no other adapter names is read
this way too.
"""

from __future__ import annotations

from llm_parity.families import LLAMA_POINTS, Family

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "granite", "olmo2"),
    points=LLAMA_POINTS,
    description="Llama layout: input norm, attention, post-attention norm, MLP",
)

FAMILIES = {"llama": LLAMA}
