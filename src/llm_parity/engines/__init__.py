"""The engines: the only code that touches torch, Transformers, vLLM or a server."""
