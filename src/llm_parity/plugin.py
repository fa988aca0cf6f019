"""pytest entry point of llm-parity (placeholder while the foundation is built)."""
