"""Checks of your own beside the suite, on the engines it already loaded.

Run from this directory:  pytest -m precision --candidate vllm
(or --candidate hf where vLLM is not installed).
"""
