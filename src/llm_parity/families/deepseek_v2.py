"""DeepSeek-V2 and V3: multi-head latent attention and shared plus routed experts.

Multi-head latent attention (MLA) projects each token's keys and values down to one
latent vector (`kv_a_proj_with_mqa`, then the RMSNorm `kv_a_layernorm`), which is what the
KV cache holds, and back up per head (`kv_b_proj`); a separate slice carries the rotary
part of the key, shared by all heads. With `q_lora_rank` set the queries are compressed the
same way (`q_a_layernorm`). vLLM runs this through its own MLA layer (absorbing
`kv_b_proj` into the attention for decoding), so the projections it calls differ from
Transformers'; the normalised latents are the same tensors in both, and are the points:
a port that caches the wrong latent, or splits the rotary slice off the wrong side, leaves
its floor there or at the attention output right after.

The first `first_k_dense_replace` layers have a dense MLP; the others a MoE block: a
router (`mlp.gate`), routed experts and `shared_experts` every token passes, summed (and
the routed part scaled by `routed_scaling_factor`). Router logits and the shared experts'
output are points beside the block's.
"""

from __future__ import annotations

from llm_parity.families import Family

DEEPSEEK_V2 = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2", "deepseek_v3"),
    points={
        "input_norm": ("input_layernorm",),
        "q_a_norm": ("self_attn.q_a_layernorm",),
        "kv_a_norm": ("self_attn.kv_a_layernorm",),
        "attn": ("self_attn",),
        "post_attn_norm": ("post_attention_layernorm",),
        "router": ("mlp.gate",),
        "shared_experts": ("mlp.shared_experts",),
        "mlp": ("mlp",),
    },
    description="DeepSeek-V2: multi-head latent attention; shared and routed experts",
)

FAMILIES = {"deepseek_v2": DEEPSEEK_V2}
