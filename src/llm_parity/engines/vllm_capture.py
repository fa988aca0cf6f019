"""The vLLM worker extension that captures layer outputs inside the engine's workers.

`VllmEngine` names this class as vLLM's `worker_extension_cls`: vLLM mixes it into each
worker, and `LLM.collective_rpc` calls its methods by name. Only names and plain data
cross the process boundary (positions in; lists and bytes out), so no pickled code is sent
and vLLM's insecure serialization stays off. Hooks are installed for one request and
removed after it: the engine runs untouched otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence


class CaptureExtension:
    """Methods added to a vLLM worker (each rank runs them; rank 0's answer is read)."""

    def llm_parity_capture_start(self, positions: Sequence[int]) -> int:
        from llm_parity.engines.capture import Recorder

        earlier = getattr(self, "_llm_parity_recorder", None)
        if earlier is not None:  # a capture that never finished
            earlier.remove()
        self._llm_parity_recorder = Recorder(self.get_model(), positions, fused_residual=True)
        return self._llm_parity_recorder.num_layers

    def llm_parity_capture_stop(self) -> dict[str, list] | None:
        recorder = getattr(self, "_llm_parity_recorder", None)
        if recorder is None:
            return None
        recorder.remove()
        self._llm_parity_recorder = None
        return recorder.packed()
