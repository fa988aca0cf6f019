"""Localization with real engines: the captures are the residual stream Transformers
exposes, vLLM's canonicalized capture sits within the floor on a correct port, the whole
catalogue is localized right with the Transformers candidate, and a failing suite run
prints, reports and records where it breaks (JUnit, JSON and report agreeing).

The vLLM candidate on every broken mutant is proven by tests/test_detection.py: each of its
failing runs must name the mutant's layer and module. vLLM's capture against the floor on a
correct port is in tests/test_engines.py (on that module's shared engine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import junit_cases

from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.runner.toymodel import toy_model_dir
from llm_parity.testing.catalogue import NAMES, run_catalogue
from llm_parity.testing.mutants import make_mutant

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def sequence():
    from llm_parity.config.prompts import load_prompts
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    ids = tokenize_prompts(load_tokenizer(toy_model_dir()), load_prompts())[0]
    return list(ids), [1, len(ids) // 2, len(ids) - 1]


def test_hf_capture_is_the_residual_stream_transformers_exposes(sequence):
    import torch

    ids, positions = sequence
    with build_engine("hf", EngineSpec(str(toy_model_dir()), "float32", "cpu")) as engine:
        captured = engine.capture(ids, positions)
        with torch.inference_mode():
            hidden = engine.model(input_ids=torch.tensor([ids]),
                                  output_hidden_states=True).hidden_states
        layers = engine.model.config.num_hidden_layers
    assert len(captured) == 2 + 5 * layers
    assert all(a.shape == (len(positions), 256) and a.dtype == np.float32
               for a in captured.values())
    np.testing.assert_allclose(captured["embed"], hidden[0][0, positions].numpy(), rtol=1e-6)
    for i in range(layers - 1):  # Transformers' last hidden state is the final norm's
        np.testing.assert_allclose(captured[f"layers.{i}"], hidden[i + 1][0, positions].numpy(),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(captured["final_norm"], hidden[-1][0, positions].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_a_compiled_vllm_engine_refuses_capture_before_running_anything():
    from llm_parity.engines.vllm import VllmEngine
    from llm_parity.errors import EngineError

    engine = VllmEngine.__new__(VllmEngine)  # no engine started: the check comes first
    engine.spec = EngineSpec(str(toy_model_dir()), role="candidate (vllm)")
    engine.engine_args = {"enforce_eager": False}
    with pytest.raises(EngineError, match="layer capture needs an eager engine"):
        engine.capture([1, 2, 3], [2])
    assert VllmEngine.capture_options({"max_num_seqs": 4}) == {"max_num_seqs": 4,
                                                                "enforce_eager": True}


def test_the_catalogue_is_localized_right_with_the_transformers_candidate(tmp_path):
    rows = run_catalogue(toy_model_dir(), "hf", tmp_path)
    assert list(rows) == list(NAMES)
    wrong = {name: (row["expected"], row["found"]) for name, row in rows.items()
             if not row["right"]}
    assert not wrong
    # Every broken one named with a clear jump; the layers before it within the floor.
    for name, row in rows.items():
        if row["expected"] is not None and row["ratio_at_found"] is not None:
            assert row["ratio_at_found"] > 5, name
        if row["max_ratio_before"] is not None:
            assert row["max_ratio_before"] < 2.5, name


@pytest.fixture(scope="module")
def broken_middle(tmp_path_factory):
    import torch  # noqa: F401  (made before pytester snapshots modules)

    return make_mutant(toy_model_dir(), tmp_path_factory.mktemp("m") / "broken",
                       "gate_up_swapped_middle")


def test_a_failing_run_prints_reports_and_records_where_it_breaks(pytester, broken_middle,
                                                                   read_json):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf",
        f"--candidate-model={broken_middle}", "--continuation", "8",
        "--long-prompts", "none", "--junitxml", "junit.xml", "--parity-json=verdict.json",
        "--parity-report=report.html", "--parity-report=report.md")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    verdict = read_json(pytester.path / "verdict.json")
    loc = verdict["localization"]
    # The verdict: the middle layer's MLP, the layers before within their floors.
    assert verdict["verdict"] == "fail" and loc["ran"] and loc["failed"]
    assert (loc["layer"], loc["module"], loc["where"]) == (2, "mlp", "layer 2, MLP")
    head = loc["results"][0]
    stream = {p["name"]: p["ratio"] for p in head["points"]}
    assert stream["layers.0"] < 2.5 and stream["layers.1"] < 2.5 and stream["layers.2.mlp"] > 5
    assert loc["timings"]["total_s"] > 0 and head["captured_bytes"] > 0
    # The terminal: the summary line and test_localization's failure say the same.
    assert "where it diverges (configuration default, prompt " in out
    assert "  layer 2, MLP: " in out and "the 2 layers before it within" in out
    # JUnit: test_localization failed, with the answer as properties.
    outcome, props = junit_cases(pytester.path / "junit.xml")["test_localization"]
    assert outcome == "failure"
    assert (props["where"], props["layer"], props["module"]) == ("layer 2, MLP", "2", "mlp")
    assert props["prompt_id"] == head["prompt_id"]
    # The reports: the section, the plot, the layer's table.
    html = (pytester.path / "report.html").read_text()
    assert "Where it diverges" in html and "Ratio to the bf16 floor, by layer" in html
    assert "First diverging: <strong>layer 2, MLP</strong>" in html
    assert "layers.2.mlp" in (pytester.path / "report.md").read_text()
    json.dumps(verdict)
