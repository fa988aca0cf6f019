"""Candidate configurations: named sets of engine arguments, each judged on its own.

A port is shipped in several engine configurations (graph mode and eager, batched and one
request at a time, chunked prefill, a warm prefix cache), and a precision bug often lives
in one of them only. The thresholds file declares them under `[configurations.NAME]`; the
run builds the candidate once per selected configuration, against one reference and one
noise floor, and judges every gate in each.

    [configurations.eager]
    backend = "vllm"          # the candidate backend these arguments are for
    default = true            # judged when --configurations is not given
    args = { enforce_eager = true }
    runs = 1                  # each call made this many times; the last answers judged

Arguments override `--candidate-option` (which applies to every configuration).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_parity.engines.base import backends
from llm_parity.errors import SettingsError, ThresholdsError

KEYS = ("backend", "args", "default", "runs", "description")
NAME = re.compile(r"^[a-z0-9_]+$")
# The one configuration of a backend the file declares none for: no extra arguments, and
# test ids without a configuration part.
IMPLICIT = "default"


@dataclass(frozen=True)
class Configuration:
    name: str
    backend: str
    args: Mapping[str, Any] = field(default_factory=dict)
    default: bool = False
    runs: int = 1
    description: str = ""
    declared: bool = True  # False for the implicit one of a backend without any

    def switch(self, base: Configuration) -> str:
        """The arguments that differ from `base`, as KEY=VALUE: the switch that turns the
        base configuration into this one."""
        keys = sorted(set(self.args) | set(base.args))
        changed = [f"{k}={_show(self.args.get(k, '(unset)'))}" for k in keys
                   if self.args.get(k, _UNSET) != base.args.get(k, _UNSET)]
        if self.runs != base.runs:
            changed.append(f"runs={self.runs}")
        return ", ".join(changed) or "(no difference)"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "args": dict(self.args),
                "runs": self.runs, "description": self.description,
                "declared": self.declared}


_UNSET = object()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_configurations(tables: Any, source: str) -> dict[str, Configuration]:
    """`[configurations]` of a thresholds file, validated; a mistake names the table."""
    if not isinstance(tables, Mapping):
        raise ThresholdsError(f"{source}: [configurations] must be a table of tables, one per "
                              f"configuration, got {type(tables).__name__}")
    out: dict[str, Configuration] = {}
    for name, table in tables.items():
        where = f"{source}: [configurations.{name}]"
        if not NAME.match(name):
            raise ThresholdsError(f"{where} a configuration name is lower-case letters, digits "
                                  "and underscores (it becomes part of test ids)")
        if name == IMPLICIT:
            raise ThresholdsError(f"{where} the name {IMPLICIT!r} is kept for the backend "
                                  "without declared configurations; choose another")
        if not isinstance(table, Mapping):
            raise ThresholdsError(f"{where} must be a table, got {type(table).__name__}")
        unknown = [k for k in table if k not in KEYS]
        if unknown:
            raise ThresholdsError(f"{where} unknown key {unknown[0]!r}; expected one of: "
                                  f"{', '.join(KEYS)}")
        backend = table.get("backend", "vllm")
        if not isinstance(backend, str) or backend not in backends():
            raise ThresholdsError(f"{where} backend must be one of {', '.join(backends())}, "
                                  f"got {backend!r}")
        args = table.get("args", {})
        if not isinstance(args, Mapping):
            raise ThresholdsError(f"{where} args must be a table of engine arguments, got "
                                  f"{type(args).__name__}")
        for key in args:
            if not key.isidentifier():
                raise ThresholdsError(f"{where} args: {key!r} is not an argument name")
        runs = table.get("runs", 1)
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ThresholdsError(f"{where} runs must be an integer >= 1, got {runs!r}")
        default = table.get("default", False)
        if not isinstance(default, bool):
            raise ThresholdsError(f"{where} default must be true or false, got {default!r}")
        description = table.get("description", "")
        if not isinstance(description, str):
            raise ThresholdsError(f"{where} description must be a string")
        out[name] = Configuration(name, backend, dict(args), default, runs, description)
    return out


def select_configurations(declared: Mapping[str, Configuration], backend: str,
                          asked: str | None, source: str) -> tuple[Configuration, ...]:
    """The configurations this run judges, in order: those named by --configurations
    (comma-separated, or `all`), else the backend's defaults. The first is the base that
    the others are compared with."""
    mine = {n: c for n, c in declared.items() if c.backend == backend}
    if not asked:
        chosen = [c for c in mine.values() if c.default] or list(mine.values())[:1]
        return tuple(chosen) or (Configuration(IMPLICIT, backend, declared=False),)
    names = [n.strip() for n in asked.split(",") if n.strip()]
    if not names:
        raise SettingsError(f"--configurations: expected names separated by commas, or 'all', "
                            f"got {asked!r}")
    if names == ["all"]:
        if not mine:
            raise SettingsError(f"--configurations all: {source} declares no configuration "
                                f"for the {backend} candidate")
        return tuple(mine.values())
    seen: set[str] = set()
    chosen = []
    for name in names:
        if name in seen:
            raise SettingsError(f"--configurations: {name!r} is named twice")
        seen.add(name)
        if name not in mine:
            other = declared.get(name)
            if other is not None:
                raise SettingsError(
                    f"--configurations: {name!r} is declared in {source} for the "
                    f"{other.backend} candidate, and this run's candidate is {backend}")
            known = ", ".join(mine) or "none"
            raise SettingsError(f"--configurations: unknown configuration {name!r}; {source} "
                                f"declares for the {backend} candidate: {known}")
        chosen.append(mine[name])
    return tuple(chosen)
