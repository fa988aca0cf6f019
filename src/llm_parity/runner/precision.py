"""The precision run: resolve the model, tokenize once, run the reference (or read its
golden store), the candidate and the noise floor on the same token ids, compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from llm_parity.compare.precision import PrecisionResult
from llm_parity.config.configurations import Configuration
from llm_parity.config.options import Settings
from llm_parity.config.thresholds import Thresholds
from llm_parity.engines.base import EngineSpec, engine_class, resolve_candidate_backend
from llm_parity.errors import AnswerError, EngineError
from llm_parity.runner.calls import depth_prompts, run_engine, start_engine
from llm_parity.runner.comparison import Comparison
from llm_parity.runner.golden import reference_store
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
    devices = [engine_class(backend).preflight(_configured(candidate_spec, backend, c))
               for c in settings.configurations]  # an unknown engine argument stops here
    # The thresholds of the platform the candidate computes on (its gates may differ).
    platform = platform_of(devices[0]) if devices and devices[0] else None

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
    depth = depth_prompts(settings, tokenizer, card)
    store, key = reference_store(settings, reference_model, card, token_ids, depth,
                                 reference_spec)
    stored = store is not None and store.exists() and not settings.reference_store_update
    found = _check_budget(settings, card, token_ids, depth, stored, backend)
    if exchange is not None and (store is None or not store.exists()):
        raise EngineError("under pytest -n the float32 reference comes from a golden store that "
                          "exists before the workers start (llm-parity reference build)")
    thresholds = settings.thresholds(platform, settings.model or reference_model.name)
    if quantization is not None:  # a quantized port: judged against its floor
        thresholds = quantization.port_thresholds(thresholds)

    def references():
        """The run's Transformers work: the reference (or its store), the quantization
        question, the noise floor; what the candidate is compared with."""
        return _references(settings, store, key, stored, reference_spec, reference_model,
                           quantization, card, tokenizer, token_ids, depth, k, thresholds,
                           timings, kept, exchange)

    # One candidate engine per configuration, each released before the next is built. When
    # a test asks for the loaded engines, the base configuration runs last and stays open.
    order = list(settings.configurations)
    if kept is not None and len(order) > 1:
        order = order[1:] + order[:1]
    own_timings: dict[str, dict[str, float]] = {c.name: {} for c in order}
    # The first engine starts beside the reference's work where it starts apart (vLLM's
    # engine core compiles in its own process) and both fit in memory at once.
    started_first: tuple[Any, str | None] | None = None
    if exchange is None and _beside(backend, found, card, settings, platform):
        *started_first, done = _start_beside(
            backend, _configured(candidate_spec, backend, order[0]),
            own_timings[order[0].name], len(order) == 1, references, timings)
        compare, noise_floor, reference_info = done
    else:
        compare, noise_floor, reference_info = references()
    reference = compare.reference
    depth_sequences = (
        [ids + d.token_ids for ids, d in zip(depth[1], reference["decoded"])] if depth else []
    )
    vocab_size = len(reference["first"][0].full_logprobs)
    configurations: list[ConfigurationRun] = []
    for configuration in order:
        spec = _configured(candidate_spec, backend, configuration)
        timed = own_timings[configuration.name]
        # Where the engine is left open: the fixtures' base engine, or the spare for the
        # performance run; never under an exchange (engines stay with their worker).
        holder = kept if configuration is settings.configurations[0] else None
        if spare is not None and configuration is order[-1]:
            holder = {}
        if exchange is not None:
            holder = None
        engine = None
        if started_first is not None and configuration is order[0]:
            engine, error = started_first
            if error is not None:  # it could not start: judged without it, as below
                configurations.append(ConfigurationRun(configuration, {}, None, error, timed))
                continue

        def compute(part_settings, part_ids, part_depth, part_sequences, spec=spec,
                    holder=holder, timed=timed, runs=configuration.runs, engine=engine):
            return run_engine(
                backend, spec, part_ids, part_depth, k, part_settings, timed,
                "candidate", vocab_size=vocab_size, sequences=part_sequences, kept=holder,
                runs=runs, engine=engine)

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
            configurations.append(ConfigurationRun(configuration, {}, None, str(exc), timed))
            continue
        if spare is not None and holder is not None and "candidate" in holder:
            spare.update(engine=holder["candidate"], spec=spec,
                         configuration=configuration.name)
        started = time.perf_counter()
        precision = compare.judge(candidate, noise_floor)
        timed["compare_s"] = time.perf_counter() - started
        del candidate  # judged: its rows go before the next configuration's come
        configurations.append(ConfigurationRun(configuration, candidate_info, precision, None,
                                               timed))
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


def _configured(candidate_spec: EngineSpec, backend: str,
                configuration: Configuration) -> EngineSpec:
    """The candidate's spec with a configuration's engine arguments."""
    return replace(candidate_spec, options={**candidate_spec.options, **configuration.args},
                   role=_candidate_role(backend, configuration))


def _references(settings, store, key, stored, reference_spec, reference_model, quantization,
                card, tokenizer, token_ids, depth, k, thresholds, timings, kept, exchange):
    """(comparison, noise floor, reference info): the reference read from its store or
    computed (and stored), the quantization question asked, the floor read or measured."""
    from llm_parity.runner.floor import floor_of_run

    if stored:
        started = time.perf_counter()
        reference, reference_info = store.load(key, k)  # refuses a stale store, naming why
        reference_info = {**reference_info, "store": str(store.path)}
        timings["reference_store_load_s"] = time.perf_counter() - started
    else:
        reference, reference_info = run_engine("hf", reference_spec, token_ids, depth, k,
                                               settings, timings, "reference", kept=kept)
        if store is not None:
            store.save(key, reference, reference_info)
            reference_info = {**reference_info, "store": str(store.path)}
    if quantization is not None:
        from llm_parity.runner import quantization as quantized

        original_settings = replace(settings, reference_store=settings.reference_store
                                    / "original") if settings.reference_store else settings
        quantized.ask(quantization, settings, run_engine, reference_spec, tokenizer, token_ids,
                      depth, k, reference,
                      settings.thresholds(None, settings.model or reference_model.name),
                      lambda spec: reference_store(original_settings, quantization.original,
                                                   card, token_ids, depth, spec))
        timings.update(quantization.timings)
    decoded = reference.get("decoded")
    sequences = [ids + d.token_ids for ids, d in zip(depth[1], decoded)] if depth else []
    compare = Comparison(settings, tokenizer, token_ids, depth, reference, thresholds, k)
    noise_floor = floor_of_run(settings, thresholds, store, key, reference_spec, token_ids,
                               depth, k, timings, len(reference["first"][0].full_logprobs),
                               sequences, compare, stored_only=exchange is not None)
    return compare, noise_floor, reference_info


def _beside(backend: str, found: Any, card: dict[str, Any], settings: Settings,
            platform: str | None) -> bool:
    """Whether the first engine starts beside the reference's work: its start runs apart
    (in processes of its own) and the two fit in memory together; said either way."""
    from llm_parity.engines.progress import announce
    from llm_parity.runner import budget

    if not engine_class(backend).starts_apart():
        return False
    engine = budget.engine_beside(card, settings, platform)
    if found.available is not None and found.total + engine > found.available:
        announce(f"the candidate's engine starts after the reference: together they would "
                 f"need about {budget.gib(found.total + engine)}, more than the "
                 f"{found.given()} given")
        return False
    return True


def _start_beside(backend: str, spec: EngineSpec, timings: dict[str, float], alone: bool,
                  references: Any, run_timings: dict[str, float]) -> tuple[Any, str | None, Any]:
    """(engine or None, why it could not start, what `references()` returned): the engine
    started here while `references` runs in a worker thread; how long the two ran at once
    is the run's `overlap_s`. An engine that cannot start ends the run at once when it is
    the only configuration (the work is cancelled)."""
    import torch

    from llm_parity.engines.progress import settle
    from llm_parity.runner.beside import Beside, threads_beside

    total = torch.get_num_threads()
    engine = error = None
    began = time.perf_counter()
    with Beside(references, total, threads_beside(total)) as work:
        try:
            engine = start_engine(backend, spec, timings, "candidate")
        except EngineError as exc:
            if alone:
                raise
            error = str(exc)
        else:
            settle()  # started: it waits, idle, for the reference
        up = time.perf_counter()
        try:
            done = work.result()
        except BaseException:
            if engine is not None:
                engine.close()
            raise
    run_timings["overlap_s"] = min(up, work.finished) - began
    return engine, error, done


def _candidate_role(backend: str, configuration: Configuration) -> str:
    if not configuration.declared:
        return f"candidate ({backend})"
    return f"candidate ({backend}, configuration {configuration.name})"


def _check_budget(settings: Settings, card: dict[str, Any], token_ids, depth, stored: bool,
                  backend: str) -> Any:
    """The run's memory, said before any model loads; refused when it cannot fit."""
    from llm_parity.engines.progress import announce
    from llm_parity.runner import budget
    from llm_parity.runner.floor import floor_skip_reason

    found = budget.check(card, settings, token_ids, depth, reference_stored=stored,
                         floor=floor_skip_reason(settings) is None, candidate_backend=backend)
    announce(f"memory: {found.text()}; given {found.given()}")
    return found


