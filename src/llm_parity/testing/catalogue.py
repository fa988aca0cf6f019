"""Localization on the mutant catalogue: for each broken copy of a checkpoint, does the
first diverging point compare/localize.py names match where the mutant broke it
(`mutants.LOCATIONS`), and do the benign copies name nothing?

The reference (float32) and the floor (Transformers in bfloat16) are captured once per
prompt, on the prompt continued 32 tokens by the reference, at those 32 positions (the
suite's teacher-forced view). Each candidate is captured the way the suite does it
(Transformers hooks, or the vLLM worker extension in eager mode). Whether its output
distributions failed is the suite's sequence_kl_vs_floor gate in small (mean KL over the
same positions above 3x the floor's); it decides only whether "nothing diverged" reads as
"the output head". Of several prompts, the earliest point any names is the answer, as in
the suite.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_parity.compare.localize import Localization, LocalizeSettings, earliest, localize
from llm_parity.compare.metrics import compare_position
from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.testing.mutants import (
    BENIGN,
    CATALOGUE,
    LOCATIONS,
    expected_location,
    location_matches,
    make_mutant,
)

CONTINUATION = 32
GATE = 3.0  # sequence_kl_vs_floor's bound in the packaged thresholds
NAMES = ("correct", *LOCATIONS, *BENIGN)


@dataclass
class Baseline:
    """One prompt's reference and floor, captured once for every candidate."""

    prompt_id: str
    ids: list[int]
    positions: list[int]
    reference: dict[str, Any]
    reference_views: list
    floor: dict[str, Any]
    floor_kl: float


def _sequence(model: Path, prompt_id: str) -> tuple[list[int], list[int]]:
    from llm_parity.config.prompts import load_prompts, packaged_prompts_path
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    prompts = load_prompts(packaged_prompts_path("rag_long" if prompt_id.startswith("long")
                                                 else "rag25"))
    prompt = next(p for p in prompts.prompts if p.id == prompt_id)
    ids = tokenize_prompts(load_tokenizer(model, False),
                           type(prompts)(prompts.name, prompts.source, (prompt,)))[0]
    with build_engine("hf", EngineSpec(model=str(model), dtype="float32", device="cpu")) as e:
        decoded = e.greedy([ids], CONTINUATION, 20)[0]
    full = list(ids) + list(decoded.token_ids)
    return full, list(range(len(ids) - 1, len(full) - 1))


def mean_kl(reference_views: Sequence, views: Sequence) -> float:
    kls = [compare_position(r.full_logprobs, v.token_ids, v.logprobs, v.full_logprobs).kl
           for r, v in zip(reference_views, views)]
    return sum(kls) / len(kls)


def baselines(source: Path, prompt_ids: Sequence[str]) -> list[Baseline]:
    out = []
    for prompt_id in prompt_ids:
        ids, positions = _sequence(source, prompt_id)
        captured = {}
        for dtype in ("float32", "bfloat16"):
            with build_engine("hf", EngineSpec(model=str(source), dtype=dtype,
                                               device="cpu")) as engine:
                captured[dtype] = (engine.capture(ids, positions),
                                   engine.score([ids], [positions[0]], 20)[0])
        (reference, reference_views), (floor, floor_views) = captured["float32"], \
            captured["bfloat16"]
        out.append(Baseline(prompt_id, ids, positions, reference, reference_views, floor,
                            mean_kl(reference_views, floor_views)))
    return out


def localize_candidate(backend: str, model: Path, tokenizer: Path, base: Sequence[Baseline],
                       ratio: float = LocalizeSettings.ratio) -> tuple[Localization, dict]:
    """One candidate checkpoint localized on every baseline prompt: the answer and
    its costs (engine load, capture time, the largest KL ratio)."""
    options = {"enforce_eager": True, "enable_prefix_caching": False} \
        if backend == "vllm" else {}
    spec = EngineSpec(model=str(model), tokenizer=str(tokenizer), dtype="bfloat16",
                      device="cpu" if backend == "hf" else "auto", options=options)
    started = time.perf_counter()
    engine = build_engine(backend, spec)
    costs = {"load_s": time.perf_counter() - started, "capture_s": 0.0}
    results = []
    try:
        for b in base:
            started = time.perf_counter()
            points = engine.capture(b.ids, b.positions)
            costs["capture_s"] += time.perf_counter() - started
            views = engine.score([b.ids], [b.positions[0]], 20)[0]
            kl_ratio = mean_kl(b.reference_views, views) / b.floor_kl
            costs["kl_vs_floor"] = max(costs.get("kl_vs_floor", 0.0), kl_ratio)
            results.append(localize(b.reference, points, b.floor, dtype="bfloat16",
                                    limit=ratio, prompt_id=b.prompt_id, view="sequence",
                                    positions=b.positions, output_failed=kl_ratio > GATE))
    finally:
        engine.close()
    return earliest(results), costs


def run_catalogue(source: Path, backend: str, work: Path, *,
                  prompt_ids: Sequence[str] = ("rag-01", "long-01"),
                  names: Sequence[str] = NAMES, ratio: float = LocalizeSettings.ratio,
                  report: Any = None) -> dict[str, dict]:
    """Every named mutant (and "correct", the checkpoint itself) localized; a row each."""
    import json

    config = json.loads((source / "config.json").read_text())
    base = baselines(source, prompt_ids)
    rows = {}
    for name in names:
        model = source
        if name != "correct":
            model = work / name
            shutil.rmtree(model, ignore_errors=True)
            make_mutant(source, model, name)
        try:
            result, costs = localize_candidate(backend, model, source, base, ratio)
        finally:
            if name != "correct":
                shutil.rmtree(model, ignore_errors=True)
        expected = expected_location(name, config)
        named = next((p for p in result.points
                      if p.layer == result.layer and p.module == result.module), None)
        rows[name] = {
            "broken": CATALOGUE.get(name, (None, False))[1], "expected": expected,
            "found": [result.layer, result.module], "where": result.where,
            "right": location_matches(expected, result), "prompt": result.prompt_id,
            "ratio_at_found": named.ratio if named else None,
            "peak_ratio": max(p.ratio for p in result.points),
            "max_ratio_before": _max_before(result),
            "captured_bytes": result.captured_bytes, **costs,
        }
        if report is not None:
            report(name, rows[name])
    return rows


def _max_before(result: Localization) -> float | None:
    """The largest ratio along the residual stream before the point named (every point's,
    when nothing is named)."""
    if not result.diverged:
        return max(p.ratio for p in result.points)
    if result.module == "embed":
        return None
    before = [p.ratio for p in result.points if p.module == "embed" or (
        p.module == "output" and (result.layer is None or p.layer < result.layer))]
    return max(before, default=None)
