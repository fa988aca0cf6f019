"""The schema thresholds.toml is checked against: every table and key, before any model is
loaded; a mistake names the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from llm_parity.compare.gates import (
    EXECUTION_MODES,
    NOISE_FLOOR,
    PERFORMANCE_METRICS,
    PLATFORMS,
    PRECISION_METRICS,
    RELATIVE_METRICS,
    VIEWS,
)
from llm_parity.compare.metrics import AGGREGATES
from llm_parity.errors import ThresholdsError

GATE_KEYS = ("metric", "aggregate", "min", "max", "over", "mode", "enabled", "description",
             "excuse_near_ties", "relative_to", "conservative")
TOP_KEYS = ("schema_version", "precision", "performance", "platforms", "models",
            "configurations", "reference", "localize", "layer_gates", "quantization")
PRECISION_KEYS = ("gates", "prompt_gates", "near_tie_margin", "strict")
PERFORMANCE_KEYS = ("grid", "warmup_rounds", "rounds", "max_cv", "gates")
GRID_KEYS = ("mode", "input_len", "output_len")


def fail(source: str, key: str, message: str) -> ThresholdsError:
    return ThresholdsError(f"{source}: [{key}] {message}")


def check_keys(table: Any, allowed: Iterable[str], source: str, where: str) -> None:
    if not isinstance(table, Mapping):
        raise fail(source, where, f"must be a table, got {type_name(table)}")
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise fail(
                source,
                where,
                f"unknown key '{key}'{suggestion}; expected one of: {', '.join(allowed)}",
            )


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_document(data: Mapping[str, Any], source: str) -> None:
    check_keys(data, TOP_KEYS, source, "top level")
    validate_section(data, source, "", full=True)
    platforms = data.get("platforms", {})
    check_keys(platforms, PLATFORMS, source, "platforms")
    for name, section in platforms.items():
        check_keys(section, ("precision", "performance"), source, f"platforms.{name}")
        validate_section(section, source, f"platforms.{name}.", full=False)
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise fail(source, "models", f"must be a table, got {type_name(models)}")
    for name, section in models.items():
        check_keys(section, ("precision", "performance", "quantization"), source,
                    f'models."{name}"')
        validate_section(section, source, f'models."{name}".', full=False)


def validate_section(data: Mapping[str, Any], source: str, prefix: str, full: bool) -> None:
    quantization = data.get("quantization", {})
    check_keys(quantization, ("gates", "port_bounds"), source, f"{prefix}quantization")
    bounds = quantization.get("port_bounds", {})
    if not isinstance(bounds, Mapping):
        raise fail(source, f"{prefix}quantization.port_bounds",
                    f"must be a table of gate name = bound, got {type_name(bounds)}")
    for name, bound in bounds.items():
        if not is_number(bound) or bound <= 0:
            raise fail(source, f"{prefix}quantization.port_bounds.{name}",
                        f"must be a positive number (a multiple of the floor), got {bound!r}")
    tables = quantization.get("gates", {})
    check_keys(tables, tables.keys() if isinstance(tables, Mapping) else (), source,
                f"{prefix}quantization.gates")
    for name, gate in tables.items():
        where = f"{prefix}quantization.gates.{name}"
        validate_gate(gate, PRECISION_METRICS, source, where, full)
        if isinstance(gate, Mapping) and gate.get("relative_to"):
            raise fail(source, where, "relative_to has no floor to read here: the "
                        "quantization is judged against the float32 original alone")
    precision = data.get("precision", {})
    check_keys(precision, PRECISION_KEYS, source, f"{prefix}precision")
    if "near_tie_margin" in precision and not (
        is_number(precision["near_tie_margin"]) and precision["near_tie_margin"] >= 0
    ):
        raise fail(
            source,
            f"{prefix}precision",
            "near_tie_margin must be a non-negative number (a log-prob gap), "
            f"got {precision['near_tie_margin']!r}",
        )
    if "strict" in precision and not isinstance(precision["strict"], bool):
        raise fail(source, f"{prefix}precision",
                    f"strict must be true or false, got {precision['strict']!r}")
    for group in ("gates", "prompt_gates"):
        tables = precision.get(group, {})
        check_keys(tables, tables.keys() if isinstance(tables, Mapping) else (), source,
                    f"{prefix}precision.{group}")
        for name, gate in tables.items():
            validate_gate(gate, PRECISION_METRICS, source, f"{prefix}precision.{group}.{name}",
                           full)
    performance = data.get("performance", {})
    check_keys(performance, PERFORMANCE_KEYS, source, f"{prefix}performance")
    for key in ("warmup_rounds", "rounds"):
        if key in performance:
            value = performance[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= (
                    0 if key == "warmup_rounds" else 1)):
                raise fail(source, f"{prefix}performance",
                            f"{key} must be an integer >= {0 if key == 'warmup_rounds' else 1}, "
                            f"got {value!r}")
    if "max_cv" in performance and not (is_number(performance["max_cv"])
                                        and performance["max_cv"] > 0):
        raise fail(source, f"{prefix}performance",
                    f"max_cv must be a positive number, got {performance['max_cv']!r}")
    grid = performance.get("grid", [])
    if not isinstance(grid, list):
        raise fail(source, f"{prefix}performance", f"grid must be an array of tables, "
                    f"got {type_name(grid)}")
    for i, case in enumerate(grid):
        where = f"{prefix}performance.grid[{i}]"
        check_keys(case, GRID_KEYS, source, where)
        for key in GRID_KEYS:
            if key not in case:
                raise fail(source, where, f"missing key '{key}'")
        if case["mode"] not in EXECUTION_MODES:
            raise fail(source, where, f"mode must be one of {', '.join(EXECUTION_MODES)}, "
                        f"got {case['mode']!r}")
        for key in ("input_len", "output_len"):
            value = case[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise fail(source, where, f"{key} must be a positive integer, got {value!r}")
    tables = performance.get("gates", {})
    check_keys(tables, tables.keys() if isinstance(tables, Mapping) else (), source,
                f"{prefix}performance.gates")
    for name, gate in tables.items():
        validate_gate(gate, PERFORMANCE_METRICS, source, f"{prefix}performance.gates.{name}",
                       full)


def validate_gate(
    gate: Any, metrics: Mapping[str, bool], source: str, where: str, full: bool
) -> None:
    check_keys(gate, GATE_KEYS, source, where)
    if "metric" in gate:
        metric = gate["metric"]
        if not isinstance(metric, str) or metric not in metrics:
            hint = difflib.get_close_matches(str(metric), metrics, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise fail(source, where, f"unknown metric {metric!r}{suggestion}; "
                        f"expected one of: {', '.join(metrics)}")
    elif full:
        raise fail(source, where, "missing key 'metric'")
    if "aggregate" in gate:
        how = gate["aggregate"]
        if how not in AGGREGATES:
            raise fail(source, where, f"unknown aggregate {how!r}; expected one of: "
                        f"{', '.join(AGGREGATES)}")
        metric = gate.get("metric")
        if metric is not None and (how == "rate") != metrics[metric]:
            expected = "'rate'" if metrics[metric] else "one of " + ", ".join(
                a for a in AGGREGATES if a != "rate")
            raise fail(source, where, f"aggregate {how!r} does not fit metric {metric!r}; "
                        f"expected {expected}")
    for bound in ("min", "max"):
        if bound in gate and not is_number(gate[bound]):
            raise fail(source, where, f"{bound} must be a number, got "
                        f"{type_name(gate[bound])} {gate[bound]!r}")
    if "min" in gate and "max" in gate:
        raise fail(source, where, "give one bound, min or max, not both "
                    "(write two gates for a range)")
    if full and "min" not in gate and "max" not in gate:
        raise fail(source, where, "missing bound: give min or max")
    if "over" in gate and gate["over"] not in VIEWS:
        raise fail(source, where, f"over must be one of {', '.join(VIEWS)}, got "
                    f"{gate['over']!r}")
    if "mode" in gate:
        if metrics is not PERFORMANCE_METRICS:
            raise fail(source, where, "mode applies to performance gates only")
        if gate["mode"] not in EXECUTION_MODES:
            raise fail(source, where, f"mode must be one of {', '.join(EXECUTION_MODES)}, "
                        f"got {gate['mode']!r}")
        if gate.get("metric") == "speedup":
            raise fail(source, where, "a speedup gate compares both modes; it takes no mode")
    if "relative_to" in gate:
        if metrics is PERFORMANCE_METRICS:
            raise fail(source, where, "relative_to applies to precision gates only")
        if gate["relative_to"] != NOISE_FLOOR:
            raise fail(source, where, f"relative_to must be '{NOISE_FLOOR}', got "
                        f"{gate['relative_to']!r}")
        if gate.get("metric") is not None and gate["metric"] not in RELATIVE_METRICS:
            raise fail(source, where, f"metric {gate['metric']!r} cannot be read relative to "
                        f"the noise floor; expected one of: {', '.join(RELATIVE_METRICS)}")
        if "min" in gate:
            raise fail(source, where, "a gate relative to the noise floor bounds how many "
                        "times the floor the candidate may reach: give max, not min")
    if "conservative" in gate:
        if not isinstance(gate["conservative"], bool):
            raise fail(source, where, f"conservative must be true or false, got "
                        f"{gate['conservative']!r}")
        if ".prompt_gates." in where or metrics is PERFORMANCE_METRICS:
            raise fail(source, where, "conservative applies to precision gates across "
                        "prompts ([precision.gates]), whose interval resamples prompts")
    if "excuse_near_ties" in gate:
        if not isinstance(gate["excuse_near_ties"], bool):
            raise fail(source, where, f"excuse_near_ties must be true or false, got "
                        f"{gate['excuse_near_ties']!r}")
        if gate.get("metric") is not None and gate["metric"] != "top1_match":
            raise fail(source, where, f"excuse_near_ties applies to metric 'top1_match', "
                        f"not {gate['metric']!r}")
    if "enabled" in gate and not isinstance(gate["enabled"], bool):
        raise fail(source, where, f"enabled must be true or false, got {gate['enabled']!r}")
    if "description" in gate and not isinstance(gate["description"], str):
        raise fail(source, where, "description must be a string")
