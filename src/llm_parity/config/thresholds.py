"""Gates read from thresholds.toml: parsing and validation, once per session.

The file is plain TOML read with tomllib, never executed. Every table and key is checked
against its schema (config/thresholds_schema.py) before any model is loaded; a mistake
names the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_parity import DATA_DIR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from llm_parity.compare.gates import (
    PERFORMANCE_METRICS,
    PLATFORMS,
    PRECISION_METRICS,
    Gate,
    GridCase,
    Thresholds,
)
from llm_parity.compare.layer_gates import KINDS as LAYER_KINDS
from llm_parity.compare.layer_gates import LayerGates
from llm_parity.compare.localize import MODES as LOCALIZE_MODES
from llm_parity.compare.localize import LocalizeSettings
from llm_parity.config.configurations import parse_configurations
from llm_parity.config.thresholds_schema import (
    check_keys,
    fail,
    is_number,
    type_name,
    validate_document,
    validate_section,
)
from llm_parity.errors import ThresholdsError


def packaged_thresholds_path() -> Path:
    return DATA_DIR / "thresholds.toml"


class ThresholdsFile:
    """A thresholds file read and validated once per session, resolved per platform and
    model on demand (each resolution is kept: one parse, one merge per pair)."""

    def __init__(self, data: Mapping[str, Any], source: str = "<thresholds>") -> None:
        validate_document(data, source)
        self.data = data
        self.source = source
        # Candidate configurations by name (see config/configurations.py).
        self.configurations = parse_configurations(data.get("configurations", {}), source)
        # [reference] options: from_pretrained arguments of the reference (placement).
        self.reference_options = _reference_options(data.get("reference", {}), source)
        # [localize]: when and how a failing port is localized to a layer.
        self.localize = _localize_settings(data.get("localize", {}), source)
        # [layer_gates]: bounds on each captured layer point's ratio to its floor.
        self.layer_gates = _layer_gates(data.get("layer_gates", {}), source)
        self._resolved: dict[tuple[str | None, str | None], Thresholds] = {}
        # Every merged combination is checked now, before any model loads: an override
        # can turn a valid base gate into an invalid one (a rate of a KL, a min on a ratio).
        for platform in (None, *data.get("platforms", {})):
            for model in (None, *data.get("models", {})):
                self._merged(platform, model, check=True)

    @classmethod
    def read(cls, path: Path | str) -> ThresholdsFile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ThresholdsError(
                f"{path}: cannot read the thresholds file ({exc.strerror})") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ThresholdsError(f"{path}: not valid TOML: {exc}") from exc
        return cls(data, str(path))

    def resolve(self, platform: str | None = None, model: str | None = None) -> Thresholds:
        """The effective gates for one platform and model (None: the base sections)."""
        key = (platform, model)
        if key not in self._resolved:
            self._resolved[key] = self._merged(platform, model)
        return self._resolved[key]

    def _merged(self, platform: str | None, model: str | None, check: bool = False
                ) -> Thresholds:
        data = self.data
        merged: dict[str, Any] = {
            "precision": copy.deepcopy(data.get("precision", {})),
            "performance": copy.deepcopy(data.get("performance", {})),
            "quantization": copy.deepcopy(data.get("quantization", {})),
        }
        sections = []
        if platform and platform in data.get("platforms", {}):
            _merge(merged, data["platforms"][platform])
            sections.append(f"platforms.{platform}")
        for key, override in data.get("models", {}).items():
            if model is not None and (key == model if check else model_matches(key, model)):
                _merge(merged, override)
                sections.append(f'models."{key}"')
        where = self.source + (f" (merged with [{'] and ['.join(sections)}])" if sections
                               else "")
        if check and sections:
            validate_section(merged, where, "", full=True)
        precision = merged["precision"]
        performance = merged["performance"]
        return Thresholds(
            source=self.source,
            gates=_build_gates(precision.get("gates", {}), "precision.gates", "run", where),
            prompt_gates=_build_gates(
                precision.get("prompt_gates", {}), "precision.prompt_gates", "prompt", where
            ),
            near_tie_margin=float(precision.get("near_tie_margin", 0.0)),
            strict=bool(precision.get("strict", False)),
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
            quantization_gates=_build_gates(merged["quantization"].get("gates", {}),
                                            "quantization.gates", "run", where),
            quantized_port_bounds=_port_bounds(merged, where),
        )

    def _every_platform(self, model: str | None) -> list[Thresholds]:
        return [self.resolve(platform, model) for platform in (None, *PLATFORMS)]

    def gate_names(self, model: str | None) -> list[str]:
        """Every precision gate name the file can produce, on any platform, for this model."""
        return list({g.name: None for t in self._every_platform(model) for g in t.gates})

    def quantization_gate_names(self, model: str | None) -> list[str]:
        return list({g.name: None for t in self._every_platform(model)
                     for g in t.quantization_gates})

    def prompt_gate_views(self, model: str | None) -> set[str]:
        """The views some per-prompt gate reads, on any platform, for this model."""
        return {g.over for t in self._every_platform(model) for g in t.prompt_gates}

    def performance_gate_names(self, model: str | None) -> list[str]:
        return list({g.name: None for t in self._every_platform(model)
                     for g in t.performance_gates})

    def grid_union(self, model: str | None) -> list[GridCase]:
        """Every grid case of any platform, so test ids are stable; each run skips the
        cases its own platform's grid leaves out."""
        return list({c: None for t in self._every_platform(model) for c in t.grid})


def load_thresholds(
    path: Path | str, *, platform: str | None = None, model: str | None = None
) -> Thresholds:
    """Read, validate and resolve a thresholds file for one platform and model."""
    return ThresholdsFile.read(path).resolve(platform, model)


def resolve_thresholds(
    data: Mapping[str, Any],
    *,
    source: str = "<thresholds>",
    platform: str | None = None,
    model: str | None = None,
) -> Thresholds:
    """Validate the whole document, then merge the matching overrides over the base."""
    return ThresholdsFile(data, source).resolve(platform, model)


def _localize_settings(table: Any, source: str) -> LocalizeSettings:
    check_keys(table, ("mode", "ratio", "prompts", "positions"), source, "localize")
    mode = table.get("mode", LocalizeSettings.mode)
    if mode not in LOCALIZE_MODES:
        raise fail(source, "localize", f"mode must be one of {', '.join(LOCALIZE_MODES)}, "
                    f"got {mode!r}")
    ratio = table.get("ratio", LocalizeSettings.ratio)
    if not (is_number(ratio) and ratio > 1):
        raise fail(source, "localize", "ratio must be a number above 1 (a multiple of each "
                    f"layer's bf16 floor), got {ratio!r}")
    prompts = table.get("prompts", LocalizeSettings.prompts)
    if not (isinstance(prompts, int) and not isinstance(prompts, bool) and prompts >= 1):
        raise fail(source, "localize", f"prompts must be an integer >= 1, got {prompts!r}")
    positions = table.get("positions", LocalizeSettings.positions)
    if not (isinstance(positions, int) and not isinstance(positions, bool) and positions >= 1):
        raise fail(source, "localize", "positions must be an integer >= 1 (the prompt's "
                    f"last positions a first-token capture compares), got {positions!r}")
    return LocalizeSettings(mode=mode, ratio=float(ratio), prompts=prompts,
                            positions=positions)


def _layer_gates(table: Any, source: str) -> LayerGates:
    check_keys(table, ("max", "modules", "enabled"), source, "layer_gates")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail(source, "layer_gates", f"enabled must be true or false, got {enabled!r}")
    every = table.get("max")
    if every is not None and not (is_number(every) and every > 1):
        raise fail(source, "layer_gates", "max must be a number above 1 (the largest multiple "
                    f"of its bf16 floor any captured point may reach), got {every!r}")
    modules = table.get("modules", {})
    check_keys(modules, LAYER_KINDS, source, "layer_gates.modules")
    for kind, bound in modules.items():
        if not (is_number(bound) and bound > 1):
            raise fail(source, "layer_gates.modules", f"{kind} must be a number above 1 (the "
                        f"largest multiple of its bf16 floor a {kind} point may reach), got "
                        f"{bound!r}")
    return LayerGates.build(every, dict(modules)) if enabled else LayerGates()


def _reference_options(table: Any, source: str) -> dict[str, Any]:
    check_keys(table, ("options",), source, "reference")
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        raise fail(source, "reference", f"options must be a table of from_pretrained "
                    f"arguments, got {type_name(options)}")
    return dict(options)


def model_matches(key: str, model: str) -> bool:
    """A [models."KEY"] section applies to the model named exactly KEY (a hub id), or, where
    KEY is a path (absolute, or starting with ./ or ~), to that same directory."""
    if model == key:
        return True
    if key.startswith(("/", "./", "../", "~")):
        try:
            return Path(key).expanduser().resolve() == Path(model).expanduser().resolve()
        except OSError:
            return False
    return False


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
                excuse_near_ties=bool(table.get("excuse_near_ties", False)),
            )
        )
    return tuple(gates)


def _port_bounds(merged: Mapping[str, Any], where: str) -> tuple[tuple[str, float], ...]:
    """[quantization.port_bounds]: each names one of the floor-relative run gates of
    [precision.gates], whose bound it replaces for a quantized port."""
    gates = merged["precision"].get("gates", {})
    relative = [name for name, gate in gates.items()
                if gate.get("relative_to") and "max" in gate and gate.get("enabled", True)]
    out = []
    for name, bound in merged["quantization"].get("port_bounds", {}).items():
        if name not in relative:
            raise fail(where, f"quantization.port_bounds.{name}",
                        "names no gate bounded by a multiple of the noise floor in "
                        "[precision.gates]; "
                        f"expected one of: {', '.join(relative) or 'none'}")
        out.append((name, float(bound)))
    return tuple(out)
