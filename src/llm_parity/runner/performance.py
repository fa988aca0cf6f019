"""Performance: exact-length prompts, one engine at a time, timed generation, the spread
of each figure, and gates over the measured grid cases.

The figures of one case, per round: TTFT (arrival to first token), TPOT (time per output
token after the first), end-to-end latency and output throughput. The gates read each
case's median. Only the functions that build engines or tokenizers import torch or vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from llm_parity.compare.gates import EXECUTION_MODES, Thresholds
from llm_parity.compare.performance import (
    REFERENCE,
    CaseResult,
    GateOutcome,
    Spread,
    figures_from_timings,
)
from llm_parity.engines._torch import release_memory
from llm_parity.engines.base import (
    Engine,
    EngineSpec,
    Timing,
    engine_class,
    resolve_candidate_backend,
)
from llm_parity.errors import (
    EngineError,
    ModeUnsupported,
    PerformanceError,
)


def measure(
    engine: Engine,
    prompt: Sequence[int],
    output_len: int,
    *,
    rounds: int,
    warmup_rounds: int,
    repeat: Callable[[Callable[[], None], int], Any] | None = None,
) -> tuple[dict[str, Spread], str]:
    """Time `rounds` generations of exactly `output_len` tokens after warm-up rounds.

    `repeat(target, rounds)` runs the timed rounds (pytest-benchmark's pedantic, so its
    own table and --benchmark-compare see the same calls); it may run fewer (disabled).
    """
    timings: list[Timing] = []

    def one_round() -> None:
        (timing,) = engine.generate_timed([prompt], output_len)
        _check_lengths(timing, len(prompt), output_len)
        timings.append(timing)

    for _ in range(warmup_rounds):
        one_round()
    timings.clear()
    if repeat is None:
        for _ in range(rounds):
            one_round()
    else:
        repeat(one_round, rounds)
    if not timings:
        raise PerformanceError("no round was timed")
    short = None
    if not all(t.ttft_s is not None and t.decode_s is not None for t in timings):
        short = []
        for _ in range(len(timings)):
            (timing,) = engine.generate_timed([prompt], 1)
            _check_lengths(timing, len(prompt), 1)
            short.append(timing)
    per_round, method = figures_from_timings(timings, short)
    return {name: Spread(tuple(values)) for name, values in per_round.items()}, method


def _check_lengths(timing: Timing, input_len: int, output_len: int) -> None:
    if timing.prompt_tokens != input_len or timing.output_tokens != output_len:
        raise PerformanceError(
            f"asked for {input_len} prompt tokens and {output_len} output tokens, the engine "
            f"ran {timing.prompt_tokens} and produced {timing.output_tokens} (is "
            "end-of-sequence being ignored?)"
        )


def exact_length_prompt(tokenizer: Any, text: str, length: int) -> list[int]:
    """`length` token ids: the tokenized text (special tokens such as BOS included),
    repeated as needed and cut."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    more = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not more:
        raise PerformanceError("the prompt text tokenizes to nothing")
    while len(ids) < length:
        ids += more
    return ids[:length]


# ---------------------------------------------------------------- engines, one at a time


class PerformanceRun:
    """The performance benchmarks of one pytest session.

    It holds at most one engine: asking for another releases the current one first (its
    memory and its processes), so eager and compiled never share the device.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.results: dict[str, CaseResult] = {}
        self.not_measured: dict[str, str] = {}  # case key -> why (deselected, skipped, failed)
        self.events: list[tuple[str, str]] = []  # ("build" | "release", engine key), in order
        self.gate_outcomes: dict[str, GateOutcome] = {}
        self.collected: dict[str, str] = {}  # case key -> test name, in run order
        self.max_cv = 0.1  # from the active thresholds, once a benchmark has read them
        self._engine: Engine | None = None
        self._engine_key: str | None = None
        self._engine_children: set[int] = set()
        self._build_failures: dict[str, str] = {}
        self._platform: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._prompts: dict[int, list[int]] = {}
        # An engine the precision run left open: adopt(spec) returns (engine, configuration)
        # when it is the one `spec` would build; discard() closes it. Set by the plugin.
        self.adopt: Any = None
        self.discard: Any = None

    # -- what is under test

    @property
    def backend(self) -> str:
        return resolve_candidate_backend(self.settings.candidate)

    def model(self) -> Any:
        if self._model is None:
            from llm_parity.runner.models import resolve_model

            self._model = resolve_model(self.settings.model, "--model")
        return self._model

    def candidate_path(self) -> str:
        if self.settings.candidate_model:
            from llm_parity.runner.models import resolve_model

            return str(resolve_model(self.settings.candidate_model, "--candidate-model").path)
        return str(self.model().path)

    def candidate_spec(self, mode: str) -> EngineSpec:
        settings = self.settings
        options = dict(settings.candidate_options)
        extra = engine_class(self.backend).benchmark_options(mode)
        if extra is None:
            raise ModeUnsupported(f"the {self.backend} backend has no {mode} mode")
        options.update(extra)  # the case's mode wins over a --candidate-option
        path = self.candidate_path()
        return EngineSpec(
            model=path, tokenizer=path, dtype=settings.candidate_dtype,
            device=settings.candidate_device, trust_remote_code=settings.trust_remote_code,
            tensor_parallel_size=settings.tensor_parallel_size, options=options,
            role=f"candidate ({self.backend}, {mode})",
        )

    def reference_spec(self) -> EngineSpec:
        # Same device and dtype as the candidate: the baseline is plain Transformers on the
        # hardware under test, not the float32 precision reference.
        settings = self.settings
        return EngineSpec(
            model=str(self.model().path), dtype=settings.candidate_dtype,
            device=settings.candidate_device, trust_remote_code=settings.trust_remote_code,
            role="reference (hf, performance baseline)",
        )

    def platform(self) -> str:
        """The candidate's platform (npu, cuda, cpu): from its engine, else its preflight."""
        if self._platform is None:
            spec = self.candidate_spec_any()
            device = engine_class(self.backend).preflight(spec)
            if not isinstance(device, str):
                from llm_parity.engines._torch import resolve_device

                device = resolve_device(spec.device, spec.role)
            self._platform = device.split(":")[0]
        return self._platform

    def candidate_spec_any(self) -> EngineSpec:
        for mode in EXECUTION_MODES:
            try:
                return self.candidate_spec(mode)
            except ModeUnsupported:
                continue
        raise PerformanceError(f"the {self.backend} backend has no execution mode to benchmark")

    def thresholds(self) -> Thresholds:
        return self.settings.thresholds(self.platform(), self.settings.model or self.model().name)

    def prompt(self, length: int) -> list[int]:
        """Exact-length prompt ids from the prompt set's text, cached per length."""
        if length not in self._prompts:
            from llm_parity.runner.models import checkpoint_card
            from llm_parity.runner.tokenization import load_tokenizer

            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model().path,
                                                 self.settings.trust_remote_code)
            text = "\n\n".join(p.text for p in self.settings.prompts.prompts)
            self._prompts[length] = exact_length_prompt(self._tokenizer, text, length)
            self._limit = checkpoint_card(self.model().path).get("max_position_embeddings")
        return self._prompts[length]

    def check_fits(self, input_len: int, output_len: int) -> None:
        limit = getattr(self, "_limit", None)
        if limit and input_len + output_len > limit:
            raise PerformanceError(f"{input_len} prompt + {output_len} output tokens exceed the "
                                   f"model's {limit} positions")

    # -- the engine

    def engine(self, key: str) -> tuple[Engine, float | None]:
        """The engine for `key` (an execution mode, or REFERENCE), and its build time if this
        call built it. The previous engine is released first."""
        if key == self._engine_key and self._engine is not None:
            return self._engine, None
        if key in self._build_failures:
            raise EngineError(self._build_failures[key])
        self.release()
        spec = self.reference_spec() if key == REFERENCE else self.candidate_spec(key)
        backend = "hf" if key == REFERENCE else self.backend
        adopted = self.adopt(spec) if self.adopt is not None and key != REFERENCE else None
        if adopted is not None:
            engine, configuration = adopted
            self._engine, self._engine_key = engine, key
            self._engine_children = _child_pids()  # no other engine is alive
            self.events.append(("adopt", f"{key} (the precision run's {configuration} engine)"))
            self._platform = str(engine.describe().get("device", "cpu")).split(":")[0]
            return engine, None
        if self.discard is not None:
            self.discard()  # a left-over engine that is not this one: closed before building
        before = _child_pids()
        started = time.perf_counter()
        try:
            engine = engine_class(backend)(spec)
        except Exception as exc:
            self._build_failures[key] = str(exc)
            raise
        built = time.perf_counter() - started
        self._engine, self._engine_key = engine, key
        self._engine_children = _child_pids() - before
        self.events.append(("build", key))
        if key != REFERENCE:
            self._platform = str(engine.describe().get("device", "cpu")).split(":")[0]
        return engine, built

    def release(self, timeout_s: float = 60.0) -> None:
        """Close the engine and wait for the processes it started to end."""
        engine, key = self._engine, self._engine_key
        if engine is None:
            return
        self._engine = self._engine_key = None
        try:
            engine.close()
        finally:
            del engine
            release_memory()
            self.events.append(("release", str(key)))
        left = _wait_gone(self._engine_children, timeout_s)
        self._engine_children = set()
        if left:
            raise PerformanceError(f"the {key} engine's processes {sorted(left)} were still "
                                   f"running {timeout_s:.0f} s after it was closed")



def _child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:  # the check is a safeguard; without psutil, close() is trusted
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(_cmdline(p))}


def _cmdline(process: Any) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # a process that ended while we looked
        return []


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    if not pids:
        return set()
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# ---------------------------------------------------------------- the printed summary


