"""Detection power, proven on the real vLLM engine: every broken copy of the toy checkpoint
in `llm_parity.testing.mutants.CATALOGUE` fails the suite, naming the gate that caught it; every
benign one passes. The float32 reference and the bf16 noise floor are computed once, by a
run of the correct candidate, and replayed from a golden store by every other run.

One pytest run per candidate, each a real `pytest -m precision` in its own directory
(pytester), so the outcome, exit code and JSON verdict are what a user would get.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import needs_vllm

from llm_parity.runner.toymodel import toy_model_dir
from llm_parity.testing.mutants import BENIGN, BROKEN, FOUNDING_GATES, detection, make_mutant

pytestmark = [pytest.mark.engine]

# Filled as the runs go, read by the last test: {name: detection row}.
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every catalogue entry, made once, before any pytester: what making them imports
    (torch, safetensors, transformers) must not be dropped and imported again by pytester's
    module snapshot, which native extensions do not survive."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    where = tmp_path_factory.mktemp("models")
    return {name: make_mutant(toy_model_dir(), where / name, name) for name in (*BROKEN, *BENIGN)}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A golden store made by the correct vLLM candidate, which must pass."""
    where = tmp_path_factory.mktemp("correct")
    store = where / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "precision",
         "--candidate", "vllm", "--reference-store", str(store),
         "--parity-json", str(where / "verdict.json")],
        cwd=where, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    RESULTS["correct"] = detection(json.loads((where / "verdict.json").read_text()))
    return store


def run_candidate(pytester, golden, model, name):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
        "--candidate-model", str(model), "--reference-store", str(golden),
        "--parity-json", "verdict.json", "--junitxml", "junit.xml",
    )

    verdict = json.loads((pytester.path / "verdict.json").read_text())
    row = detection(verdict)
    RESULTS[name] = row
    return result, verdict, row


@needs_vllm
@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_port_fails_with_the_gate_that_caught_it(pytester, models, golden, name,
                                                          read_json):
    result, verdict, row = run_candidate(pytester, golden, models[name], name)
    read_json(pytester.path / "verdict.json")  # schema
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-3000:]
    assert verdict["verdict"] == "fail"
    assert row["failed_gates"] or row["failed_prompt_gates"]
    out = result.stdout.str()
    assert "verdict: FAIL" in out
    # The failure message of a caught gate is on screen, with its threshold.
    first = (row["failed_gates"] or [None])[0]
    if first:
        result.stdout.fnmatch_lines([f"*gate {first}: *must be*"])
    # The reference came from the store: no float32 model was loaded for this run.
    assert "reference_store_load_s" in verdict["timings"]
    assert "reference_load_s" not in verdict["timings"]


@needs_vllm
@pytest.mark.parametrize("name", BENIGN)
def test_a_benign_change_passes(pytester, models, golden, name):
    result, verdict, row = run_candidate(pytester, golden, models[name], name)
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert verdict["verdict"] == "pass" and not row["failed_gates"]


@needs_vllm
def test_the_full_suite_catches_what_the_founding_protocol_lets_through(golden):
    missing = [n for n in (*BROKEN, *BENIGN) if n not in RESULTS]
    if missing:
        pytest.skip(f"needs the detection runs above; not run: {', '.join(missing)}")
    assert not RESULTS["correct"]["suite_caught"]
    founding = [n for n in BROKEN if RESULTS[n]["founding_caught"]]
    suite = [n for n in BROKEN if RESULTS[n]["suite_caught"]]
    assert suite == list(BROKEN)
    assert len(founding) < len(suite), (
        f"the founding gates ({', '.join(FOUNDING_GATES)}) alone caught every broken port; "
        "the catalogue no longer shows what the deeper views add")
