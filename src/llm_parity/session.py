"""One state object per pytest session: settings, the precision run (done once, on first
need), the environment it ran in, and the outputs written at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llm_parity.config import Settings
from llm_parity.engines.base import (
    EngineError,
    EngineSpec,
    build_engine,
    check_next_token,
    engine_class,
)
from llm_parity.models import ModelError, ResolvedModel, checkpoint_card, resolve_model
from llm_parity.precision import PrecisionResult, compare_prompts
from llm_parity.thresholds import Thresholds, load_thresholds


class ParityInputError(ValueError):
    """Inputs that cannot be compared (e.g. tokenizers that disagree)."""


# What a failed run raises to the tests: each message is enough on its own.
RUN_ERRORS = (EngineError, ModelError, ParityInputError)


@dataclass
class Run:
    """What the precision run produced, kept for reports."""

    reference_model: ResolvedModel
    candidate_model: ResolvedModel
    candidate: dict[str, Any]
    reference: dict[str, Any]
    thresholds: Thresholds
    precision: PrecisionResult
    token_ids: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)


class ParitySession:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run: Run | None = None
        self.error: BaseException | None = None
        self.environment: dict[str, Any] = {}
        self._attempted = False

    def gate_names(self) -> list[str]:
        """Every gate name the file can produce, on any platform, for this model."""
        from llm_parity.thresholds import PLATFORMS

        names: dict[str, None] = {}
        for platform in (None, *PLATFORMS):
            thresholds = load_thresholds(
                self.settings.thresholds_path, platform=platform, model=self.settings.model
            )
            names.update((gate.name, None) for gate in thresholds.gates)
        return list(names)

    def precision(self) -> Run:
        """Run the comparison once; later calls return it, or raise the same error."""
        if not self._attempted:
            self._attempted = True
            try:
                self.run = run_precision(self.settings, self.environment)
            except BaseException as exc:
                self.error = exc
                raise
        if self.error is not None:
            raise self.error
        assert self.run is not None
        return self.run


def resolve_candidate_backend(name: str) -> str:
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def platform_of(device: str) -> str:
    return device.split(":")[0]


def run_precision(settings: Settings, environment: dict[str, Any]) -> Run:
    from llm_parity.environment import collect_environment
    from llm_parity.tokenization import load_tokenizer, token_text, tokenize_prompts

    timings: dict[str, float] = {}
    started = time.perf_counter()
    reference_model = resolve_model(settings.model, "--model")
    candidate_model = (
        resolve_model(settings.candidate_model, "--candidate-model")
        if settings.candidate_model
        else reference_model
    )
    card = checkpoint_card(reference_model.path)
    backend = resolve_candidate_backend(settings.candidate)

    k = settings.logprobs
    reference_spec = EngineSpec(
        model=str(reference_model.path),
        dtype=settings.reference_dtype,
        device=settings.reference_device,
        trust_remote_code=settings.trust_remote_code,
        role="reference (hf)",
        logprobs=k,
    )
    candidate_spec = EngineSpec(
        model=str(candidate_model.path),
        tokenizer=str(candidate_model.path),
        dtype=settings.candidate_dtype,
        device=settings.candidate_device,
        trust_remote_code=settings.trust_remote_code,
        tensor_parallel_size=settings.tensor_parallel_size,
        options=dict(settings.candidate_options),
        role=f"candidate ({backend})",
        logprobs=k,
    )
    # Before anything heavy: is every asked device here, does the backend import?
    engine_class("hf").preflight(reference_spec)
    engine_class(backend).preflight(candidate_spec)

    # Tokenize once with the reference tokenizer; the candidate scores the same ids.
    tokenizer = load_tokenizer(reference_model.path, settings.trust_remote_code)
    token_ids = tokenize_prompts(tokenizer, settings.prompts)
    if candidate_model.path != reference_model.path:
        from llm_parity.tokenization import check_same_tokenization

        check_same_tokenization(
            tokenizer,
            load_tokenizer(candidate_model.path, settings.trust_remote_code),
            settings.prompts,
            token_ids,
        )
    timings["prepare_s"] = time.perf_counter() - started

    reference, reference_info = _score(
        "hf", reference_spec, token_ids, k, settings, timings, "reference"
    )
    candidate, candidate_info = _score(
        backend, candidate_spec, token_ids, k, settings, timings, "candidate",
        vocab_size=len(reference[0].full_logprobs),
    )

    started = time.perf_counter()
    thresholds = load_thresholds(
        settings.thresholds_path,
        platform=platform_of(candidate_info["device"]),
        model=settings.model or reference_model.name,
    )
    precision = compare_prompts(
        settings.prompts.prompts,
        token_ids,
        reference,
        candidate,
        thresholds,
        k=k,
        decode=lambda token: token_text(tokenizer, token),
    )
    timings["compare_s"] = time.perf_counter() - started
    environment.update(
        collect_environment(
            model=reference_model,
            card=card,
            candidate=candidate_info,
        )
    )
    return Run(
        reference_model=reference_model,
        candidate_model=candidate_model,
        candidate=candidate_info,
        reference=reference_info,
        thresholds=thresholds,
        precision=precision,
        token_ids=token_ids,
        timings=timings,
        card=card,
    )


def _score(
    backend: str,
    spec: EngineSpec,
    token_ids: list[list[int]],
    k: int,
    settings: Settings,
    timings: dict[str, float],
    role: str,
    vocab_size: int | None = None,
) -> tuple[list, dict[str, Any]]:
    """Build one engine, score every prompt in one call, release it."""
    started = time.perf_counter()
    engine = build_engine(backend, spec)
    timings[f"{role}_load_s"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        answers = engine.next_token(token_ids, k)
        timings[f"{role}_forward_s"] = time.perf_counter() - started
        info = engine.describe()
    finally:
        engine.close()
    if len(answers) != len(token_ids):
        raise EngineError(f"{spec.role}: answered {len(answers)} prompts of {len(token_ids)}")
    if answers and answers[0].full_logprobs is not None:
        vocab_size = len(answers[0].full_logprobs)
    for prompt, answer in zip(settings.prompts.prompts, answers):
        check_next_token(
            answer, k=k, vocab_size=vocab_size or k, where=f"{spec.role}, prompt {prompt.id}"
        )
    return answers, info

