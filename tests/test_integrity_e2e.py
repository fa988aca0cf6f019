"""Verdict integrity end to end: no silent pass. Real engines on the toy model; each run
asserts that the exit status, the JUnit XML and the JSON verdict agree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import junit_cases, needs_vllm

pytestmark = pytest.mark.engine

QUICK = ("--long-prompts", "none", "--continuation", "8")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-checks"


@pytest.fixture(scope="module", autouse=True)
def torch_loaded_before_pytester():
    """pytester drops modules first imported during a test; torch cannot be imported twice."""
    import torch

    return torch


def run_suite(pytester, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--junitxml", "junit.xml",
        "--parity-json=verdict.json", *QUICK, *args)


def agree(pytester, result, read_json) -> tuple[dict, dict]:
    """The three outputs tell one story: exit 0 iff verdict pass iff no JUnit failure."""
    verdict = read_json(pytester.path / "verdict.json")
    cases = junit_cases(pytester.path / "junit.xml")
    bad = {name for name, (outcome, _) in cases.items() if outcome in ("failure", "error")}
    assert (result.ret == 0) == (verdict["verdict"] == "pass") == (not bad), (
        result.ret, verdict["verdict"], sorted(bad)[:5])
    assert verdict["session"]["exit_status"] == result.ret
    return verdict, cases


@needs_vllm
def test_raw_logits_from_the_real_engine_are_refused_before_any_metric(pytester, read_json):
    # vLLM's logprobs_mode=raw_logits returns logits where log-probs belong: before, this
    # passed the KL gates with a KL mean of -7.7 (impossible). Now no metric reads them.
    result = run_suite(pytester, "--candidate", "vllm", "--configurations", "eager",
                       "--noise-floor", "off", "--candidate-option", "logprobs_mode=raw_logits")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "candidate (vllm, configuration eager), prompt rag-01" in out
    assert "is above 0" in out and "logprobs_mode must be raw_logprobs" in out
    verdict, cases = agree(pytester, result, read_json)
    assert verdict["verdict"] == "error" and "is above 0" in verdict["error"]
    assert not verdict["gates"] and not any(o == "passed" for o, _ in cases.values())


STRICT = """
[precision]
near_tie_margin = 0.2
strict = {strict}

[precision.gates.kl_mean]
metric = "kl"
max = 0.01

[precision.gates.kl_vs_floor]
metric = "kl"
relative_to = "noise_floor"
max = 3.0

[precision.gates.decode_kl_mean]
over = "decode"
metric = "kl"
max = 0.01
"""


@pytest.mark.parametrize("strict", [False, True])
def test_gates_not_judged_are_named_with_their_reason_and_strict_fails_them(
        pytester, read_json, strict):
    pytester.makefile(".toml", thresholds=STRICT.format(strict=str(strict).lower()))
    result = run_suite(pytester, "--candidate", "hf", "--noise-floor", "off",
                       "--continuation", "0")
    verdict, cases = agree(pytester, result, read_json)
    reasons = {g["name"]: g["reason"] for g in verdict["not_judged"]}
    assert set(reasons) == {"kl_vs_floor", "decode_kl_mean"}
    assert "--noise-floor off" in reasons["kl_vs_floor"]
    assert "--continuation 0" in reasons["decode_kl_mean"]
    outcome, props = cases["test_gate[kl_vs_floor]"]
    assert props["reason"] == reasons["kl_vs_floor"]
    out = result.stdout.str()
    assert "NOT JUDGED kl_vs_floor" in out and "does not apply to platform" not in out
    if strict:
        assert result.ret == pytest.ExitCode.TESTS_FAILED and verdict["verdict"] == "fail"
        assert outcome == "failure" and cases["test_gate[decode_kl_mean]"][0] == "failure"
        assert verdict["protocol"]["strict"] is True
    else:
        assert result.ret == 0 and verdict["verdict"] == "pass"
        assert outcome == "skipped" and cases["test_gate[kl_mean]"][0] == "passed"


def test_public_fixtures_compare_an_extra_prompt_on_the_loaded_engines(pytester, read_json):
    for name in ("conftest.py", "test_own_checks.py"):
        shutil.copy(EXAMPLE / name, pytester.path / name)
    result = run_suite(pytester, "--candidate", "hf", "--noise-floor", "off")
    verdict, cases = agree(pytester, result, read_json)
    assert result.ret == 0, result.stdout.str()[-3000:]
    for name in ("test_a_domain_prompt_stays_within_bf16_noise",
                 "test_the_worst_prompt_of_the_run_is_named",
                 "test_the_candidate_answers_token_ids_directly"):
        assert cases[name][0] == "passed", name
    # Each engine was built once, by the run; the extra prompt reused them.
    assert "reference_load_s" in verdict["timings"] and "candidate_load_s" in verdict["timings"]
    assert result.stdout.str().count("reference_load") == 1


FLOOR_ONLY = """
[precision.gates.kl_vs_floor]
metric = "kl"
relative_to = "noise_floor"
max = 3.0
"""


def test_a_run_that_judges_no_gate_is_an_error_everywhere(pytester, read_json):
    # Before: only floor-relative gates with --noise-floor off passed, exit 0, judging nothing.
    pytester.makefile(".toml", thresholds=FLOOR_ONLY)
    result = run_suite(pytester, "--candidate", "hf", "--noise-floor", "off")
    verdict, cases = agree(pytester, result, read_json)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert verdict["verdict"] == "error" and verdict["error"].startswith("no gate was judged")
    assert "kl_vs_floor (it reads the noise floor" in verdict["error"]
    suite = {n: o for n, (o, _) in cases.items() if n.startswith(("test_prompt", "test_gate"))}
    assert suite and all(o == "failure" for o in suite.values())
    result.stdout.fnmatch_lines(["*no gate was judged: kl_vs_floor*"])


STRICT_PER_PROMPT = """
[precision]
strict = true

[precision.gates.kl_mean]
metric = "kl"
max = 0.01

[precision.prompt_gates.kl_vs_floor]
metric = "kl"
relative_to = "noise_floor"
max = 10.0
"""


def test_strict_fails_each_prompt_a_per_prompt_gate_could_not_judge(pytester, read_json):
    # Before: the verdict failed on the strict per-prompt gate while every test was green.
    pytester.makefile(".toml", thresholds=STRICT_PER_PROMPT)
    result = run_suite(pytester, "--candidate", "hf", "--noise-floor", "off")
    verdict, cases = agree(pytester, result, read_json)
    assert verdict["verdict"] == "fail" and cases["test_gate[kl_mean]"][0] == "passed"
    prompts = {n: o for n, (o, _) in cases.items() if n.startswith("test_prompt[")}
    assert len(prompts) == 25 and set(prompts.values()) == {"failure"}
    assert ("gate kl_vs_floor was not judged: it reads the noise floor, which was not "
            "measured: the noise floor is off (--noise-floor off) (strict = true in "
            "[precision])") in result.stdout.str()


def test_the_packaged_decode_tests_fail_a_port_that_decodes_wrong(pytester, read_json):
    # Before: no per-prompt gate read the decode view, so test_decode passed whatever the
    # candidate decoded. The packaged decode_top1_defect gate now fails such a prompt.
    from llm_parity.runner.toymodel import toy_model_dir
    from llm_parity.testing.mutants import make_mutant

    broken = make_mutant(toy_model_dir(), pytester.path / "broken", "layer_noise")
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={broken}",
                       "--noise-floor", "off")
    verdict, cases = agree(pytester, result, read_json)
    decode = {n: o for n, (o, _) in cases.items() if n.startswith("test_decode[")}
    failed = {n for n, o in decode.items() if o == "failure"}
    assert decode and failed, decode
    defects = {e["id"] for e in verdict["decodes"] if e["divergence"]
               and not e["divergence"]["near_tie"]}
    assert {n[len("test_decode["):-1] for n in failed} == defects
