"""Qwen3, dense and Mixture-of-Experts.

Qwen3's attention normalises each head's queries and keys (an RMSNorm over the head
dimension, `q_norm` and `k_norm`) before the rotary embedding: a port that loses them, or
loads another layer's, is wrong from the first layer on while its projections are right.
The norms are points of their own, so localization names them rather than the attention
around them.

Qwen3-MoE replaces the MLP with a sparse block: a router (`mlp.gate`, logits over the
experts) picks the top-k experts for each token, whose weights are renormalised to sum to
one when `norm_topk_prob` is set. The router's logits are a point (a router computed in
the wrong dtype, or given another layer's weights, shows there first); the block's output
(`mlp`) is the experts' weighted sum. Transformers' router returns (logits, weights,
indices) and vLLM's gate (logits, bias): the capture keeps the first of each, the logits.
"""

from __future__ import annotations

from llm_parity.families import Family

_QK_NORM = {
    "input_norm": ("input_layernorm",),
    "q_norm": ("self_attn.q_norm",),
    "k_norm": ("self_attn.k_norm",),
    "attn": ("self_attn",),
    "post_attn_norm": ("post_attention_layernorm",),
}

QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    points={**_QK_NORM, "mlp": ("mlp",)},
    description="Qwen3: qk-norm per head before the rotary embedding",
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    points={**_QK_NORM, "router": ("mlp.gate",), "mlp": ("mlp",)},
    description="Qwen3-MoE: qk-norm; a router over routed experts (norm_topk_prob)",
)

FAMILIES = {"qwen3": QWEN3, "qwen3_moe": QWEN3_MOE}
