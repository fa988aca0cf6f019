"""The precision suite end to end: a real pytest run in a temp dir (pytester), real
engines on the embedded toy model, asserting on outcomes, exit codes, the JUnit XML and
the JSON verdict. Each run loads its engines once; a vLLM run costs tens of seconds.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import junit_cases, junit_suite_properties, needs_vllm

from llm_parity.config.prompts import load_prompts, packaged_prompts_path
from llm_parity.config.thresholds import ThresholdsFile, load_thresholds, packaged_thresholds_path
from llm_parity.runner.toymodel import toy_model_dir
from llm_parity.testing.mutants import make_mutant

pytestmark = pytest.mark.engine

SPEC_TOP_KEYS = {"verdict", "model", "candidate", "aggregate", "gates", "prompts", "environment"}
SPEC_AGGREGATE = {"top1_match_rate", "cosine_mean", "kl_mean", "js_mean", "spearman_mean",
                  "mae_mean"}
SPEC_GATE = {"name", "metric", "aggregate", "bound", "threshold", "value", "passed"}
SPEC_PROMPT = {"id", "prompt", "reference_top1", "candidate_top1", "top1_match", "cosine", "kl"}


@pytest.fixture(scope="module", autouse=True)
def torch_loaded_before_pytester():
    """pytester drops modules first imported during a test; torch cannot be imported twice."""
    import torch

    return torch


# Runs that only need to see a failure or an error keep the depth views short.
QUICK = ("--long-prompts", "none", "--continuation", "8")


def suite_size(long_prompts=True, configurations=1):
    """How many tests the packaged suite holds: prompts, depth prompts twice, gates; once
    per candidate configuration judged; and test_localization and each layer gate once."""
    long_count = len(load_prompts(packaged_prompts_path("rag_long"))) if long_prompts else 0
    layer_gates = len(ThresholdsFile.read(packaged_thresholds_path()).layer_gates.gates)
    return 1 + layer_gates + configurations * (
        25 + 2 * (25 + long_count) + len(load_thresholds(packaged_thresholds_path()).gates))


def run_suite(pytester, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--junitxml", "junit.xml",
        "--parity-json=verdict.json", *args,
    )


def check_verdict_shape(verdict):
    assert SPEC_TOP_KEYS <= verdict.keys()
    assert SPEC_AGGREGATE <= verdict["aggregate"].keys()
    for gate in verdict["gates"]:
        assert SPEC_GATE <= gate.keys()
    for prompt in verdict["prompts"]:
        assert SPEC_PROMPT <= prompt.keys()
    assert {"backend", "device", "dtype"} <= verdict["candidate"].keys()
    assert {"python", "torch", "transformers"} <= verdict["environment"].keys()


def test_hf_candidate_passes_with_every_value_recorded(pytester, read_json):
    # --localize always: a passing port is localized too, and names nothing.
    result = run_suite(pytester, "--candidate", "hf", "--localize", "always")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=suite_size())  # no quantization gate collected
    out = result.stdout.str()
    assert "verdict: PASS" in out and "candidate: hf on cpu in bfloat16" in out
    assert "quantiz" not in out and "original_load_s" not in \
        (pytester.path / "verdict.json").read_text()

    cases = junit_cases(pytester.path / "junit.xml")
    outcome, props = cases["test_prompt[rag-01]"]
    assert outcome == "passed"
    for name in ("reference_top1", "candidate_top1", "cosine", "kl", "js", "spearman", "mae",
                 "top1_margin", "p_tail", "q_tail", "kl_full", "gate.kl.max", "gate.kl.value"):
        assert name in props, name
    assert props["reference_top1"].startswith("'")
    assert float(props["gate.kl.max"]) == 0.05
    _, gate = cases["test_gate[kl_mean]"]
    assert gate["metric"] == "kl" and gate["bound"] == "max" and float(gate["threshold"]) == 0.01
    suite = junit_suite_properties(pytester.path / "junit.xml")
    assert suite["model"] == "llm-parity/toy"
    assert int(suite["parameters"]) > 1_000_000
    assert len(suite["checkpoint_sha256"]) == 64
    assert suite["torch"] and suite["transformers"]

    verdict = read_json(pytester.path / "verdict.json")
    check_verdict_shape(verdict)
    assert verdict["verdict"] == "pass"
    assert verdict["candidate"] == {"backend": "hf", "device": "cpu", "dtype": "bfloat16"}
    assert len(verdict["prompts"]) == 25
    assert verdict["aggregate"]["kl_mean"] < 0.01
    # The hf candidate exposes the full vocabulary: full-vocab metrics bound the bin ones.
    for prompt in verdict["prompts"]:
        assert prompt["kl"] <= prompt["kl_full"] + 1e-9
    # Depth: every prompt, the long contexts too, continued 32 tokens and compared per position.
    depth_ids = [p["id"] for p in verdict["sequences"]]
    assert depth_ids[0] == "rag-01" and depth_ids[-1] == "long-08" and len(depth_ids) == 33
    assert all(p["positions"] == 32 and len(p["kl"]) == 32 for p in verdict["sequences"])
    for decoded in verdict["decodes"]:
        agreed = decoded["divergence"]["step"] + 1 if decoded["divergence"] else 32
        assert decoded["steps_generated"] == 32 and decoded["positions"] == agreed
    outcome, props = cases["test_decode[long-08]"]
    assert outcome == "passed" and "agreed_steps" in props and "kl_mean" in props
    assert "teacher-forced: 1056 positions over 33 prompts" in out
    loc = verdict["localization"]
    assert loc["ran"] and not loc["diverged"] and not loc["failed"] and loc["where"] == ""
    assert max(p["ratio"] for p in loc["results"][0]["points"]) < 2.5
    assert "  nothing diverges: every captured point within 5x its bf16 floor" in out
    outcome, props = cases["test_localization"]
    assert outcome == "passed" and props["diverged"] == "False"


@needs_vllm
def test_vllm_candidate_passes_on_the_toy_model(pytester, read_json):
    # No --configurations: the vllm candidate is judged in graph mode and in eager mode.
    result = run_suite(pytester, "--candidate", "vllm")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=suite_size(configurations=2) - 1, skipped=1)
    verdict = read_json(pytester.path / "verdict.json")
    check_verdict_shape(verdict)
    block = verdict["configurations"]
    assert block["base"] == "compiled"
    assert [(e["name"], e["verdict"]) for e in block["entries"]] == [
        ("compiled", "pass"), ("eager", "pass")]
    assert [e["engine_args"]["enforce_eager"] for e in block["entries"]] == [False, True]
    cases = junit_cases(pytester.path / "junit.xml")
    for name in ("compiled", "eager"):
        outcome, props = cases[f"test_gate[{name}-kl_mean]"]
        assert outcome == "passed" and props["configuration"] == name
    assert cases["test_gate[eager-kl_mean]"][1]["switch"] == "enforce_eager=true"
    out = result.stdout.str()
    assert "gates of the base configuration, compiled:" in out
    assert "eager vs compiled, first token: top-1 agrees at" in out
    assert verdict["candidate"]["backend"] == "vllm"
    assert verdict["candidate"]["device"] == "cpu"
    assert verdict["environment"]["vllm"]
    assert verdict["aggregate"]["top1_match_rate"] >= 0.99
    suite = junit_suite_properties(pytester.path / "junit.xml")
    assert suite["vllm"] == verdict["environment"]["vllm"]


@needs_vllm
def test_vllm_candidate_with_wrong_rope_theta_fails_readably(pytester, read_json):
    # vLLM's default configurations, as a user runs it: compiled and eager, both failing.
    broken = make_mutant(toy_model_dir(), pytester.path / "broken", "rope_theta")
    result = run_suite(pytester, "--candidate", "vllm", f"--candidate-model={broken}",
                       "--parity-report=report.html", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "verdict: FAIL" in out
    result.stdout.fnmatch_lines(["*gate kl_mean: mean kl = *, must be <= 0.01*",
                                 "*worst prompts: rag-*"])
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "fail"
    failed = {g["name"] for g in verdict["gates"] if not g["passed"]}
    assert "kl_mean" in failed
    # Where it breaks: the compiled configuration failed first; it is localized in eager
    # mode, on the eager configuration's engine, which the precision run left open.
    loc = verdict["localization"]
    assert (loc["configuration"], loc["where"]) == ("compiled", "layer 0, attention"), loc
    assert loc["reused_engine"] and loc["engine_args"]["enforce_eager"] is True
    assert "localized in eager mode" in loc["note"]
    assert "  layer 0, attention: " in out
    assert junit_cases(pytester.path / "junit.xml")["test_localization"][0] == "failure"
    assert "First diverging: <strong>layer 0, attention</strong>" in \
        (pytester.path / "report.html").read_text()


def test_perturbed_layer_fails_per_prompt_and_in_aggregate(pytester, read_json):
    broken = make_mutant(toy_model_dir(), pytester.path / "broken", "layer_noise")
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={broken}", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "fail"
    assert any(not p["passed"] for p in verdict["prompts"])
    cases = junit_cases(pytester.path / "junit.xml")
    assert any(outcome == "failure" for outcome, _ in cases.values())
    result.stdout.fnmatch_lines(["*prompt rag-* tokens*"])


def test_nan_weights_are_named_before_any_gate_is_judged(pytester, read_json):
    broken = make_mutant(toy_model_dir(), pytester.path / "broken", "nan_weights")
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={broken}", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(errors=suite_size(long_prompts=False))
    result.stdout.fnmatch_lines(["*candidate (hf), prompt rag-01: * NaN or infinite*"])
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "error" and "NaN" in verdict["error"]


def test_tokenizer_that_differs_is_refused_before_models_load(pytester):
    other = pytester.path / "other"
    shutil.copytree(toy_model_dir(), other)
    tokenizer = (other / "tokenizer.json").read_text()
    # Swap two vocabulary entries' ids: same size, different token ids for common text.
    data = json.loads(tokenizer)
    vocab = data["model"]["vocab"]
    a, b = "e", "t"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={other}", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(errors=suite_size(long_prompts=False))
    result.stdout.fnmatch_lines(["*the candidate's tokenizer gives other token ids*"])
    assert "reference_load" not in result.stdout.str()


def test_missing_device_fails_loudly(pytester):
    result = run_suite(pytester, "--candidate", "hf", "--candidate-device", "cuda", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(errors=suite_size(long_prompts=False))
    result.stdout.fnmatch_lines(["*device 'cuda' was asked for but is not available here*"])


def test_candidate_with_fewer_logprobs_than_asked(pytester):
    # A backend registered by name from the project's conftest: one module, no edits here.
    pytester.makepyfile(short_engine="""
        from llm_parity.engines.base import NextToken
        from llm_parity.engines.hf import HfEngine

        class ShortEngine(HfEngine):
            backend = "short"

            def next_token(self, prompts, k):
                full = super().next_token(prompts, k)
                return [NextToken(r.token_ids[:5], r.logprobs[:5]) for r in full]
    """)
    pytester.makeconftest("""
        from llm_parity.engines.base import register
        register("short", "short_engine:ShortEngine")
    """)
    pytester.syspathinsert()
    result = run_suite(pytester, "--candidate", "short", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*candidate (short), prompt rag-01: returned 5 log-probs, "
                                 "asked for 20*"])


def test_golden_store_replays_the_reference_and_refuses_a_stale_one(pytester, read_json):
    store = pytester.path / "golden"
    first = run_suite(pytester, "--candidate", "hf", f"--reference-store={store}", *QUICK)
    assert first.ret == 0, first.stdout.str()
    live = read_json(pytester.path / "verdict.json")
    assert (store / "key.json").is_file() and (store / "reference.safetensors").is_file()
    assert live["reference"]["store"] == str(store)

    again = run_suite(pytester, "--candidate", "hf", f"--reference-store={store}", *QUICK)
    assert again.ret == 0, again.stdout.str()
    replayed = read_json(pytester.path / "verdict.json")
    assert "reference_store_load_s" in replayed["timings"]
    assert "reference_load_s" not in replayed["timings"]  # the reference model never loaded
    # Same verdict, same numbers, to the last bit.
    for key in ("verdict", "aggregate", "gates", "prompts", "sequences", "decodes",
                "noise_floor"):
        assert replayed[key] == live[key], key

    stale = run_suite(pytester, "--candidate", "hf", f"--reference-store={store}",
                      "--long-prompts", "none", "--continuation", "4")
    assert stale.ret == pytest.ExitCode.TESTS_FAILED
    stale.stdout.fnmatch_lines(["*reference store * was made for other inputs and is stale*",
                                "*continuation: stored 8, this run 4*",
                                "*rerun with --reference-store-update*"])
    assert read_json(pytester.path / "verdict.json")["verdict"] == "error"
    assert "candidate_load" not in stale.stdout.str()

    refreshed = run_suite(pytester, "--candidate", "hf", f"--reference-store={store}",
                          "--reference-store-update", "--long-prompts", "none",
                          "--continuation", "4")
    assert refreshed.ret == 0, refreshed.stdout.str()
    assert json.loads((store / "key.json").read_text())["key"]["continuation"] == 4


def test_noise_floor_off_skips_the_relative_gates_and_says_why(pytester):
    result = run_suite(pytester, "-rs", "--candidate", "hf", "--noise-floor", "off", *QUICK)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*SKIPPED*kl_vs_floor*the noise floor is off*"])
    # No floor line in what the run reports (the live lines say which engines localization
    # captured with, the floor's among them for the layer gates).
    reported = [line for line in result.stdout.lines if not line.startswith("llm-parity: ")]
    assert not any("noise floor (hf" in line for line in reported)
