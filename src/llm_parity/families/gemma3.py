"""Gemma 3 (text).

A Gemma 3 layer wraps each block in two norms (a "sandwich"): `input_layernorm` before the
attention and `post_attention_layernorm` on its output, `pre_feedforward_layernorm`
before the MLP and `post_feedforward_layernorm` on its output, each an RMSNorm that scales
by (1 + w), not w; the attention normalises queries and keys per head (`q_norm`,
`k_norm`); five local layers with a sliding window and their own RoPE base come between
global ones. Every norm is a point, so a lost (1 + w) convention is named at the first
norm it breaks.

The embedding is multiplied by sqrt(hidden_size): Transformers inside the embedding module
(`Gemma3TextScaledWordEmbedding`), vLLM after it (`Gemma3Model.embed_input_ids`, by its
`normalizer` in the model's dtype). The capture's `embed` is the stream entering the first
layer, so it is the scaled embedding in both, and a port that drops the scale shows there.
"""

from __future__ import annotations

from llm_parity.families import Family

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3", "gemma3_text"),
    points={
        "input_norm": ("input_layernorm",),
        "q_norm": ("self_attn.q_norm",),
        "k_norm": ("self_attn.k_norm",),
        "attn": ("self_attn",),
        "post_attn_norm": ("post_attention_layernorm",),
        "pre_mlp_norm": ("pre_feedforward_layernorm",),
        "mlp": ("mlp",),
        "post_mlp_norm": ("post_feedforward_layernorm",),
    },
    description="Gemma 3: sandwich (1 + w) norms, qk-norm, scaled embedding, local layers",
)

FAMILIES = {"gemma3": GEMMA3}
