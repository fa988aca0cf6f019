"""One engine's calls over a run's prompts (started, asked each kind of question once,
released), and the prompts the depth views continue.
"""

from __future__ import annotations

import time
from typing import Any

from llm_parity.compare.answers import check_depth_lengths, check_next_token
from llm_parity.config.options import Settings
from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.errors import EngineError, ParityInputError


def start_engine(backend: str, spec: EngineSpec, timings: dict[str, float], role: str) -> Any:
    """Build one engine, its start timed as `{role}_load_s`."""
    started = time.perf_counter()
    engine = build_engine(backend, spec)
    timings[f"{role}_load_s"] = time.perf_counter() - started
    return engine


def check_tokenization(engine: Any, settings: Settings, token_ids, depth) -> None:
    """The engine's own tokenizer gives every prompt the ids the run scores (each prompt
    once, first-token and depth sets together)."""
    named = {p.id: (p.id, p.text, ids) for p, ids in zip(settings.prompts.prompts, token_ids)}
    if depth:
        named.update((p.id, (p.id, p.text, ids)) for p, ids in zip(*depth))
    engine.check_tokenization(list(named.values()))


def run_engine(
    backend: str,
    spec: EngineSpec,
    token_ids: list[list[int]],
    depth: tuple[list, list[list[int]]] | None,
    k: int,
    settings: Settings,
    timings: dict[str, float],
    role: str,
    vocab_size: int | None = None,
    sequences: list[list[int]] | None = None,
    kept: dict[str, Any] | None = None,
    runs: int = 1,
    engine: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build one engine, make each kind of call once over every prompt, release it. With
    `runs` > 1 each call is made that many times and the last answers are kept (a warm
    prefix cache answers the later runs).

    The reference continues the depth prompts greedily ("decoded"); the candidate scores
    those continued sequences (teacher-forced) and decodes freely itself. `engine`: one
    started already (start_engine), used in place of building one.
    """
    if engine is None:
        engine = start_engine(backend, spec, timings, role)
    answers: dict[str, Any] = {}
    try:
        check_tokenization(engine, settings, token_ids, depth)
        started = time.perf_counter()
        for _ in range(runs):
            answers["first"] = engine.next_token(token_ids, k)
        timings[f"{role}_first_token_s"] = time.perf_counter() - started
        if depth:
            started = time.perf_counter()
            prompt_ids = depth[1]
            for _ in range(runs):
                if sequences is None:
                    answers["decoded"] = engine.greedy(prompt_ids, settings.continuation, k)
                else:
                    starts = [len(ids) - 1 for ids in prompt_ids]
                    answers["sequence"] = engine.score(sequences, starts, k)
                    answers["decode"] = engine.greedy(prompt_ids, settings.continuation, k)
            timings[f"{role}_depth_s"] = time.perf_counter() - started
        info = engine.describe()
    except BaseException:
        engine.close()
        raise
    if kept is None:
        engine.close()
    else:
        kept[role] = engine
    first = answers["first"]
    if len(first) != len(token_ids):
        raise EngineError(f"{spec.role}: answered {len(first)} prompts of {len(token_ids)}")
    if first and first[0].full_logprobs is not None:
        vocab_size = len(first[0].full_logprobs)
    checks = [(p.id, "", a) for p, a in zip(settings.prompts.prompts, first)]
    if depth:
        check_depth_lengths(spec.role, depth, answers, sequences, settings.continuation)
        for kind in ("decoded", "sequence", "decode"):
            for prompt, views in zip(depth[0], answers.get(kind, [])):
                steps = views.steps if hasattr(views, "steps") else views
                checks += [(prompt.id, f" ({kind}, position {j})", v) for j, v in enumerate(steps)]
    for prompt_id, where, answer in checks:
        check_next_token(
            answer, k=k, vocab_size=vocab_size or k, where=f"{spec.role}, prompt {prompt_id}{where}"
        )
    return answers, info


def depth_prompts(settings: Settings, tokenizer: Any, card: dict[str, Any]):
    """(prompts, token ids) that the depth views continue, or None when depth is off."""
    from llm_parity.runner.tokenization import tokenize_prompts

    if settings.continuation == 0:
        return None
    sets = [settings.prompts] + ([settings.long_prompts] if settings.long_prompts else [])
    prompts = [p for prompt_set in sets for p in prompt_set.prompts]
    ids = [i for prompt_set in sets for i in tokenize_prompts(tokenizer, prompt_set)]
    limit = card.get("max_position_embeddings")
    for prompt, prompt_ids in zip(prompts, ids):
        if limit and len(prompt_ids) + settings.continuation > limit:
            raise ParityInputError(
                f"prompt {prompt.id} has {len(prompt_ids)} tokens; with a continuation of "
                f"{settings.continuation} it exceeds the model's {limit} positions "
                "(shorten it, or lower --continuation)"
            )
    return prompts, ids
