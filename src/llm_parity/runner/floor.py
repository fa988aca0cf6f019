"""The bf16 noise floor of a run: whether it is wanted, read from the golden store, or
measured.

Measuring it runs Transformers in the candidate's dtype over every prompt and view, which
exposes the whole vocabulary at each of its ~2,100 positions. The floor keeps only the
per-position comparisons with the reference (compare/noise_floor.py), so each prompt is
asked alone and compared as soon as it is answered: one prompt's vocabulary rows exist at a
time, never the floor's whole set beside the reference's. The numbers are the ones a single
call over every prompt gives (the engine scores each sequence on its own either way).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from llm_parity.compare.answers import check_depth_lengths, check_next_token
from llm_parity.compare.gates import VIEWS
from llm_parity.compare.noise_floor import NoiseFloor
from llm_parity.config.options import Settings
from llm_parity.config.thresholds import Thresholds
from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.engines.progress import phase
from llm_parity.errors import EngineError
from llm_parity.runner.calls import check_tokenization


def floor_of_run(settings, thresholds, store, key, reference_spec, token_ids, depth, k,
                 timings, vocab_size, depth_sequences, compare, stored_only=False):
    """The bf16 floor's per-position values, from the store or measured (once per run).
    With `stored_only` (pytest-xdist workers) it must come from the store: every worker
    measuring it would race to write the same file."""
    if not _floor_wanted(settings, thresholds):
        return None
    noise_floor = store.load_floor(key, settings.candidate_dtype, k) if store else None
    if noise_floor is not None:
        return noise_floor
    if stored_only:
        raise EngineError(
            f"the golden store {store.path if store else '(none)'} holds no noise floor for "
            f"{settings.candidate_dtype} at --logprobs {k} that matches this reference; under "
            "pytest -n the workers read it and never measure it: build it once with "
            "llm-parity reference build (without --noise-floor off)")
    floor_spec = replace(reference_spec, dtype=settings.candidate_dtype,
                         role=f"noise floor (hf {settings.candidate_dtype})")
    noise_floor = measure_floor(floor_spec, settings, token_ids, depth, depth_sequences, k,
                                timings, vocab_size, compare)
    if store is not None:
        store.save_floor(key, noise_floor)
    return noise_floor


def measure_floor(spec: EngineSpec, settings, token_ids, depth, sequences, k: int,
                  timings: dict[str, float], vocab_size: int, compare) -> NoiseFloor:
    """Build the floor engine, ask it batch by batch, check and compare each batch's answers
    with the reference at once, and keep the comparisons only; release the engine."""
    role = "noise_floor"
    started = time.perf_counter()
    engine = build_engine("hf", spec)
    timings[f"{role}_load_s"] = time.perf_counter() - started
    compared: dict[str, list] = {view: [] for view in VIEWS}

    def checked(prompt_id: str, views, kind: str = "") -> None:
        for j, view in enumerate(views):
            where = f" ({kind}, position {j})" if kind else ""
            check_next_token(view, k=k, vocab_size=vocab_size,
                             where=f"{spec.role}, prompt {prompt_id}{where}")

    try:
        check_tokenization(engine, settings, token_ids, depth)
        started = time.perf_counter()
        prompts = settings.prompts.prompts
        with phase(f"{spec.role}: first token", len(token_ids)) as done:
            for group in _groups(len(token_ids), spec.batch):
                answer = engine.next_token([token_ids[i] for i in group], k)
                if len(answer) != len(group):
                    raise EngineError(f"{spec.role}: answered {len(answer)} prompts of "
                                      f"{len(group)}")
                for i, one in zip(group, answer):
                    checked(prompts[i].id, [one])
                compared["first_token"] += compare.views({"first": answer}, first=list(group),
                                                         depth=[])["first_token"]
                del answer  # this batch's rows go before the next batch's come
                done(len(group))
        timings[f"{role}_first_token_s"] = time.perf_counter() - started
        if depth:
            started = time.perf_counter()
            with phase(f"{spec.role}: depth, {settings.continuation} tokens each",
                       len(depth[1])) as done:
                for group in _groups(len(depth[1]), spec.batch):
                    part = ([depth[0][j] for j in group], [depth[1][j] for j in group])
                    part_sequences = [sequences[j] for j in group]
                    answers = {"first": [],
                               "sequence": engine.score(part_sequences,
                                                        [len(ids) - 1 for ids in part[1]], k),
                               "decode": engine.greedy(part[1], settings.continuation, k)}
                    check_depth_lengths(spec.role, part, answers, part_sequences,
                                        settings.continuation)
                    for n, prompt in enumerate(part[0]):
                        checked(prompt.id, answers["sequence"][n], "sequence")
                        checked(prompt.id, answers["decode"][n].steps, "decode")
                    views = compare.views(answers, first=[], depth=list(group))
                    compared["sequence"] += views["sequence"]
                    compared["decode"] += views["decode"]
                    del answers, views  # this batch's rows go before the next batch's come
                    done(len(group))
            timings[f"{role}_depth_s"] = time.perf_counter() - started
        info: dict[str, Any] = engine.describe()
    finally:
        engine.close()
    return NoiseFloor.from_views(compared, k=k, dtype=settings.candidate_dtype,
                                 device=info["device"])


def _groups(count: int, size: int) -> list[range]:
    """The engine's batches (engines/hf.py cuts the same grid), so each call is one batch."""
    return [range(start, min(start + size, count)) for start in range(0, count, max(1, size))]


def floor_skip_reason(settings: Settings) -> str | None:
    """Why gates relative to the noise floor cannot be judged in this run, if they cannot."""
    if settings.noise_floor == "off":
        return "the noise floor is off (--noise-floor off)"
    if settings.candidate_dtype == settings.reference_dtype:
        return (f"the candidate runs in the reference's dtype ({settings.candidate_dtype}): "
                "there is no rounding floor to measure")
    return None


def _floor_wanted(settings: Settings, thresholds: Thresholds) -> bool:
    if floor_skip_reason(settings) is not None:
        return False
    if settings.noise_floor == "on":
        return True
    return any(g.relative_to for g in (*thresholds.gates, *thresholds.prompt_gates))
