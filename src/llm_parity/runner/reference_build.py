"""`llm-parity reference build`: the golden store of a model and prompt set, with no
candidate, on the machine that has the memory (or in shards over prompt ranges on several
machines, merged with `llm-parity reference merge`). A test run anywhere replays it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from llm_parity.config.options import Settings
from llm_parity.config.prompts import PromptSet
from llm_parity.engines.base import EngineSpec, engine_class
from llm_parity.errors import SettingsError
from llm_parity.runner.calls import depth_prompts, run_engine
from llm_parity.runner.comparison import Comparison
from llm_parity.runner.floor import floor_of_run
from llm_parity.runner.golden import reference_store, shard_range
from llm_parity.runner.models import checkpoint_card, resolve_model
from llm_parity.runner.precision import platform_of


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' (1 <= I <= N) as (index from 0, N)."""
    if not text:
        return None
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise SettingsError(f"--shard: expected I/N with 1 <= I <= N, e.g. 1/4, got {text!r}")
    return i - 1, n


def build_reference(settings: Settings, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Compute the float32 reference (and the noise floor in the candidate's dtype, unless
    --noise-floor off) into settings.reference_store; a shard takes its share of the
    first-token prompts and of the depth prompts."""
    if settings.reference_store is None:
        raise SettingsError("llm-parity reference build needs the store directory to write")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    model = resolve_model(settings.model, "--model")
    card = checkpoint_card(model.path)
    k = settings.logprobs
    spec = EngineSpec(model=str(model.path), dtype=settings.reference_dtype,
                      device=settings.reference_device,
                      trust_remote_code=settings.trust_remote_code, role="reference (hf)",
                      logprobs=k, options=dict(settings.reference_options),
                      batch=settings.batch)
    engine_class("hf").preflight(spec)
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    tokenizer = load_tokenizer(model.path, settings.trust_remote_code)
    token_ids = tokenize_prompts(tokenizer, settings.prompts)
    depth = depth_prompts(settings, tokenizer, card)
    extra = None
    if shard is not None:
        index, count = shard
        first = shard_range(len(token_ids), index, count, settings.batch)
        prompts = settings.prompts
        settings = replace(settings, prompts=PromptSet(
            prompts.name, prompts.source, tuple(prompts.prompts[i] for i in first)))
        token_ids = [token_ids[i] for i in first]
        if depth:
            rows = shard_range(len(depth[1]), index, count, settings.batch)
            depth = ([depth[0][i] for i in rows], [depth[1][i] for i in rows])
        extra = {"shard": {
            "index": index, "count": count,
            "first_token": [[p.id, ids] for p, ids in zip(settings.prompts.prompts, token_ids)],
            "depth": [[p.id, ids] for p, ids in zip(*depth)] if depth else []}}
    from llm_parity.runner import budget

    budget.check(card, settings, token_ids, depth, reference_stored=False,
                 floor=settings.noise_floor != "off"
                 and settings.candidate_dtype != settings.reference_dtype,
                 candidate_backend="none", building=True)  # before the model loads
    store, key = reference_store(settings, model, card, token_ids, depth, spec)
    answers, info = run_engine("hf", spec, token_ids, depth, k, settings, timings, "reference")
    store.save(key, answers, info, extra)
    floor = None
    if settings.noise_floor != "off" and settings.candidate_dtype != settings.reference_dtype:
        thresholds = settings.thresholds(platform_of(info["device"]), settings.model or model.name)
        compare = Comparison(settings, tokenizer, token_ids, depth, answers, thresholds, k)
        sequences = ([ids + d.token_ids for ids, d in zip(depth[1], answers["decoded"])]
                     if depth else [])
        vocab_size = len(answers["first"][0].full_logprobs)
        floor = floor_of_run(replace(settings, noise_floor="on"), thresholds, store, key, spec,
                             token_ids, depth, k, timings, vocab_size, sequences, compare)
    return {
        "store": str(store.path), "model": model.name,
        "shard": f"{shard[0] + 1}/{shard[1]}" if shard else None,
        "first_token_prompts": len(token_ids), "depth_prompts": len(depth[1]) if depth else 0,
        "continuation": settings.continuation if depth else 0,
        "noise_floor": settings.candidate_dtype if floor is not None else None,
        "placement": info.get("placement"), "timings": timings,
        "seconds": time.perf_counter() - started,
    }
