"""The thresholds file, collected as a test module whose tests are `llm_parity.pytest_plugin.suite`."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


class ParitySuite(pytest.Module):
    """A Module whose object is the packaged suite rather than an import of the file."""

    def _getobj(self) -> ModuleType:
        return importlib.import_module("llm_parity.pytest_plugin.suite")

    def collect(self):
        # A file without [layer_gates] has no layer gate test at all (not one skipped
        # "NOTSET" item, which pytest makes of an empty parametrization).
        from llm_parity.pytest_plugin.state import parity_session

        session = parity_session(self.config)
        gates = session.settings.thresholds_file.layer_gates.gates
        # Likewise the quantization gates, collected for a quantized candidate beside an
        # unquantized original only.
        quantized = session.quantization_gate_names()
        return [i for i in super().collect()
                if (gates or getattr(i, "originalname", None) != "test_layer_gate")
                and (quantized or getattr(i, "originalname", None) != "test_quantization_gate")]
