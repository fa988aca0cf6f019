"""Performance: exact-length prompts, one engine at a time, timed generation, the spread
of each figure, and gates over the measured grid cases.

The figures of one case, per round: TTFT (arrival to first token), TPOT (time per output
token after the first), end-to-end latency and output throughput. The gates read each
case's median. Only the functions that build engines or tokenizers import torch or vLLM.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_parity.engines.base import Engine, EngineError, EngineSpec, Timing, engine_class
from llm_parity.metrics import aggregate
from llm_parity.thresholds import EXECUTION_MODES, Gate, GridCase, Thresholds

REFERENCE = "reference"  # the engine key of the plain-Transformers baseline
FIGURES = ("ttft_ms", "tpot_ms", "latency_ms", "throughput_tok_s")
ENGINE_TIMESTAMPS = "engine timestamps"
TWO_LENGTHS = "two-length difference"


class PerformanceError(RuntimeError):
    """A benchmark that could not measure what it was asked to."""


class MissingBenchmark(LookupError):
    """A gate whose inputs were not measured."""


class SpreadWarning(UserWarning):
    """Rounds that disagree too much for a figure, or a gate, to rest on them."""


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """One figure over the measured rounds."""

    values: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def cv(self) -> float:
        """Coefficient of variation (sample standard deviation / mean); NaN for one round."""
        if len(self.values) < 2 or self.mean == 0:
            return math.nan
        return statistics.stdev(self.values) / self.mean

    def too_wide(self, max_cv: float) -> bool:
        return math.isnan(self.cv) or self.cv > max_cv

    def describe(self, digits: int = 2) -> str:
        cv = "n/a" if math.isnan(self.cv) else f"{self.cv:.1%}"
        return (f"{self.median:.{digits}f} [{self.min:.{digits}f}-{self.max:.{digits}f}] "
                f"cv {cv}")


@dataclass
class CaseResult:
    """What one benchmark measured: one grid case on one engine."""

    key: str  # "eager-in16-out100", or "reference-in16-out100" for the baseline
    mode: str  # eager, compiled or reference
    input_len: int
    output_len: int
    figures: dict[str, Spread]
    tpot_method: str
    engine: dict[str, Any] = field(default_factory=dict)
    warmup_rounds: int = 0
    built_engine_s: float | None = None  # set on the case that paid for building the engine

    @property
    def rounds(self) -> int:
        return len(self.figures["latency_ms"].values)

    def wide(self, max_cv: float) -> list[str]:
        return [name for name, spread in self.figures.items() if spread.too_wide(max_cv)]

    def flat(self) -> dict[str, Any]:
        """Every number as a flat mapping: benchmark extra_info and JUnit properties."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "rounds": self.rounds,
            "warmup_rounds": self.warmup_rounds,
            "tpot_method": self.tpot_method,
        }
        for name, spread in self.figures.items():
            out[name] = spread.median
            out[f"{name}_min"] = spread.min
            out[f"{name}_max"] = spread.max
            out[f"{name}_cv"] = None if math.isnan(spread.cv) else spread.cv
            out[f"{name}_values"] = list(spread.values)
        for key in ("backend", "device", "dtype", "vllm", "threads"):
            if key in self.engine:
                out[key] = self.engine[key]
        if isinstance(self.engine.get("engine_args"), dict):
            out["engine_args"] = dict(self.engine["engine_args"])
        if self.built_engine_s is not None:
            out["engine_build_s"] = self.built_engine_s
        return out


def figures_from_timings(
    timings: Sequence[Timing], short: Sequence[Timing] | None = None
) -> tuple[dict[str, list[float]], str]:
    """Per-round figures, and how TPOT was found.

    With the engine's own timestamps, TPOT is decode time over the tokens after the first
    (as vLLM computes it). Without them, `short` holds one-token runs of the same prompt:
    TTFT is their latency, and TPOT the latency difference over the extra tokens.
    """
    stamped = all(t.ttft_s is not None and t.decode_s is not None for t in timings)
    per_round: dict[str, list[float]] = {name: [] for name in FIGURES}
    if not stamped and not short:
        raise PerformanceError("the engine kept no token timestamps and no one-token runs "
                               "were made for the two-length difference")
    for i, timing in enumerate(timings):
        per_round["latency_ms"].append(timing.latency_s * 1e3)
        per_round["throughput_tok_s"].append(timing.output_tokens / timing.latency_s)
        extra = timing.output_tokens - 1
        if stamped:
            per_round["ttft_ms"].append(timing.ttft_s * 1e3)
            if extra > 0:
                per_round["tpot_ms"].append(timing.decode_s / extra * 1e3)
        else:
            first = short[i % len(short)]
            per_round["ttft_ms"].append(first.latency_s * 1e3)
            if extra > 0:
                per_round["tpot_ms"].append((timing.latency_s - first.latency_s) / extra * 1e3)
    if not per_round["tpot_ms"]:
        del per_round["tpot_ms"]  # one output token has no decode step
    return per_round, ENGINE_TIMESTAMPS if stamped else TWO_LENGTHS


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


def grid_union(path: Any, model: str | None) -> list[GridCase]:
    """Every grid case the file can produce on any platform: the suite's parametrization,
    fixed before the platform is known (cases outside the active grid skip)."""
    from llm_parity.thresholds import PLATFORMS, load_thresholds

    cases: dict[GridCase, None] = {}
    for platform in (None, *PLATFORMS):
        cases.update((c, None) for c in load_thresholds(path, platform=platform, model=model).grid)
    return list(cases)


def gate_names(path: Any, model: str | None) -> list[str]:
    from llm_parity.thresholds import PLATFORMS, load_thresholds

    names: dict[str, None] = {}
    for platform in (None, *PLATFORMS):
        thresholds = load_thresholds(path, platform=platform, model=model)
        names.update((g.name, None) for g in thresholds.performance_gates)
    return list(names)


def reference_cases(grid: Sequence[GridCase]) -> list[GridCase]:
    """One baseline case per distinct (input, output) length of the grid."""
    lengths = dict.fromkeys((c.input_len, c.output_len) for c in grid)
    return [GridCase(REFERENCE, i, o) for i, o in lengths]


# ---------------------------------------------------------------- gates


@dataclass
class GateOutcome:
    """A performance gate over the grid cases it reads."""

    gate: Gate
    value: float
    passed: bool
    per_case: dict[str, float]  # case key (or compiled key for speedup) -> median figure
    low: float  # the value computed on each case's best-to-worst spread
    high: float
    warnings: list[str] = field(default_factory=list)

    def properties(self) -> list[tuple[str, Any]]:
        gate = self.gate
        out: list[tuple[str, Any]] = [
            ("name", gate.name), ("metric", gate.metric), ("aggregate", gate.aggregate),
            ("bound", gate.bound), ("threshold", gate.threshold), ("value", self.value),
            ("passed", self.passed), ("range_low", self.low), ("range_high", self.high),
            ("cases", ",".join(self.per_case)),
        ]
        if gate.mode:
            out.append(("mode", gate.mode))
        out += [(f"value[{key}]", value) for key, value in self.per_case.items()]
        out += [("spread_warning", text) for text in self.warnings]
        return out

    def message(self) -> str:
        gate = self.gate
        what = "speedup (eager TPOT / compiled TPOT)" if gate.metric == "speedup" else (
            f"{gate.metric}" + (f" in {gate.mode} mode" if gate.mode else ""))
        cases = ", ".join(f"{key} {value:.3g}" for key, value in self.per_case.items())
        return (f"gate {gate.name}: {gate.aggregate} {what} = {self.value:.4g}, must be "
                f"{gate.symbol} {gate.threshold:g} (cases: {cases}; range over the rounds "
                f"{self.low:.4g}-{self.high:.4g})")


def speedup_pairs(grid: Sequence[GridCase]) -> list[tuple[GridCase, GridCase]]:
    """(eager, compiled) pairs: each compiled case with the eager case of the same input
    length, the same output length when there is one, else the nearest."""
    pairs = []
    eager = [c for c in grid if c.mode == "eager"]
    for compiled in (c for c in grid if c.mode == "compiled"):
        same_input = [c for c in eager if c.input_len == compiled.input_len]
        if same_input:
            partner = min(same_input, key=lambda c: (abs(c.output_len - compiled.output_len),
                                                     -c.output_len))
            pairs.append((partner, compiled))
    return pairs


def gate_cases(gate: Gate, grid: Sequence[GridCase]) -> list[GridCase]:
    """The grid cases a gate reads."""
    if gate.metric == "speedup":
        pairs = speedup_pairs(grid)
        if not pairs:
            raise MissingBenchmark(
                f"gate {gate.name}: no eager and compiled cases share an input length in the "
                "grid, so there is no speedup to measure"
            )
        return list(dict.fromkeys(c for pair in pairs for c in pair))
    cases = [c for c in grid if gate.mode in (None, c.mode)]
    if not cases:
        raise MissingBenchmark(f"gate {gate.name}: the grid has no {gate.mode} case")
    return cases


def gated_figures(thresholds: Thresholds, case: GridCase) -> set[str]:
    """The figures of `case` that some active gate reads."""
    figures = set()
    for gate in thresholds.performance_gates:
        try:
            if case in gate_cases(gate, thresholds.grid):
                figures.add("tpot_ms" if gate.metric == "speedup" else gate.metric)
        except MissingBenchmark:
            continue
    return figures


def evaluate_gate(
    gate: Gate,
    grid: Sequence[GridCase],
    results: Mapping[str, CaseResult],
    max_cv: float,
    why_missing: Callable[[GridCase], str] = lambda case: "did not run",
) -> GateOutcome:
    """The gate on each case's median; MissingBenchmark when an input was not measured."""
    cases = gate_cases(gate, grid)
    figure = "tpot_ms" if gate.metric == "speedup" else gate.metric
    missing = [c for c in cases if c.id not in results or figure not in results[c.id].figures]
    if missing:
        raise MissingBenchmark(
            f"gate {gate.name} reads benchmarks that were not measured: "
            + "; ".join(f"test_benchmark[{c.id}] {why_missing(c)}" for c in missing)
        )
    warnings = []
    for case in cases:
        spread = results[case.id].figures[figure]
        if spread.too_wide(max_cv):
            cv = "undefined with one round" if math.isnan(spread.cv) else f"{spread.cv:.1%}"
            warnings.append(f"{case.id} {figure}: coefficient of variation {cv} exceeds "
                            f"max_cv {max_cv:.1%}")
    if gate.metric == "speedup":
        per_case, lows, highs = {}, [], []
        for eager, compiled in speedup_pairs(grid):
            slow, fast = results[eager.id].figures[figure], results[compiled.id].figures[figure]
            per_case[f"{compiled.id}/{eager.id}"] = slow.median / fast.median
            lows.append(slow.min / fast.max)
            highs.append(slow.max / fast.min)
        values = list(per_case.values())
    else:
        spreads = {c.id: results[c.id].figures[figure] for c in cases}
        per_case = {key: s.median for key, s in spreads.items()}
        values = list(per_case.values())
        lows = [s.min for s in spreads.values()]
        highs = [s.max for s in spreads.values()]
    value = aggregate(values, gate.aggregate)
    low, high = aggregate(lows, gate.aggregate), aggregate(highs, gate.aggregate)
    if low < gate.threshold < high:
        warnings.append(f"the threshold {gate.threshold:g} lies inside the range the rounds "
                        f"span ({low:.4g}-{high:.4g}): the verdict rests on noise")
    return GateOutcome(gate, value, gate.check(value), per_case, low, high, warnings)


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

    # -- what is under test

    @property
    def backend(self) -> str:
        from llm_parity.session import resolve_candidate_backend

        return resolve_candidate_backend(self.settings.candidate)

    def model(self) -> Any:
        if self._model is None:
            from llm_parity.models import resolve_model

            self._model = resolve_model(self.settings.model, "--model")
        return self._model

    def candidate_path(self) -> str:
        if self.settings.candidate_model:
            from llm_parity.models import resolve_model

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
        from llm_parity.thresholds import load_thresholds

        return load_thresholds(self.settings.thresholds_path, platform=self.platform(),
                               model=self.settings.model or self.model().name)

    def prompt(self, length: int) -> list[int]:
        """Exact-length prompt ids from the prompt set's text, cached per length."""
        if length not in self._prompts:
            from llm_parity.models import checkpoint_card
            from llm_parity.tokenization import load_tokenizer

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
            gc.collect()
            self.events.append(("release", str(key)))
        left = _wait_gone(self._engine_children, timeout_s)
        self._engine_children = set()
        if left:
            raise PerformanceError(f"the {key} engine's processes {sorted(left)} were still "
                                   f"running {timeout_s:.0f} s after it was closed")


class ModeUnsupported(PerformanceError):
    """The candidate backend has no such execution mode."""


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


def summary_lines(run: PerformanceRun) -> list[str]:
    """The measured grid as a table, the speedups it shows, and the gates' verdicts."""
    results = list(run.results.values())
    max_cv = run.max_cv
    candidate = next((r for r in results if r.mode != REFERENCE), None)
    lines = []
    if candidate is not None:
        e = candidate.engine
        lines.append(f"candidate: {e.get('backend')} on {e.get('device')} in {e.get('dtype')}"
                     + (f", vllm {e['vllm']}" if e.get("vllm") else ""))
    lines.append("each figure: median [min-max] over the rounds, then the coefficient of "
                 f"variation (! above max_cv {max_cv:.0%})")
    header = ("case", "rounds", "TTFT ms", "TPOT ms", "latency ms", "output tok/s", "TPOT from")
    rows = []
    for r in results:
        cells = []
        for name, digits in (("ttft_ms", 2), ("tpot_ms", 2), ("latency_ms", 1),
                             ("throughput_tok_s", 1)):
            spread = r.figures.get(name)
            cells.append("-" if spread is None else spread.describe(digits)
                         + ("!" if spread.too_wide(max_cv) else ""))
        rows.append((r.key, str(r.rounds), *cells, r.tpot_method))
    lines += _aligned(header, rows)
    measured = [GridCase(r.mode, r.input_len, r.output_len) for r in results]
    tpot = {r.key: r.figures["tpot_ms"].median for r in results if "tpot_ms" in r.figures}
    pairs = [(e, c) for e, c in speedup_pairs(measured) if e.id in tpot and c.id in tpot]
    if pairs:
        lines.append("compiled speedup (eager TPOT / compiled TPOT): " + ", ".join(
            f"in{c.input_len} {tpot[e.id] / tpot[c.id]:.2f}x" for e, c in pairs))
    versus = []
    for r in results:
        baseline = f"{REFERENCE}-in{r.input_len}-out{r.output_len}"
        if r.mode != REFERENCE and r.key in tpot and baseline in tpot:
            versus.append(f"{r.key} {tpot[baseline] / tpot[r.key]:.2f}x")
    if versus:
        ref = next(r.engine for r in results if r.mode == REFERENCE)
        lines.append(f"TPOT speedup over plain Transformers ({ref.get('dtype')} on "
                     f"{ref.get('device')}, {ref.get('threads', '?')} threads): "
                     + ", ".join(versus))
    if run.events:
        lines.append("engines, in order: " + ", ".join(f"{verb} {key}" for verb, key in run.events))
    for outcome in run.gate_outcomes.values():
        verdict = "PASS" if outcome.passed else "FAIL"
        lines.append(f"{verdict} {outcome.message()}")
        lines += [f"     warning: {text}" for text in outcome.warnings]
    return lines


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    out = ["  ".join(str(cell).ljust(w) for cell, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]
    return out
