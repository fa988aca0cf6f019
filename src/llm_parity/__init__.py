"""llm-parity: acceptance tests for language-model ports, as a pytest plugin.

Importing this package must stay cheap: no torch, transformers or vllm at import time.
"""

__version__ = "0.1.0"
