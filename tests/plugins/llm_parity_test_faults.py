"""A test-only vLLM general plugin that breaks exactly one engine path, on the real engine.

It proves that the configuration matrix catches a bug in the configuration that has it and
in no other. Inert unless LLM_PARITY_VLLM_FAULT names one or more faults (comma-separated):

- `graph`: every decoder layer's output is scaled by 1.1, only inside a torch.compile
  trace: the compiled graph is wrong, eager mode is right.
- `chunked_prefill`: the logits of a step that continues a partly prefilled prompt (a
  second or later chunk) are perturbed.
- `prefix_hit`: the logits of a step that starts a request from cached prefix blocks are
  perturbed.
- `decode`: the logits of a step that only decodes (one new token per request, from the KV
  cache) are perturbed: prefills, and so every layer capture, stay right.
- `moe_renormalize`: the CPU MoE router ignores `renormalize` (a kernel that drops the
  flag): a Qwen3-MoE model's chosen experts' weights no longer sum to one.
- `gemma_embed_scale`: vLLM's Gemma 3 model skips its embedding normalizer (sqrt(hidden)),
  the bug a port that forgets Gemma's scaled embedding has.
- Quantized ports (the CPU int8 W8A8 kernel, vllm/model_executor/kernels/linear/scaled_mm):
  `w8a8_scale_axis` applies each layer's per-channel weight scales to the wrong channels
  (the scale vector reversed); `w8a8_scale_missing` loses one layer's scales
  (`layers.1.mlp.down_proj`, treated as 1, as a loader that misses a renamed key does);
  `w8a8_per_tensor` quantizes activations with one scale per tensor where the checkpoint
  says per token; `w8a8_ignore_dropped` quantizes the layers a mixed-precision checkpoint
  lists under `ignore` anyway (int8 weights per channel and activations per token, computed
  from the bf16 weights it stores).

vLLM loads general plugins in each of its processes; the patches act in the worker, where
the model runs. Registered under `vllm.general_plugins` as `llm_parity_test_faults` by this
directory's own distribution (tests/plugins/pyproject.toml), which only the project's test
set-up installs: the suite's package never carries it.
"""

from __future__ import annotations

import os

ENV_VAR = "LLM_PARITY_VLLM_FAULT"
FAULTS = ("graph", "chunked_prefill", "prefix_hit", "decode", "moe_renormalize",
          "gemma_embed_scale", "w8a8_scale_axis", "w8a8_scale_missing", "w8a8_per_tensor",
          "w8a8_ignore_dropped")
# The layer whose scales `w8a8_scale_missing` loses.
SCALE_MISSING_IN = "layers.1.mlp.down_proj"
# Added to every logit of an affected step, scaled by the logit's own position in the
# vocabulary: a tilt, so the distribution changes (a constant would cancel in softmax).
TILT = 3.0

_step = {"chunked_prefill": False, "prefix_hit": False, "decode": False}


def asked() -> set[str]:
    names = {n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()}
    unknown = names - set(FAULTS)
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown fault {sorted(unknown)[0]!r}; expected some of "
                         f"{', '.join(FAULTS)}")
    return names


def register() -> None:
    faults = asked()
    if not faults:
        return
    if "graph" in faults:
        _break_graph()
    if faults & {"chunked_prefill", "prefix_hit", "decode"}:
        _break_steps(faults)
    if "moe_renormalize" in faults:
        _break_moe_renormalize()
    if "gemma_embed_scale" in faults:
        _break_gemma_embed_scale()
    if faults & {"w8a8_scale_axis", "w8a8_scale_missing", "w8a8_per_tensor"}:
        _break_int8_kernel(faults)
    if "w8a8_ignore_dropped" in faults:
        _break_ignore_list()


def _int8_rounded(t, dim):
    """t rounded to a symmetric int8 grid, one scale per row along `dim` (None: one for the
    whole tensor), returned in t's dtype."""
    import torch

    wide = t.float()
    amax = wide.abs().amax() if dim is None else wide.abs().amax(dim=dim, keepdim=True)
    step = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.round(wide / step).clamp(-127, 127) * step).to(t.dtype)


def _break_int8_kernel(faults: set[str]) -> None:
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    kernel = cpu.CPUInt8ScaledMMLinearKernel
    if getattr(kernel.process_weights_after_loading, "_llm_parity_fault", False):
        return
    process, apply = kernel.process_weights_after_loading, kernel.apply_weights

    def process_weights_after_loading(self, layer):
        scale = layer.weight_scale
        if "w8a8_scale_axis" in faults:
            scale.data.copy_(scale.data.flip(0))
        if "w8a8_scale_missing" in faults and getattr(layer, "prefix", "").endswith(
                SCALE_MISSING_IN):
            scale.data.fill_(1.0)
        return process(self, layer)

    def apply_weights(self, layer, x, bias=None):
        if "w8a8_per_tensor" in faults:
            x = _int8_rounded(x, None)
        return apply(self, layer, x, bias)

    process_weights_after_loading._llm_parity_fault = True
    kernel.process_weights_after_loading = process_weights_after_loading
    kernel.apply_weights = apply_weights


def _break_ignore_list() -> None:
    from vllm.model_executor.layers import linear

    method = linear.UnquantizedLinearMethod
    if getattr(method.apply, "_llm_parity_fault", False):
        return
    process, apply = method.process_weights_after_loading, method.apply

    # Only the decoder blocks' projections: embeddings and the head stay as they are. The
    # weights are rounded before the CPU path packs them.
    def process_weights_after_loading(self, layer):
        if ".layers." in getattr(layer, "prefix", ""):
            layer.weight.data.copy_(_int8_rounded(layer.weight.data, 1))
        return process(self, layer)

    def quantized_anyway(self, layer, x, bias=None):
        if ".layers." in getattr(layer, "prefix", ""):
            x = _int8_rounded(x, -1)
        return apply(self, layer, x, bias)

    quantized_anyway._llm_parity_fault = True
    method.process_weights_after_loading = process_weights_after_loading
    method.apply = quantized_anyway


def _break_moe_renormalize() -> None:
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    original = cpu_router._softmax_topk
    if getattr(original, "_llm_parity_fault", False):
        return

    def softmax_topk(router_logits, top_k, renormalize, *args, **kwargs):
        return original(router_logits, top_k, False, *args, **kwargs)

    softmax_topk._llm_parity_fault = True
    cpu_router._softmax_topk = softmax_topk


def _break_gemma_embed_scale() -> None:
    from vllm.model_executor.models import gemma3

    if getattr(gemma3.Gemma3Model.embed_input_ids, "_llm_parity_fault", False):
        return

    def embed_input_ids(self, input_ids):
        return self.embed_tokens(input_ids)

    embed_input_ids._llm_parity_fault = True
    gemma3.Gemma3Model.embed_input_ids = embed_input_ids


def _break_graph() -> None:
    import torch
    from vllm.model_executor.models import llama

    original = llama.LlamaDecoderLayer.forward
    if getattr(original, "_llm_parity_fault", False):
        return

    def forward(self, positions, hidden_states, residual):
        hidden_states, residual = original(self, positions, hidden_states, residual)
        if torch.compiler.is_compiling():  # true only while dynamo traces the graph
            hidden_states = hidden_states * 1.1
        return hidden_states, residual

    forward._llm_parity_fault = True
    llama.LlamaDecoderLayer.forward = forward


def _break_steps(faults: set[str]) -> None:
    import torch
    from vllm.model_executor.models import llama
    from vllm.v1.worker import gpu_model_runner

    runner = gpu_model_runner.GPUModelRunner
    if getattr(runner.execute_model, "_llm_parity_fault", False):
        return
    execute = runner.execute_model
    compute_logits = llama.LlamaForCausalLM.compute_logits

    def execute_model(self, scheduler_output, *args, **kwargs):
        # What this step does, from the scheduler's own account of it.
        cached = scheduler_output.scheduled_cached_reqs
        scheduled = scheduler_output.num_scheduled_tokens
        _step["chunked_prefill"] = "chunked_prefill" in faults and any(
            computed > 0 and scheduled.get(req_id, 0) > 1
            and req_id not in cached.resumed_req_ids
            for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens))
        _step["prefix_hit"] = "prefix_hit" in faults and any(
            new.num_computed_tokens > 0 for new in scheduler_output.scheduled_new_reqs)
        _step["decode"] = ("decode" in faults and bool(scheduled)
                           and not scheduler_output.scheduled_new_reqs
                           and all(n == 1 for n in scheduled.values()))
        return execute(self, scheduler_output, *args, **kwargs)

    def perturbed_logits(self, hidden_states):
        logits = compute_logits(self, hidden_states)
        if logits is not None and any(_step.values()):
            tilt = torch.linspace(0.0, TILT, logits.shape[-1], dtype=logits.dtype,
                                  device=logits.device)
            logits = logits + tilt
        return logits

    execute_model._llm_parity_fault = True
    runner.execute_model = execute_model
    llama.LlamaForCausalLM.compute_logits = perturbed_logits
