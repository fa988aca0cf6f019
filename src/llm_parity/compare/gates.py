"""Gates: one bound on one aggregate of one metric, and the outcome of judging it.

Pure data and arithmetic: the thresholds file builds these, the comparison judges them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_parity.compare.metrics import aggregate

# Per-position precision metrics a gate may name, and whether each is boolean.
PRECISION_METRICS: dict[str, bool] = {
    "top1_match": True,
    "top1_defect": True,  # a top-1 flip whose reference margin is above the near-tie margin
    "cosine": False,
    "kl": False,
    "js": False,
    "mae": False,
    "spearman": False,
    "rel_error": False,
    "top1_margin": False,
    "p_tail": False,
    "q_tail": False,
    "cosine_full": False,
    "kl_full": False,
    "js_full": False,
    "mae_full": False,
}

# Per-case performance figures a gate may name ("speedup" compares compiled to eager).
PERFORMANCE_METRICS: dict[str, bool] = {
    "tpot_ms": False,
    "ttft_ms": False,
    "latency_ms": False,
    "throughput_tok_s": False,
    "speedup": False,
}

# Metrics a gate may read relative to the bf16 noise floor: lower is better and 0 is
# perfect, so "candidate / floor" says how many times worse than bf16 alone it is.
RELATIVE_METRICS = ("kl", "js", "mae", "rel_error", "kl_full", "js_full", "mae_full",
                    "p_tail")
NOISE_FLOOR = "noise_floor"

PLATFORMS = ("npu", "cuda", "cpu", "xpu")
EXECUTION_MODES = ("eager", "compiled")
# What a precision gate can be over: the founding protocol's first generated token, every
# position of a teacher-forced continuation (prefill path), or free-running greedy decoding.
VIEWS = ("first_token", "sequence", "decode")

# Metrics (and performance figures) where larger is better; for the rest 0 or less is.
HIGHER_IS_BETTER = frozenset({"top1_match", "cosine", "cosine_full", "spearman",
                              "throughput_tok_s", "speedup"})
QUANTILES = {"p95": 0.95, "p99": 0.99}  # the aggregates that are upper quantiles
_AGGREGATE_SUFFIXES = ("_mean", "_median", "_min", "_max", "_p95", "_p99", "_rate")


def higher_is_better(name: str) -> bool:
    """For a metric, or an aggregate of one named metric_aggregate (cosine_mean)."""
    if name in HIGHER_IS_BETTER:
        return True
    return any(name.endswith(s) and name[: -len(s)] in HIGHER_IS_BETTER
               for s in _AGGREGATE_SUFFIXES)

@dataclass(frozen=True)
class Gate:
    """One bound on one aggregate of one metric."""

    name: str
    metric: str
    aggregate: str
    bound: str  # "min": value must be >= threshold; "max": value must be <= threshold
    threshold: float
    scope: str = "run"  # "run" (across prompts), "prompt" (each prompt), "performance"
    description: str = ""
    over: str = "first_token"  # first_token, sequence (teacher-forced) or decode (free-running)
    mode: str | None = None  # performance gates: only the grid cases of this execution mode
    relative_to: str | None = None  # "noise_floor": the value is candidate / bf16 floor
    conservative: bool = False  # read the unsafe end of the bootstrap interval over prompts
    # top1_match only: a flip inside the near-tie margin counts as a match (it is reported,
    # but bf16 rounding alone flips such tokens; see docs/notes/real-model.md)
    excuse_near_ties: bool = False

    def check(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.threshold if self.bound == "min" else value <= self.threshold

    def evaluate(self, values: Sequence[float] | Sequence[bool]) -> GateResult:
        value = aggregate(values, self.aggregate)
        return GateResult(self, value, self.check(value), count=len(values))

    @property
    def symbol(self) -> str:
        return ">=" if self.bound == "min" else "<="


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float
    passed: bool
    # The aggregate over all positions pooled, before any conservative reading.
    point: float | None = None
    # 95% bootstrap interval of that aggregate over prompts (run gates with 2+ prompts).
    interval: tuple[float, float] | None = None
    # Gates relative to the noise floor: the candidate's own aggregate and the floor's.
    candidate_value: float | None = None
    floor_value: float | None = None
    count: int | None = None  # how many values the aggregate read

    @property
    def note(self) -> str | None:
        """A quantile read over fewer values than it needs to differ from the maximum."""
        q = QUANTILES.get(self.gate.aggregate)
        if q is None or self.count is None or self.count >= 1 / (1 - q):
            return None
        return (f"{self.gate.aggregate} over {self.count} values (fewer than "
                f"{round(1 / (1 - q))}) is an interpolated maximum")

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.count is not None:
            extra["count"] = self.count
        if self.gate.excuse_near_ties:
            extra["excuse_near_ties"] = True
        if self.note:
            extra["note"] = self.note
        if self.gate.relative_to:
            extra.update(relative_to=self.gate.relative_to, candidate_value=self.candidate_value,
                         floor_value=self.floor_value)
        if self.interval is not None:
            extra.update(point=self.point, interval=list(self.interval),
                         conservative=self.gate.conservative)
        return {
            "name": self.gate.name,
            "metric": self.gate.metric,
            "aggregate": self.gate.aggregate,
            "bound": self.gate.bound,
            "threshold": self.gate.threshold,
            "value": self.value,
            "passed": self.passed,
            "scope": self.gate.scope,
            **extra,
        }


@dataclass(frozen=True)
class GridCase:
    mode: str
    input_len: int
    output_len: int

    @property
    def id(self) -> str:
        return f"{self.mode}-in{self.input_len}-out{self.output_len}"


@dataclass(frozen=True)
class Thresholds:
    """The effective gates after platform and model overrides are applied."""

    source: str
    gates: tuple[Gate, ...]
    prompt_gates: tuple[Gate, ...]
    near_tie_margin: float
    strict: bool = False  # a gate that cannot be judged fails instead of being listed
    performance_gates: tuple[Gate, ...] = ()
    grid: tuple[GridCase, ...] = ()
    warmup_rounds: int = 1
    rounds: int = 3
    max_cv: float = 0.1
    # What a quantized checkpoint may cost against its float32 original (docs/quantized-ports.md).
    quantization_gates: tuple[Gate, ...] = ()
    # A quantized port's own bounds for some floor-relative gates: {gate name: bound}.
    quantized_port_bounds: tuple[tuple[str, float], ...] = ()
