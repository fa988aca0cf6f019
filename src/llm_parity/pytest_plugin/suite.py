"""The acceptance tests themselves, collected under the active thresholds file.

Measured values go to `user_properties` directly: they reach the JUnit XML under every
junit_family, where the record_property fixture would warn under the default xunit2.

One test per prompt (the per-prompt gates) and one per gate across prompts. They all
share one precision run, computed once by the `parity_run` fixture.
"""

from __future__ import annotations

import pytest

from llm_parity.compare.layer_gates import layer_gate_line
from llm_parity.pytest_plugin.state import parity_session
from llm_parity.pytest_plugin.suite_performance import *  # noqa: F401,F403
from llm_parity.report.messages import (
    gate_failure_message,
    localization_lines,
    localization_properties,
    prompt_failure_message,
    prompt_properties,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    session = parity_session(metafunc.config)
    configurations = session.settings.configurations
    if "parity_configuration" in metafunc.fixturenames and configurations[0].declared:
        # Declared candidate configurations: every test once per configuration, its name
        # first in the id (test_gate[eager-kl_mean]).
        metafunc.parametrize("parity_configuration", [c.name for c in configurations])
    if "prompt_id" in metafunc.fixturenames:
        metafunc.parametrize("prompt_id", session.settings.prompts.ids)
    if "depth_prompt_id" in metafunc.fixturenames:
        metafunc.parametrize("depth_prompt_id", session.depth_prompt_ids())
    if "gate_name" in metafunc.fixturenames:
        metafunc.parametrize("gate_name", session.gate_names())
    if "quantization_gate_name" in metafunc.fixturenames:
        metafunc.parametrize("quantization_gate_name", session.quantization_gate_names())
    if "layer_gate_name" in metafunc.fixturenames:
        # One capture, of one configuration (the one localized): no configuration prefix.
        metafunc.parametrize("layer_gate_name",
                             session.settings.thresholds_file.layer_gates.names())


@pytest.fixture
def parity_configuration():
    """The candidate configuration a suite test judges (None: the backend declares none)."""
    return None


def _judged(run, configuration: str | None, request):
    """The precision result a test reads: its configuration's, recorded as properties."""
    if configuration is None:
        return _anything_judged(run.precision)
    entry = run.configuration(configuration)
    request.node.user_properties.append(("configuration", configuration))
    base = run.configurations[0].configuration
    if entry.configuration is not base:
        request.node.user_properties.append(("switch", entry.configuration.switch(base)))
    if entry.precision is None:
        pytest.fail(f"configuration {configuration} could not run: {entry.error}",
                    pytrace=False)
    return _anything_judged(entry.precision)


def _anything_judged(precision):
    """A run that judged no gate shows nothing: every test of it fails, saying why."""
    if precision.nothing_judged:
        pytest.fail(precision.nothing_judged, pytrace=False)
    return precision


@pytest.mark.precision
def test_prompt(parity_run, parity_configuration, prompt_id, request):
    """Every per-prompt gate on one prompt's compared positions."""
    _check_prompt(parity_run, parity_configuration, "first_token", prompt_id, request)


def _check_prompt(run, configuration, view: str, prompt_id: str, request) -> None:
    precision = _judged(run, configuration, request)
    result = next(p for p in precision.view(view) if p.prompt.id == prompt_id)
    for name, value in prompt_properties(result):
        request.node.user_properties.append((name, value))
    strict = [n for n in precision.not_judged
              if n.strict and n.gate.scope == "prompt" and n.gate.over == view]
    if not result.passed:
        pytest.fail(prompt_failure_message(result, precision), pytrace=False)
    if strict:  # the verdict fails on them: so does each prompt they could not judge
        pytest.fail("; ".join(f"gate {n.gate.name} was not judged: {n.reason}" for n in strict)
                    + " (strict = true in [precision])", pytrace=False)


@pytest.mark.precision
def test_sequence(parity_run, parity_configuration, depth_prompt_id, request):
    """Teacher-forced: every position of the reference's continuation, one pass (prefill)."""
    _check_prompt(parity_run, parity_configuration, "sequence", depth_prompt_id, request)


@pytest.mark.precision
def test_decode(parity_run, parity_configuration, depth_prompt_id, request):
    """Free-running greedy decoding, compared step by step up to the first divergence."""
    _check_prompt(parity_run, parity_configuration, "decode", depth_prompt_id, request)


@pytest.mark.precision
def test_gate(parity_run, parity_configuration, gate_name, request):
    """One gate across every prompt."""
    precision = _judged(parity_run, parity_configuration, request)
    if _check_gate(precision, gate_name, request):
        return
    quant = parity_run.quantization
    if quant is not None and gate_name in quant.left_out:
        pytest.skip(f"gate {gate_name} has an absolute bound, set for bf16 rounding: a "
                    "quantized port is judged by the gates read against the floor of its own "
                    "quantized weights")
    pytest.skip(f"gate {gate_name} is not among the gates for platform "
                f"{parity_run.candidate.get('device')} and model {parity_run.reference_model.name}")


def _check_gate(precision, gate_name: str, request, prefix: str = "") -> bool:
    """Judge one gate of `precision` as this test's outcome; False when it has no such gate."""
    found = [r for r in precision.gate_results if r.gate.name == gate_name]
    if found:
        result = found[0]
        for key, value in result.as_dict().items():
            request.node.user_properties.append((key, value))
        if not result.passed:
            pytest.fail(prefix + gate_failure_message(result, precision), pytrace=False)
        return True
    not_judged = next((n for n in precision.not_judged if n.gate.name == gate_name), None)
    if not_judged is None:
        return False
    request.node.user_properties += [("judged", False), ("reason", not_judged.reason)]
    message = f"{prefix}gate {gate_name} was not judged: {not_judged.reason}"
    if not_judged.strict:
        pytest.fail(message + " (strict = true in [precision])", pytrace=False)
    pytest.skip(message)


@pytest.mark.precision
def test_quantization_gate(parity_run, quantization_gate_name, request):
    """What the quantization costs: the float32 run of the quantized weights against the
    unquantized original, one gate across every prompt (runner/quantization.py). The port
    itself is judged by every other test, against the quantized weights."""
    quant = parity_run.quantization
    if quant is None or quant.result is None:
        pytest.skip("the quantization question was not asked"
                    + (f": {quant.reason}" if quant is not None and quant.reason else ""))
    request.node.user_properties.append(("question", "quantization"))
    if not _check_gate(quant.result, quantization_gate_name, request, "quantization "):
        pytest.skip(f"quantization gate {quantization_gate_name} is not among the gates for "
                    f"model {parity_run.reference_model.name}")


@pytest.mark.precision
def test_localization(parity_run, request):
    """Where the candidate first diverges: every layer's output against its own bf16 floor
    (runner/localize.py). Fails with the answer when the configuration it localized failed
    its gates; skips, saying why, when it did not run."""
    localization = parity_run.localization
    if localization is None:
        pytest.skip("localization did not run")
    data = localization.as_dict()
    request.node.user_properties += localization_properties(data)
    if data["skipped"]:
        pytest.skip(data["skipped"])
    if data["for_gates"]:
        pytest.skip("the candidate passed (--localize always localizes a passing run too); "
                    "captured for the layer gates")
    if data["failed"]:
        pytest.fail("\n".join(localization_lines(data)), pytrace=False)


@pytest.mark.precision
def test_layer_gate(parity_run, layer_gate_name, request):
    """One layer gate: the largest ratio of a captured point to its bf16 floor, on
    localization's capture of the worst prompts (compare/layer_gates.py)."""
    localization = parity_run.localization
    if localization is None:
        pytest.skip("the layer capture did not run")
    found = next((r for r in localization.layer_gates if r.gate.name == layer_gate_name), None)
    if found is not None:
        request.node.user_properties += [(k, v) for k, v in found.as_dict().items()
                                         if v is not None]
        if not found.passed:
            pytest.fail(f"layer gate {layer_gate_name} (configuration {found.configuration}): "
                        + layer_gate_line(found.as_dict()), pytrace=False)
        return
    not_judged = next((n for n in localization.layer_not_judged
                       if n.gate.name == layer_gate_name), None)
    if not_judged is None:
        pytest.skip(f"layer gate {layer_gate_name} was not judged")
    request.node.user_properties += [("judged", False), ("reason", not_judged.reason)]
    message = f"layer gate {layer_gate_name} was not judged: {not_judged.reason}"
    if not_judged.strict:
        pytest.fail(message + " (strict = true in [precision])", pytrace=False)
    pytest.skip(message)
