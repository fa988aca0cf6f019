"""Performance figures and gates on plain numbers: the spread of each figure over the
measured rounds, TPOT from timestamps or two lengths, and gates over the grid cases.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_parity.compare.gates import Gate, GridCase, Thresholds
from llm_parity.compare.metrics import aggregate
from llm_parity.errors import MissingBenchmark, PerformanceError

if TYPE_CHECKING:
    from llm_parity.engines.base import Timing

REFERENCE = "reference"  # the engine key of the plain-Transformers baseline
FIGURES = ("ttft_ms", "tpot_ms", "latency_ms", "throughput_tok_s")
ENGINE_TIMESTAMPS = "engine timestamps"
TWO_LENGTHS = "two-length difference"


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

    def as_dict(self) -> dict[str, Any]:
        """The gate's entry in the verdict's performance block."""
        gate = self.gate
        entry = {"name": gate.name, "metric": gate.metric, "aggregate": gate.aggregate,
                 "bound": gate.bound, "threshold": gate.threshold, "value": self.value,
                 "passed": self.passed, "scope": "performance", "per_case": dict(self.per_case),
                 "range": [self.low, self.high], "warnings": list(self.warnings)}
        if gate.mode:
            entry["mode"] = gate.mode
        return entry

    def message(self) -> str:
        return performance_gate_message(self.as_dict())


def performance_gate_message(entry: Mapping[str, Any]) -> str:
    """One line for a performance gate, from its verdict entry."""
    what = "speedup (eager TPOT / compiled TPOT)" if entry["metric"] == "speedup" else (
        entry["metric"] + (f" in {entry['mode']} mode" if entry.get("mode") else ""))
    cases = ", ".join(f"{key} {value:.3g}" for key, value in entry.get("per_case", {}).items())
    low, high = entry.get("range") or (math.nan, math.nan)
    symbol = ">=" if entry["bound"] == "min" else "<="
    return (f"gate {entry['name']}: {entry['aggregate']} {what} = {entry['value']:.4g}, must "
            f"be {symbol} {entry['threshold']:g} (cases: {cases}; range over the rounds "
            f"{low:.4g}-{high:.4g})")


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
