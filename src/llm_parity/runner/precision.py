"""The precision run: resolve the model, tokenize once, run the reference (or read its
golden store), the candidate and the noise floor on the same token ids, compare.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from llm_parity.compare.answers import check_depth_lengths, check_next_token
from llm_parity.compare.precision import (
    PrecisionResult,
    PromptResult,
    compare_decodes,
    compare_prompts,
    compare_sequences,
    judge,
)
from llm_parity.config.configurations import Configuration
from llm_parity.config.options import Settings
from llm_parity.config.thresholds import Thresholds
from llm_parity.engines.base import (
    EngineSpec,
    build_engine,
    engine_class,
    resolve_candidate_backend,
)
from llm_parity.errors import AnswerError, EngineError, ParityInputError
from llm_parity.runner.floor import floor_skip_reason
from llm_parity.runner.models import ResolvedModel, checkpoint_card, resolve_model
from llm_parity.runner.quantization import plan as quantization_plan


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
    # Kept open for the public fixtures when a test asks for them (closed at session end).
    engines: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    reference_spec: EngineSpec | None = None
    # Every configuration judged, in the order asked; `candidate` and `precision` above are
    # the base's (the first that ran).
    configurations: tuple[ConfigurationRun, ...] = ()
    backend: str = ""  # the candidate backend, resolved
    candidate_spec: EngineSpec | None = None  # before any configuration's arguments
    # The depth views' scored sequences (prompt + the reference's continuation), by prompt.
    sequences: dict[str, list[int]] = field(default_factory=dict)
    localization: Any = None  # runner/localize.py's LocalizationRun, once it has run
    # A quantized candidate's quantization question (runner/quantization.py), else None.
    quantization: Any = None

    def configuration(self, name: str) -> ConfigurationRun:
        return next(c for c in self.configurations if c.name == name)


@dataclass(frozen=True)
class ConfigurationRun:
    """One candidate configuration: its engine's description and its judged comparison,
    or why it could not run."""

    configuration: Configuration
    candidate: dict[str, Any]
    precision: PrecisionResult | None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.configuration.name

    @property
    def passed(self) -> bool:
        return self.precision is not None and self.precision.passed


def platform_of(device: str) -> str:
    return device.split(":")[0]


def run_precision(settings: Settings, environment: dict[str, Any],
                  kept: dict[str, Any] | None = None,
                  spare: dict[str, Any] | None = None, exchange: Any = None) -> Run:
    """The whole precision run. With `kept` (a dict), the reference and candidate engines
    are left open in it, by role, for the public fixtures; the caller closes them. With
    `spare` (a dict), the last configuration's candidate engine is left open in it (engine,
    spec, configuration) for the performance run to adopt. With `exchange`
    (runner/exchange.py), the candidate runs on this worker's share of the prompts and the
    other workers' shares are read back."""
    from llm_parity.runner.environment import collect_environment
    from llm_parity.runner.floor import floor_of_run
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    timings: dict[str, float] = {}
    started = time.perf_counter()
    reference_model = resolve_model(settings.model, "--model")
    candidate_model = (
        resolve_model(settings.candidate_model, "--candidate-model")
        if settings.candidate_model
        else reference_model
    )
    # A quantized candidate beside its unquantized original: the port is judged against
    # the candidate's own weights, the quantization against the original (two questions).
    reference_model, quantization = quantization_plan(reference_model, candidate_model)
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
        options=dict(settings.reference_options),
        batch=settings.batch,
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
        batch=settings.batch,
        name=candidate_model.name,
        url=settings.candidate_url,
        api_key_env=settings.candidate_api_key_env,
    )
    # Before anything heavy: is every asked device here, does the backend import?
    engine_class("hf").preflight(reference_spec)
    for configuration in settings.configurations:  # an unknown engine argument stops here
        engine_class(backend).preflight(replace(
            candidate_spec, options={**candidate_spec.options, **configuration.args},
            role=_candidate_role(backend, configuration)))

    # Tokenize once with the reference tokenizer; the candidate scores the same ids.
    tokenizer = load_tokenizer(reference_model.path, settings.trust_remote_code)
    token_ids = tokenize_prompts(tokenizer, settings.prompts)
    if candidate_model.path != reference_model.path:
        from llm_parity.runner.tokenization import check_same_tokenization

        check_same_tokenization(
            tokenizer,
            load_tokenizer(candidate_model.path, settings.trust_remote_code),
            settings.prompts,
            token_ids,
        )
    if quantization is not None and quantization.original is not None:
        from llm_parity.runner.tokenization import check_same_tokenization

        check_same_tokenization(
            tokenizer, load_tokenizer(quantization.original.path, settings.trust_remote_code),
            settings.prompts, token_ids)
    timings["prepare_s"] = time.perf_counter() - started

    # Depth: the first-token prompts and the long-context set, continued by the reference.
    depth = _depth_prompts(settings, tokenizer, card)
    store, key = _reference_store(settings, reference_model, card, token_ids, depth,
                                  reference_spec)
    stored = store is not None and store.exists() and not settings.reference_store_update
    _check_budget(settings, card, token_ids, depth, stored, backend)
    if exchange is not None and (store is None or not store.exists()):
        raise EngineError("under pytest -n the float32 reference comes from a golden store that "
                          "exists before the workers start (llm-parity reference build)")
    if store is not None and store.exists() and not settings.reference_store_update:
        started = time.perf_counter()
        reference, reference_info = store.load(key, k)  # refuses a stale store, naming why
        reference_info = {**reference_info, "store": str(store.path)}
        timings["reference_store_load_s"] = time.perf_counter() - started
    else:
        reference, reference_info = _run_engine(
            "hf", reference_spec, token_ids, depth, k, settings, timings, "reference",
            kept=kept,
        )
        if store is not None:
            store.save(key, reference, reference_info)
            reference_info = {**reference_info, "store": str(store.path)}
    if quantization is not None:
        from llm_parity.runner import quantization as quantized

        original_settings = replace(settings, reference_store=settings.reference_store
                                    / "original") if settings.reference_store else settings
        quantized.ask(quantization, settings, _run_engine, reference_spec, tokenizer, token_ids,
                      depth, k, reference,
                      settings.thresholds(None, settings.model or reference_model.name),
                      lambda spec: _reference_store(original_settings, quantization.original,
                                                    card, token_ids, depth, spec))
        timings.update(quantization.timings)
    reference_decoded = reference.get("decoded")
    depth_sequences = (
        [ids + d.token_ids for ids, d in zip(depth[1], reference_decoded)] if depth else []
    )
    vocab_size = len(reference["first"][0].full_logprobs)
    compare = None
    noise_floor = None
    configurations: list[ConfigurationRun] = []
    # One candidate engine per configuration, each released before the next is built. When
    # a test asks for the loaded engines, the base configuration runs last and stays open.
    order = list(settings.configurations)
    if kept is not None and len(order) > 1:
        order = order[1:] + order[:1]
    for configuration in order:
        spec = replace(candidate_spec, options={**candidate_spec.options, **configuration.args},
                       role=_candidate_role(backend, configuration))
        own_timings: dict[str, float] = {}
        # Where the engine is left open: the fixtures' base engine, or the spare for the
        # performance run; never under an exchange (engines stay with their worker).
        holder = kept if configuration is settings.configurations[0] else None
        if spare is not None and configuration is order[-1]:
            holder = {}
        if exchange is not None:
            holder = None

        def compute(part_settings, part_ids, part_depth, part_sequences, spec=spec,
                    holder=holder, own_timings=own_timings, runs=configuration.runs):
            return _run_engine(
                backend, spec, part_ids, part_depth, k, part_settings, own_timings,
                "candidate", vocab_size=vocab_size, sequences=part_sequences, kept=holder,
                runs=runs)

        try:
            if exchange is None:
                candidate, candidate_info = compute(settings, token_ids, depth, depth_sequences)
            else:
                candidate, candidate_info = exchange.answers(
                    configuration.name, settings, token_ids, depth, depth_sequences, compute)
        except (EngineError, AnswerError) as exc:
            # Known only once the engine runs: this configuration fails alone, the others
            # are still judged.
            if len(settings.configurations) == 1:
                raise
            configurations.append(ConfigurationRun(configuration, {}, None, str(exc),
                                                   own_timings))
            continue
        if compare is None:
            thresholds = settings.thresholds(platform_of(candidate_info["device"]),
                                             settings.model or reference_model.name)
            if quantization is not None:  # a quantized port: judged against its floor
                thresholds = quantization.port_thresholds(thresholds)
            compare = _Comparison(settings, tokenizer, token_ids, depth, reference,
                                  thresholds, k)
            noise_floor = floor_of_run(settings, thresholds, store, key, reference_spec,
                                       token_ids, depth, k, timings, vocab_size,
                                       depth_sequences, compare, stored_only=exchange is not None)
        if spare is not None and holder is not None and "candidate" in holder:
            spare.update(engine=holder["candidate"], spec=spec,
                         configuration=configuration.name)
        started = time.perf_counter()
        precision = compare.judge(candidate, noise_floor)
        own_timings["compare_s"] = time.perf_counter() - started
        del candidate  # judged: its rows go before the next configuration's come
        configurations.append(ConfigurationRun(configuration, candidate_info, precision, None,
                                               own_timings))
    configurations.sort(key=lambda c: settings.configurations.index(c.configuration))
    judged = [c for c in configurations if c.precision is not None]
    if not judged:  # every configuration failed to run: the run fails with the first error
        raise EngineError("; ".join(f"configuration {c.name}: {c.error}" for c in configurations))
    base = judged[0]
    timings.update(base.timings)
    environment.update(
        collect_environment(
            model=reference_model,
            card=card,
            candidate=base.candidate,
        )
    )
    return Run(
        reference_model=reference_model,
        candidate_model=candidate_model,
        candidate=base.candidate,
        reference=reference_info,
        thresholds=compare.thresholds,
        precision=base.precision,
        token_ids=token_ids,
        timings=timings,
        card=card,
        engines=kept if kept is not None else {},
        tokenizer=tokenizer,
        reference_spec=reference_spec,
        configurations=tuple(configurations),
        backend=backend,
        candidate_spec=candidate_spec,
        sequences={p.id: list(ids) for p, ids in zip(depth[0], depth_sequences)} if depth
        else {},
        quantization=quantization,
    )


def _candidate_role(backend: str, configuration: Configuration) -> str:
    if not configuration.declared:
        return f"candidate ({backend})"
    return f"candidate ({backend}, configuration {configuration.name})"


def _check_budget(settings: Settings, card: dict[str, Any], token_ids, depth, stored: bool,
                  backend: str) -> None:
    """The run's memory, said before any model loads; refused when it cannot fit."""
    from llm_parity.engines.progress import announce
    from llm_parity.runner import budget

    found = budget.check(card, settings, token_ids, depth, reference_stored=stored,
                         floor=floor_skip_reason(settings) is None, candidate_backend=backend)
    announce(f"memory: {found.text()}; given {found.given()}")


def _depth_prompts(settings: Settings, tokenizer: Any, card: dict[str, Any]):
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


class _Comparison:
    """Compare one engine's answers with the reference in every view; judge the gates once."""

    def __init__(self, settings, tokenizer, token_ids, depth, reference, thresholds, k):
        from llm_parity.runner.tokenization import token_text

        self.settings, self.tokenizer, self.token_ids = settings, tokenizer, token_ids
        self.depth, self.reference, self.thresholds, self.k = depth, reference, thresholds, k
        self.decode = lambda token: token_text(tokenizer, token)

    def views(self, answers: dict[str, Any], first: Sequence[int] | None = None,
              depth: Sequence[int] | None = None) -> dict[str, list[PromptResult]]:
        """Every view compared. `first` and `depth` are the indexes of the first-token and
        depth prompts `answers` holds, all of them by default: the noise floor is compared
        one batch at a time, as its engine answers."""
        margin, k, decode = self.thresholds.near_tie_margin, self.k, self.decode
        first = range(len(self.token_ids)) if first is None else first
        views = {"first_token": compare_prompts(
            [self.settings.prompts.prompts[i] for i in first],
            [self.token_ids[i] for i in first], [self.reference["first"][i] for i in first],
            answers["first"], near_tie_margin=margin, k=k, decode=decode)}
        if self.depth:
            rows = range(len(self.depth[1])) if depth is None else depth
            prompts, ids, decoded = ([values[i] for i in rows] for values in (
                *self.depth, self.reference["decoded"]))
            views["sequence"] = compare_sequences(
                prompts, ids, decoded, answers.get("sequence", []), near_tie_margin=margin,
                k=k, decode=decode)
            views["decode"] = compare_decodes(
                prompts, ids, decoded, answers.get("decode", []), near_tie_margin=margin, k=k,
                decode=decode,
                text=lambda tokens: self.tokenizer.decode(list(tokens), skip_special_tokens=False))
        return views

    def judge(self, answers: dict[str, Any], noise_floor: Any = None) -> PrecisionResult:
        return judge(
            self.views(answers), self.thresholds, k=self.k, noise_floor=noise_floor,
            floor_missing=floor_skip_reason(self.settings) or "it was not measured",
            depth_missing=None if self.depth else (
                "the depth views did not run (--continuation 0)"),
            strict=self.settings.strict_gates,
        )


def _reference_store(settings, reference_model, card, token_ids, depth, spec):
    """(store, key) for --reference-store, or (None, None)."""
    if settings.reference_store is None:
        return None, None
    from llm_parity.runner.environment import package_version
    from llm_parity.runner.golden import ReferenceStore, build_key, code_hash, tokenizer_hash
    from llm_parity.runner.models import checkpoint_hash

    key = build_key(
        checkpoint_sha256=checkpoint_hash(reference_model.path),
        tokenizer_sha256=tokenizer_hash(reference_model.path),
        first_token=[(p.id, ids) for p, ids in zip(settings.prompts.prompts, token_ids)],
        depth=[(p.id, ids) for p, ids in zip(*depth)] if depth else [],
        continuation=settings.continuation if depth else 0,
        dtype=spec.dtype,
        device=engine_class("hf").compute_device(spec),  # where it runs, not what was asked
        versions={"torch": package_version("torch"),
                  "transformers": package_version("transformers")},
        trust_remote_code=settings.trust_remote_code,
        code_sha256=code_hash(reference_model.path),
        attn_implementation=spec.options.get("attn_implementation"),
    )
    return ReferenceStore(settings.reference_store), key


def _run_engine(
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build one engine, make each kind of call once over every prompt, release it. With
    `runs` > 1 each call is made that many times and the last answers are kept (a warm
    prefix cache answers the later runs).

    The reference continues the depth prompts greedily ("decoded"); the candidate scores
    those continued sequences (teacher-forced) and decodes freely itself.
    """
    started = time.perf_counter()
    engine = build_engine(backend, spec)
    timings[f"{role}_load_s"] = time.perf_counter() - started
    answers: dict[str, Any] = {}
    try:
        named = {p.id: (p.id, p.text, ids) for p, ids in zip(settings.prompts.prompts, token_ids)}
        if depth:
            named.update((p.id, (p.id, p.text, ids)) for p, ids in zip(*depth))
        engine.check_tokenization(list(named.values()))
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
