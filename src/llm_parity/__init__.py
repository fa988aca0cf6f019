"""llm-parity: acceptance tests for language-model ports, as a pytest plugin.

Importing this package must stay cheap: no torch, transformers or vllm at import time.
"""

from pathlib import Path

__version__ = "0.1.0"

DATA_DIR = Path(__file__).resolve().parent / "data"  # packaged prompts, gates, toy model
