"""What the README promises, each run the way a user would run it."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import junit_cases, needs_vllm
from test_openai_backend import FakeServer

from llm_parity.cli import main
from llm_parity.engines.base import resolve_candidate_backend
from llm_parity.runner.models import checkpoint_card
from llm_parity.runner.toymodel import toy_model_dir

QUICK = ("--long-prompts", "none", "--continuation", "8")


@pytest.fixture(scope="module", autouse=True)
def torch_loaded_before_pytester():
    import torch

    return torch


def run_suite(pytester, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--junitxml", "junit.xml",
        "--parity-json=verdict.json", *args)


def test_candidate_auto_is_vllm_where_it_imports_else_hf(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name == "vllm" else real(name, *a))
    assert resolve_candidate_backend("auto") == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "vllm" else real(name, *a))
    assert resolve_candidate_backend("auto") == "hf"
    assert resolve_candidate_backend("openai") == "openai"


@needs_vllm
def test_vllm_on_an_npu_is_refused_where_vllm_picked_the_cpu(pytester, read_json):
    result = run_suite(pytester, "--candidate", "vllm", "--candidate-device", "npu")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "error"
    assert "device 'npu' was asked for, but vLLM selected the 'cpu' platform" in verdict["error"]
    cases = junit_cases(pytester.path / "junit.xml")
    assert cases and {outcome for outcome, _ in cases.values()} == {"error"}
    assert "reference_load" not in result.stdout.str()  # refused before any model loaded


@needs_vllm
def test_an_engine_that_cannot_start_ends_the_run_while_the_reference_computes(
        pytester, tmp_path, read_json):
    # A prefill budget below the batch size: vLLM refuses it as its engine starts, beside
    # the float32 reference (runner/beside.py), which is cancelled then, never stored.
    store = tmp_path / "store"
    result = run_suite(pytester, "--candidate", "vllm", "--configurations", "eager",
                       "--long-prompts", "none", "--continuation", "1000",
                       f"--reference-store={store}",
                       "--candidate-option", "enable_chunked_prefill=true",
                       "--candidate-option", "max_num_batched_tokens=4",
                       "--candidate-option", "max_num_seqs=8")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "error" and "max_num_batched_tokens" in verdict["error"]
    assert "vLLM could not start" in verdict["error"]
    cases = junit_cases(pytester.path / "junit.xml")
    assert cases and {outcome for outcome, _ in cases.values()} == {"error"}
    assert not store.exists()  # the reference's work stopped before it was whole
    assert "reference_depth" not in result.stdout.str()


NO_FLOOR_GATES = """
[precision.gates.kl_mean]
metric = "kl"
max = 0.01
"""


def test_one_run_writes_both_reports_measures_the_floor_on_request_and_trusts_code(
        pytester, read_json):
    pytester.makefile(".toml", thresholds=NO_FLOOR_GATES)
    result = run_suite(pytester, "--candidate", "hf", *QUICK, "--noise-floor", "on",
                       "--trust-remote-code", "--parity-report=report.md",
                       "--parity-report=report.html")
    assert result.ret == 0, result.stdout.str()[-2000:]
    verdict = read_json(pytester.path / "verdict.json")
    # --noise-floor on: measured although no gate reads it.
    assert verdict["noise_floor"]["views"]["first_token"]["kl_mean"] > 0
    assert "noise_floor_load_s" in verdict["timings"]
    assert verdict["protocol"]["trust_remote_code"] is True
    md = (pytester.path / "report.md").read_text()
    html = (pytester.path / "report.html").read_text()
    assert md.startswith("# llm-parity") and html.startswith("<!doctype html>")
    for text in (md, html):
        assert "PASS" in text and "kl_mean" in text


NPU_ONLY = """
[precision.gates.kl_mean]
metric = "kl"
max = 100.0

[platforms.npu.precision.gates.npu_only_cosine]
metric = "cosine"
min = 0.0
"""


def test_a_served_candidate_on_an_npu_is_judged_by_the_npu_gates(pytester, monkeypatch,
                                                                   read_json):
    pytester.makefile(".toml", thresholds=NPU_ONLY)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    from llm_parity.config.prompts import load_prompts
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    prompts = load_prompts()
    ids = tokenize_prompts(load_tokenizer(toy_model_dir()), prompts)
    with FakeServer() as server:
        server.tokenized = {p.text: i for p, i in zip(prompts.prompts, ids)}
        result = run_suite(pytester, "--candidate", "openai", "--candidate-url", server.url,
                           "--candidate-device", "npu", "--noise-floor", "off",
                           "--continuation", "0")
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["candidate"]["device"] == "npu", result.stdout.str()[-2000:]
    assert [g["name"] for g in verdict["gates"]] == ["kl_mean", "npu_only_cosine"]
    outcome, _ = junit_cases(pytester.path / "junit.xml")["test_gate[npu_only_cosine]"]
    assert outcome in ("passed", "failure")  # judged, not skipped


def test_the_stand_in_checkpoint_commands(tmp_path, capsys):
    assert main(["toy-model", str(tmp_path / "toy")]) == 0
    assert checkpoint_card(tmp_path / "toy") == checkpoint_card(toy_model_dir())
    assert main(["pleias-shape", str(tmp_path / "pleias")]) == 0
    card = checkpoint_card(tmp_path / "pleias")
    assert card["parameters"] == 353_424_384 and card["layers"] == 26
    out = capsys.readouterr().out
    assert "wrote the embedded toy model" in out and "353,424,384 parameters" in out
    config = json.loads((tmp_path / "pleias" / "config.json").read_text())
    assert config["vocab_size"] == 65536


def test_backends_come_from_the_entry_point_group(monkeypatch):
    import importlib.metadata as md

    from llm_parity.engines import base

    installed = {ep.name: ep.value for ep in md.entry_points(group=base.ENTRY_POINT_GROUP)}
    assert installed == {"hf": "llm_parity.engines.hf:HfEngine",
                         "vllm": "llm_parity.engines.vllm:VllmEngine",
                         "openai": "llm_parity.engines.openai:OpenAIEngine"}
    extra = md.EntryPoint("paced", "paced_engine:PacedEngine", base.ENTRY_POINT_GROUP)
    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda **kw: (
        [*real(**kw), extra] if kw.get("group") == base.ENTRY_POINT_GROUP else real(**kw)))
    assert "paced" in base.backends()
    assert base.engine_class("paced").__name__ == "PacedEngine"  # tests/paced_engine.py


def test_a_bad_tensor_parallel_size_stops_before_any_model(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--tensor-parallel-size", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--tensor-parallel-size: expected a positive integer, got 0" in result.stderr.str()


def test_the_tensor_parallel_size_is_recorded(pytester, read_json):
    result = run_suite(pytester, "--candidate", "hf", *QUICK, "--continuation", "0",
                       "--noise-floor", "off", "--tensor-parallel-size", "2")
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert read_json(pytester.path / "verdict.json")["protocol"]["tensor_parallel_size"] == 2
