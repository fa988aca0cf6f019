"""Layer gates end to end, on the toy model with the Transformers candidate and the packaged
thresholds: a port whose output gates all pass while layer 0's attention is off fails on
its layer gate alone, a correct port passes, a run that cannot capture lists the gate as
not judged (strict fails it); exit status, JUnit and the JSON verdict agree each time."""

from __future__ import annotations

import shutil

import pytest
from conftest import junit_cases

from llm_parity.runner.toymodel import toy_model_dir

pytestmark = pytest.mark.engine

QUICK = ("--long-prompts", "none", "--continuation", "8")


def noisy_o_proj(dest, scale=0.03, seed=1):
    """Noise at 3% of its spread on layer 0's output projection: every output gate passes
    (the nearest per-prompt gate at a quarter of its bound), layer 0's attention reads 5.8x
    its floor. (Seed 0's draw put one prompt's teacher-forced KL at 16x its floor once the
    floor was batched: a port that no longer passes its output gates.)"""
    import torch

    from llm_parity.testing.mutants import _edit_weights

    shutil.copytree(toy_model_dir(), dest)
    generator = torch.Generator().manual_seed(seed)

    def edit(tensors):
        name = "model.layers.0.self_attn.o_proj.weight"
        t = tensors[name]
        noise = torch.randn(t.shape, generator=generator) * scale * t.float().std()
        tensors[name] = (t.float() + noise).to(t.dtype)
        return tensors

    _edit_weights(dest, edit)
    return dest


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    import torch  # noqa: F401  (made before pytester snapshots modules)

    return noisy_o_proj(tmp_path_factory.mktemp("m") / "noisy")


def run_suite(pytester, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", "--junitxml",
        "junit.xml", "--parity-json=verdict.json", *QUICK, *args)


def agree(pytester, result, read_json):
    verdict = read_json(pytester.path / "verdict.json")
    cases = junit_cases(pytester.path / "junit.xml")
    bad = {name for name, (outcome, _) in cases.items() if outcome in ("failure", "error")}
    assert (result.ret == 0) == (verdict["verdict"] == "pass") == (not bad), (
        result.ret, verdict["verdict"], sorted(bad))
    assert verdict["session"]["exit_status"] == result.ret
    return verdict, cases


def test_a_port_passing_every_output_gate_fails_on_its_layer_gate(pytester, noisy, read_json):
    result = run_suite(pytester, f"--candidate-model={noisy}")
    verdict, cases = agree(pytester, result, read_json)
    assert result.ret == pytest.ExitCode.TESTS_FAILED and verdict["verdict"] == "fail"
    # Every output gate passes: the layer gate alone fails the run.
    assert all(g["passed"] for g in verdict["gates"])
    assert all(p["passed"] for p in verdict["prompts"] + verdict["sequences"])
    (gate,) = verdict["layer_gates"]
    assert (gate["name"], gate["point"], gate["passed"]) == ("max_ratio", "layers.0.attn", False)
    assert gate["value"] > 5.0 and gate["threshold"] == 5.0
    assert "layer gates failed: max_ratio" in verdict["verdict_reasons"]
    assert "precision gates failed" not in verdict["verdict_reasons"]
    # One capture, made for the gates on a run whose output gates passed.
    loc = verdict["localization"]
    assert loc["for_gates"] and loc["ran"] and not loc["failed"]
    assert gate["prompt_id"] == loc["results"][0]["prompt_id"]
    outcome, props = cases["test_layer_gate[max_ratio]"]
    assert outcome == "failure" and props["point"] == "layers.0.attn"
    assert float(props["value"]) == pytest.approx(gate["value"])
    assert cases["test_localization"][0] == "skipped"
    bad = [n for n, (o, _) in cases.items() if o in ("failure", "error")]
    assert bad == ["test_layer_gate[max_ratio]"]
    out = result.stdout.str()
    assert "  FAIL max_ratio: largest ratio to the bf16 floor over every point = " in out
    assert "where it diverges (configuration default" in out  # the run fails: shown


def test_a_correct_port_passes_its_layer_gates(pytester, read_json):
    result = run_suite(pytester)
    verdict, cases = agree(pytester, result, read_json)
    assert result.ret == 0 and verdict["verdict"] == "pass"
    (gate,) = verdict["layer_gates"]
    assert gate["passed"] and gate["value"] <= 1.5
    assert cases["test_layer_gate[max_ratio]"][0] == "passed"
    out = result.stdout.str()
    assert "  pass max_ratio: " in out and "where it diverges" not in out


@pytest.mark.parametrize("strict", [False, True])
def test_without_a_capture_the_gate_is_not_judged_and_strict_fails_it(pytester, read_json,
                                                                       strict):
    result = run_suite(pytester, "--localize", "off", *(["--strict-gates"] if strict else []))
    verdict, cases = agree(pytester, result, read_json)
    (entry,) = [n for n in verdict["not_judged"] if n["scope"] == "layer"]
    assert entry["reason"] == "no layer capture: localization is off (--localize off)"
    assert not verdict["layer_gates"]
    outcome, props = cases["test_layer_gate[max_ratio]"]
    assert props["reason"] == entry["reason"]
    assert "NOT JUDGED max_ratio (layer, over every point): no layer capture" in \
        result.stdout.str()
    if strict:
        assert result.ret == pytest.ExitCode.TESTS_FAILED and outcome == "failure"
        assert "layer gates failed: max_ratio (not judged, strict)" in verdict["verdict_reasons"]
    else:
        assert result.ret == 0 and outcome == "skipped" and verdict["verdict"] == "pass"


def test_a_mistake_in_the_table_stops_the_run_before_any_model_loads(pytester):
    pytester.makefile(".toml", thresholds="[layer_gates.modules]\natention = 3\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "thresholds.toml: [layer_gates.modules] unknown key 'atention' (did you mean " \
           "'attn'?)" in result.stderr.str()
