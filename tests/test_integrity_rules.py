"""Verdict integrity, the rules themselves: each test here failed on the code before the
rule it names was fixed (see the verdict-integrity notes in docs/notes/foundation.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.compare.gates import Gate, Thresholds
from llm_parity.compare.noise_floor import NoiseFloor
from llm_parity.compare.precision import compare_decodes, compare_prompts, judge
from llm_parity.config.prompts import Prompt

MARGIN = 0.3
K = 4


def _view(probs) -> NextToken:
    logprobs = np.log(np.asarray(probs, dtype=np.float64))
    top = np.argsort(-logprobs)[:K]
    return NextToken(top, logprobs[top], logprobs)


def _flip(reference_probs, chosen: int) -> tuple[NextToken, NextToken]:
    """The reference's view, and a candidate whose rank 1 is token `chosen`."""
    reference = _view(reference_probs)
    probs = np.asarray(reference_probs, dtype=np.float64).copy()
    probs[chosen] = probs.max() * 1.5
    return reference, _view(probs / probs.sum())


PROMPT = Prompt("p1", "some text")
TAIL = [0.2 / 6] * 6  # the rest of a small vocabulary


def _first(reference, candidate):
    return compare_prompts([PROMPT], [[1, 2, 3]], [reference], [candidate],
                           near_tie_margin=MARGIN, k=K)[0].first


def test_a_flip_to_a_token_far_below_the_reference_top_is_a_defect():
    # The reference's rank 1 and rank 2 are 0.07 nats apart, but the candidate chose a token
    # 2.7 nats below the top: the narrow rank-2 gap must not excuse it.
    reference, candidate = _flip([0.30, 0.28, 0.20, 0.02, *TAIL[:1], 0.2 - 0.2 / 6], 3)
    position = _first(reference, candidate)
    assert position.comparison.top1_margin < MARGIN
    assert position.comparison.choice_gap == pytest.approx(math.log(0.30 / 0.02))
    assert not position.near_tie and position.defect


def test_a_true_near_tie_is_still_excused():
    reference, candidate = _flip([0.30, 0.28, 0.20, 0.02, *TAIL[:1], 0.2 - 0.2 / 6], 1)
    position = _first(reference, candidate)
    assert position.comparison.choice_gap == pytest.approx(math.log(0.30 / 0.28))
    assert position.near_tie and not position.defect
    # A flip to rank 3 inside the margin is a near-tie too: the gap decides, not the rank.
    close = [0.30, 0.29, 0.28, 0.02, 0.06, 0.05]
    reference, candidate = _flip(close, 2)
    assert _first(reference, candidate).near_tie


def test_the_founding_top1_gate_excuses_only_true_near_ties():
    gate = Gate("top1_match_rate", "top1_match", "rate", "min", 1.0, excuse_near_ties=True)
    thresholds = Thresholds("t.toml", (gate,), (), MARGIN)
    far = compare_prompts([PROMPT], [[1, 2]], *[[v] for v in _flip(
        [0.30, 0.28, 0.20, 0.02, 0.1, 0.1], 3)], near_tie_margin=MARGIN, k=K)
    result = judge({"first_token": far}, thresholds, k=K)
    assert result.gate_results[0].value == 0.0 and not result.passed


def test_decode_divergence_is_judged_on_the_token_the_candidate_chose():
    reference_steps = [_view([0.30, 0.28, 0.20, 0.02, 0.1, 0.1])]
    far = _flip([0.30, 0.28, 0.20, 0.02, 0.1, 0.1], 3)[1]
    results = compare_decodes(
        [PROMPT], [[1, 2]], [Decoded([0], reference_steps)], [Decoded([3], [far])],
        near_tie_margin=MARGIN, k=K)
    divergence = results[0].divergence
    assert divergence is not None and divergence.step == 0
    assert divergence.reference_margin < MARGIN < divergence.choice_gap
    assert not divergence.near_tie


def test_a_candidate_decode_shorter_than_the_reference_is_refused():
    steps = [_view([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])] * 3
    with pytest.raises(ValueError):
        compare_decodes([PROMPT], [[1, 2]], [Decoded([0, 0, 0], steps)],
                        [Decoded([0, 0], steps[:2])], near_tie_margin=MARGIN, k=K)


def _floor_result(conservative: bool):
    """Six prompts whose candidate KL is 1.5x the floor's on average, with one prompt far
    worse: the point ratio is under 3, the unsafe end of its interval is not."""
    gate = Gate("kl_vs_floor", "kl", "mean", "max", 3.0, relative_to="noise_floor",
                conservative=conservative)
    thresholds = Thresholds("t.toml", (gate,), (), MARGIN)
    ids = [f"p{i}" for i in range(6)]
    candidate_kl = [0.001] * 5 + [0.012]
    floor_kl = 0.001
    reference = _view([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    prompts = [Prompt(i, "x") for i in ids]
    compared = compare_prompts(prompts, [[1, 2]] * 6, [reference] * 6, [reference] * 6,
                               near_tie_margin=MARGIN, k=K)
    from dataclasses import replace

    compared = [replace(r, positions=(replace(r.first, comparison=replace(
        r.first.comparison, kl=kl)),)) for r, kl in zip(compared, candidate_kl)]
    floor = NoiseFloor("bfloat16", "cpu", K, {"first_token": {
        i: {"kl": [floor_kl]} for i in ids}})
    return judge({"first_token": compared}, thresholds, k=K, noise_floor=floor)


def test_conservative_applies_to_gates_relative_to_the_floor():
    plain = _floor_result(conservative=False).gate_results[0]
    careful = _floor_result(conservative=True).gate_results[0]
    assert plain.value == pytest.approx((5 * 0.001 + 0.012) / 6 / 0.001, rel=1e-3)
    assert plain.passed
    # The conservative reading is the interval's unsafe (upper) end, and it fails.
    assert careful.interval is not None and careful.value == careful.interval[1]
    assert careful.value > 3.0 and not careful.passed
    assert careful.as_dict()["conservative"] is True


def test_a_per_prompt_floor_gate_divides_by_at_least_the_pooled_floor():
    """A prompt whose own floor is far below the run's (rounding's rare large events, such
    as a MoE router flip, fell on other prompts in the floor) is divided by the floor
    pooled over every prompt; a prompt worse than that by the gate's bound still fails."""
    from dataclasses import replace

    from llm_parity.compare.noise_floor import ratio

    gate = Gate("kl_vs_floor", "kl", "mean", "max", 10.0, relative_to="noise_floor")
    thresholds = Thresholds("t.toml", (), (gate,), MARGIN)
    ids = [f"p{i}" for i in range(4)]
    reference = _view([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    prompts = [Prompt(i, "x") for i in ids]
    compared = compare_prompts(prompts, [[1, 2]] * 4, [reference] * 4, [reference] * 4,
                               near_tie_margin=MARGIN, k=K)
    candidate_kl = [0.0015, 0.0004, 0.0004, 0.05]
    compared = [replace(r, positions=(replace(r.first, comparison=replace(
        r.first.comparison, kl=kl)),)) for r, kl in zip(compared, candidate_kl)]
    floor_kl = {"p0": 0.00005, "p1": 0.0004, "p2": 0.0004, "p3": 0.0004}  # pooled 3.1e-4
    floor = NoiseFloor("bfloat16", "cpu", K, {"first_token": {
        i: {"kl": [v]} for i, v in floor_kl.items()}})
    result = judge({"first_token": compared}, thresholds, k=K, noise_floor=floor)
    by_id = {r.prompt.id: r.gate_results[0] for r in result.prompts}
    assert by_id["p0"].passed  # 30x its own floor, 4.8x the pooled one
    assert by_id["p0"].floor_value == pytest.approx(0.0003125)
    assert by_id["p0"].value == pytest.approx(ratio(0.0015, 0.0003125))
    assert by_id["p1"].floor_value == pytest.approx(0.0004)  # its own, the larger
    assert not by_id["p3"].passed  # 125x: one bad prompt still cannot hide


def test_a_run_that_judges_no_gate_does_not_pass():
    gate = Gate("kl_vs_floor", "kl", "mean", "max", 3.0, relative_to="noise_floor")
    thresholds = Thresholds("t.toml", (gate,), (), MARGIN)
    reference = _view([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    compared = compare_prompts([PROMPT], [[1, 2]], [reference], [reference],
                               near_tie_margin=MARGIN, k=K)
    result = judge({"first_token": compared}, thresholds, k=K, floor_missing="it is off")
    assert not result.gate_results and result.not_judged
    assert result.judged == 0 and not result.passed
    empty = judge({"first_token": compared}, Thresholds("t.toml", (), (), MARGIN), k=K)
    assert empty.judged == 0 and not empty.passed


def test_the_golden_key_records_where_the_reference_computes():
    # Before, the key held the device asked for ("auto", or "cpu" beside a device map that
    # placed the layers elsewhere), so a store could be replayed as if made elsewhere.
    import torch

    from llm_parity.engines.base import EngineSpec
    from llm_parity.engines.hf import HfEngine

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert HfEngine.compute_device(EngineSpec(model="m", device="auto")) == here
    assert HfEngine.compute_device(EngineSpec(model="m", device="cpu")) == "cpu"
    mapped = EngineSpec(model="m", device="cpu", options={"device_map": "auto"})
    assert HfEngine.compute_device(mapped) == "device_map:" + ",".join(sorted({here, "cpu"}))
    table = EngineSpec(model="m", options={"device_map": {"model": "cpu", "lm_head": "disk"}})
    assert HfEngine.compute_device(table) == "device_map:cpu"


def test_a_divergence_on_a_tie_the_sampler_broke_otherwise_is_a_near_tie():
    # Seen on SmolLM2 with vLLM: at a bf16 tie the sampler decoded one token while the
    # returned log-probs ranked the other first. The divergence is judged on the token
    # decoded, as the reference ranks it: here 0.03 below its top-1, a near-tie.
    reference = _view([0.31, 0.30, 0.19, 0.1, 0.05, 0.05])
    results = compare_decodes(
        [PROMPT], [[1, 2]], [Decoded([0], [reference])], [Decoded([1], [reference])],
        near_tie_margin=MARGIN, k=K)
    divergence = results[0].divergence
    assert divergence.choice_gap == pytest.approx(math.log(0.31 / 0.30))
    assert divergence.near_tie
