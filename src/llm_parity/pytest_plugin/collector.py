"""The thresholds file, collected as a test module whose tests are `llm_parity.pytest_plugin.suite`."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


class ParitySuite(pytest.Module):
    """A Module whose object is the packaged suite rather than an import of the file."""

    def _getobj(self) -> ModuleType:
        return importlib.import_module("llm_parity.pytest_plugin.suite")
