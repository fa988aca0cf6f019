"""Gates read from thresholds.toml: parsing, validation and evaluation.

The file is plain TOML read with tomllib, never executed. Every table and key is checked
against the schema below before any model is loaded; a mistake names the file, the key
and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from llm_parity.metrics import AGGREGATES, aggregate

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
RELATIVE_METRICS = ("kl", "js", "mae", "rel_error", "kl_full", "js_full", "mae_full")
NOISE_FLOOR = "noise_floor"

PLATFORMS = ("npu", "cuda", "cpu", "xpu")
EXECUTION_MODES = ("eager", "compiled")

_GATE_KEYS = ("metric", "aggregate", "min", "max", "over", "mode", "enabled", "description",
              "relative_to", "conservative")
VIEWS = ("first_token", "sequence", "decode")
_TOP_KEYS = ("schema_version", "precision", "performance", "platforms", "models")
_PRECISION_KEYS = ("gates", "prompt_gates", "near_tie_margin")
_PERFORMANCE_KEYS = ("grid", "warmup_rounds", "rounds", "max_cv", "gates")
_GRID_KEYS = ("mode", "input_len", "output_len")


class ThresholdsError(ValueError):
    """A thresholds file that does not match the schema."""


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

    def check(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.threshold if self.bound == "min" else value <= self.threshold

    def evaluate(self, values: Sequence[float] | Sequence[bool]) -> GateResult:
        value = aggregate(values, self.aggregate)
        return GateResult(self, value, self.check(value))

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

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
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
    performance_gates: tuple[Gate, ...] = ()
    grid: tuple[GridCase, ...] = ()
    warmup_rounds: int = 1
    rounds: int = 3
    max_cv: float = 0.1
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def packaged_thresholds_path() -> Path:
    return Path(__file__).parent / "data" / "thresholds.toml"


def load_thresholds(
    path: Path | str, *, platform: str | None = None, model: str | None = None
) -> Thresholds:
    """Read, validate and resolve a thresholds file for one platform and model."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ThresholdsError(f"{path}: cannot read the thresholds file ({exc.strerror})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ThresholdsError(f"{path}: not valid TOML: {exc}") from exc
    return resolve_thresholds(data, source=str(path), platform=platform, model=model)


def resolve_thresholds(
    data: Mapping[str, Any],
    *,
    source: str = "<thresholds>",
    platform: str | None = None,
    model: str | None = None,
) -> Thresholds:
    """Validate the whole document, then merge the matching overrides over the base."""
    _validate_document(data, source)
    merged: dict[str, Any] = {
        "precision": copy.deepcopy(data.get("precision", {})),
        "performance": copy.deepcopy(data.get("performance", {})),
    }
    if platform and platform in data.get("platforms", {}):
        _merge(merged, data["platforms"][platform])
    if model:
        for key, override in data.get("models", {}).items():
            if _model_matches(key, model):
                _merge(merged, override)
    where = f"{source}" + (f" (platform {platform})" if platform else "")
    precision = merged["precision"]
    performance = merged["performance"]
    return Thresholds(
        source=source,
        gates=_build_gates(precision.get("gates", {}), "precision.gates", "run", where),
        prompt_gates=_build_gates(
            precision.get("prompt_gates", {}), "precision.prompt_gates", "prompt", where
        ),
        near_tie_margin=float(precision.get("near_tie_margin", 0.0)),
        performance_gates=_build_gates(
            performance.get("gates", {}), "performance.gates", "performance", where
        ),
        grid=tuple(
            GridCase(c["mode"], int(c["input_len"]), int(c["output_len"]))
            for c in performance.get("grid", [])
        ),
        warmup_rounds=int(performance.get("warmup_rounds", 1)),
        rounds=int(performance.get("rounds", 3)),
        max_cv=float(performance.get("max_cv", 0.1)),
        raw=data,
    )


def _model_matches(key: str, model: str) -> bool:
    # An override keyed "PleIAs/Pleias-RAG-350M" also matches a local copy named Pleias-RAG-350M.
    return model == key or model.rstrip("/").endswith("/" + key.split("/")[-1]) or (
        Path(model).name == key.split("/")[-1]
    )


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if key in ("min", "max"):  # an override that flips the bound replaces the old one
            base.pop("max" if key == "min" else "min", None)
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _build_gates(
    tables: Mapping[str, Any], where: str, scope: str, source: str
) -> tuple[Gate, ...]:
    metrics = PERFORMANCE_METRICS if scope == "performance" else PRECISION_METRICS
    gates = []
    for name, table in tables.items():
        if not table.get("enabled", True):
            continue
        missing = [k for k in ("metric",) if k not in table]
        if not ("min" in table) ^ ("max" in table):
            missing.append("exactly one of min or max")
        if missing:
            raise ThresholdsError(
                f"{source}: [{where}.{name}] needs {', '.join(missing)} "
                "(an override that adds a new gate must give the whole gate)"
            )
        bound = "min" if "min" in table else "max"
        metric = table["metric"]
        how = table.get("aggregate") or ("rate" if metrics[metric] else "mean")
        gates.append(
            Gate(
                name=name,
                metric=metric,
                aggregate=how,
                bound=bound,
                threshold=float(table[bound]),
                scope=scope,
                description=table.get("description", ""),
                over=table.get("over", "first_token"),
                mode=table.get("mode"),
                relative_to=table.get("relative_to"),
                conservative=bool(table.get("conservative", False)),
            )
        )
    return tuple(gates)


# ---------------------------------------------------------------- validation


def _fail(source: str, key: str, message: str) -> ThresholdsError:
    return ThresholdsError(f"{source}: [{key}] {message}")


def _check_keys(table: Any, allowed: Iterable[str], source: str, where: str) -> None:
    if not isinstance(table, Mapping):
        raise _fail(source, where, f"must be a table, got {_type_name(table)}")
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise _fail(
                source,
                where,
                f"unknown key '{key}'{suggestion}; expected one of: {', '.join(allowed)}",
            )


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_document(data: Mapping[str, Any], source: str) -> None:
    _check_keys(data, _TOP_KEYS, source, "top level")
    _validate_section(data, source, "", full=True)
    platforms = data.get("platforms", {})
    _check_keys(platforms, PLATFORMS, source, "platforms")
    for name, section in platforms.items():
        _check_keys(section, ("precision", "performance"), source, f"platforms.{name}")
        _validate_section(section, source, f"platforms.{name}.", full=False)
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise _fail(source, "models", f"must be a table, got {_type_name(models)}")
    for name, section in models.items():
        _check_keys(section, ("precision", "performance"), source, f'models."{name}"')
        _validate_section(section, source, f'models."{name}".', full=False)


def _validate_section(data: Mapping[str, Any], source: str, prefix: str, full: bool) -> None:
    precision = data.get("precision", {})
    _check_keys(precision, _PRECISION_KEYS, source, f"{prefix}precision")
    if "near_tie_margin" in precision and not (
        _is_number(precision["near_tie_margin"]) and precision["near_tie_margin"] >= 0
    ):
        raise _fail(
            source,
            f"{prefix}precision",
            "near_tie_margin must be a non-negative number (a log-prob gap), "
            f"got {precision['near_tie_margin']!r}",
        )
    for group in ("gates", "prompt_gates"):
        tables = precision.get(group, {})
        _check_keys(tables, tables.keys() if isinstance(tables, Mapping) else (), source,
                    f"{prefix}precision.{group}")
        for name, gate in tables.items():
            _validate_gate(gate, PRECISION_METRICS, source, f"{prefix}precision.{group}.{name}",
                           full)
    performance = data.get("performance", {})
    _check_keys(performance, _PERFORMANCE_KEYS, source, f"{prefix}performance")
    for key in ("warmup_rounds", "rounds"):
        if key in performance:
            value = performance[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= (
                    0 if key == "warmup_rounds" else 1)):
                raise _fail(source, f"{prefix}performance",
                            f"{key} must be an integer >= {0 if key == 'warmup_rounds' else 1}, "
                            f"got {value!r}")
    if "max_cv" in performance and not (_is_number(performance["max_cv"])
                                        and performance["max_cv"] > 0):
        raise _fail(source, f"{prefix}performance",
                    f"max_cv must be a positive number, got {performance['max_cv']!r}")
    grid = performance.get("grid", [])
    if not isinstance(grid, list):
        raise _fail(source, f"{prefix}performance", f"grid must be an array of tables, "
                    f"got {_type_name(grid)}")
    for i, case in enumerate(grid):
        where = f"{prefix}performance.grid[{i}]"
        _check_keys(case, _GRID_KEYS, source, where)
        for key in _GRID_KEYS:
            if key not in case:
                raise _fail(source, where, f"missing key '{key}'")
        if case["mode"] not in EXECUTION_MODES:
            raise _fail(source, where, f"mode must be one of {', '.join(EXECUTION_MODES)}, "
                        f"got {case['mode']!r}")
        for key in ("input_len", "output_len"):
            value = case[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise _fail(source, where, f"{key} must be a positive integer, got {value!r}")
    tables = performance.get("gates", {})
    _check_keys(tables, tables.keys() if isinstance(tables, Mapping) else (), source,
                f"{prefix}performance.gates")
    for name, gate in tables.items():
        _validate_gate(gate, PERFORMANCE_METRICS, source, f"{prefix}performance.gates.{name}",
                       full)


def _validate_gate(
    gate: Any, metrics: Mapping[str, bool], source: str, where: str, full: bool
) -> None:
    _check_keys(gate, _GATE_KEYS, source, where)
    if "metric" in gate:
        metric = gate["metric"]
        if not isinstance(metric, str) or metric not in metrics:
            hint = difflib.get_close_matches(str(metric), metrics, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise _fail(source, where, f"unknown metric {metric!r}{suggestion}; "
                        f"expected one of: {', '.join(metrics)}")
    elif full:
        raise _fail(source, where, "missing key 'metric'")
    if "aggregate" in gate:
        how = gate["aggregate"]
        if how not in AGGREGATES:
            raise _fail(source, where, f"unknown aggregate {how!r}; expected one of: "
                        f"{', '.join(AGGREGATES)}")
        metric = gate.get("metric")
        if metric is not None and (how == "rate") != metrics[metric]:
            expected = "'rate'" if metrics[metric] else "one of " + ", ".join(
                a for a in AGGREGATES if a != "rate")
            raise _fail(source, where, f"aggregate {how!r} does not fit metric {metric!r}; "
                        f"expected {expected}")
    for bound in ("min", "max"):
        if bound in gate and not _is_number(gate[bound]):
            raise _fail(source, where, f"{bound} must be a number, got "
                        f"{_type_name(gate[bound])} {gate[bound]!r}")
    if "min" in gate and "max" in gate:
        raise _fail(source, where, "give one bound, min or max, not both "
                    "(write two gates for a range)")
    if full and "min" not in gate and "max" not in gate:
        raise _fail(source, where, "missing bound: give min or max")
    if "over" in gate and gate["over"] not in VIEWS:
        raise _fail(source, where, f"over must be one of {', '.join(VIEWS)}, got "
                    f"{gate['over']!r}")
    if "mode" in gate:
        if metrics is not PERFORMANCE_METRICS:
            raise _fail(source, where, "mode applies to performance gates only")
        if gate["mode"] not in EXECUTION_MODES:
            raise _fail(source, where, f"mode must be one of {', '.join(EXECUTION_MODES)}, "
                        f"got {gate['mode']!r}")
        if gate.get("metric") == "speedup":
            raise _fail(source, where, "a speedup gate compares both modes; it takes no mode")
    if "relative_to" in gate:
        if metrics is PERFORMANCE_METRICS:
            raise _fail(source, where, "relative_to applies to precision gates only")
        if gate["relative_to"] != NOISE_FLOOR:
            raise _fail(source, where, f"relative_to must be '{NOISE_FLOOR}', got "
                        f"{gate['relative_to']!r}")
        if gate.get("metric") is not None and gate["metric"] not in RELATIVE_METRICS:
            raise _fail(source, where, f"metric {gate['metric']!r} cannot be read relative to "
                        f"the noise floor; expected one of: {', '.join(RELATIVE_METRICS)}")
        if "min" in gate:
            raise _fail(source, where, "a gate relative to the noise floor bounds how many "
                        "times the floor the candidate may reach: give max, not min")
    if "conservative" in gate:
        if not isinstance(gate["conservative"], bool):
            raise _fail(source, where, f"conservative must be true or false, got "
                        f"{gate['conservative']!r}")
        if ".prompt_gates." in where or metrics is PERFORMANCE_METRICS:
            raise _fail(source, where, "conservative applies to precision gates across "
                        "prompts ([precision.gates]), whose interval resamples prompts")
    if "enabled" in gate and not isinstance(gate["enabled"], bool):
        raise _fail(source, where, f"enabled must be true or false, got {gate['enabled']!r}")
    if "description" in gate and not isinstance(gate["description"], str):
        raise _fail(source, where, "description must be a string")
