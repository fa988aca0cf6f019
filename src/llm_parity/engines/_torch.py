"""Torch helpers shared by engines: device and dtype resolution, in one place."""

from __future__ import annotations

import importlib.util

from llm_parity.errors import EngineError


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(torch.npu.is_available())


def resolve_device(asked: str, role: str) -> str:
    """Turn `auto` into the best device here; fail loudly when an asked device is missing."""
    import torch

    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "npu": npu_available(),
        "xpu": bool(getattr(torch, "xpu", None) and torch.xpu.is_available()),
    }
    if asked == "auto":
        return next(d for d in ("npu", "cuda", "xpu", "cpu") if available[d])
    base = asked.split(":")[0]
    if base not in available:
        raise EngineError(f"{role}: unknown device {asked!r}; expected auto, cpu, cuda, npu or xpu")
    if not available[base]:
        present = ", ".join(d for d, ok in available.items() if ok)
        raise EngineError(
            f"{role}: device {asked!r} was asked for but is not available here "
            f"(available: {present})"
        )
    return asked


def transformers_dtype_kwarg() -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def release_memory() -> None:
    """Give what a closed engine freed back to the system: Python's cycles collected, then
    glibc's heap trimmed. Freed tensors of a few MiB stay in glibc's arenas otherwise (its
    mmap threshold grows with every large block freed), counted in the process's resident
    set under the next engine's weights: Gemma 3's float32 reference left 0.25 GiB there,
    measured. A no-op where the C library has no malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:  # the process's own symbols: glibc's where it is the C library, no search run
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)
