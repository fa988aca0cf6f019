"""Layer gates: bounds on how far each captured layer point of the candidate sits from the
reference, as a multiple of the bf16 floor's difference at the same point.

The output gates read only the logits, and a port can pass them with one layer clearly
off: on SmolLM2 with vLLM, noise at 5% of its spread on layer 0's output projection passes
every output gate while layer 0's attention sits at 7.9x its floor. Localization's capture
(runner/localize.py) already measures every point's ratio; a layer gate bounds the largest
of them, over every point or over one kind of point (attention, MLP, the residual stream
after each layer), and over every prompt captured: the worst prompt decides.

A ratio that cannot be measured (a NaN or infinite error) fails the gate, as does a
candidate with another number of layers: the points it lacks cannot be within anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_parity.compare.localize import Localization
from llm_parity.families import SUBMODULES

# The kinds of point a gate may bound: the embedding, each sub-module a family has, each
# layer's output (the residual stream after it) and the final norm.
KINDS = ("embed", *SUBMODULES, "output", "final_norm")
ALL = "max_ratio"  # the gate over every point; a kind's gate is named max_ratio.<kind>


@dataclass(frozen=True)
class LayerGate:
    name: str
    module: str | None  # None: every point
    threshold: float  # the largest ratio to the floor allowed

    @property
    def over(self) -> str:
        return self.module or "every point"

    def as_dict(self) -> dict[str, Any]:
        """The fields every gate entry of the verdict has."""
        return {"name": self.name, "metric": "ratio_to_floor", "aggregate": "max",
                "bound": "max", "threshold": self.threshold, "over": self.over,
                "module": self.module, "scope": "layer"}


@dataclass(frozen=True)
class LayerGates:
    """[layer_gates] of the thresholds file: one gate over every point (`max`) and one per
    kind of point (`[layer_gates.modules]`)."""

    gates: tuple[LayerGate, ...] = ()

    @classmethod
    def build(cls, every: float | None, modules: dict[str, float]) -> LayerGates:
        gates = [LayerGate(ALL, None, float(every))] if every is not None else []
        gates += [LayerGate(f"{ALL}.{kind}", kind, float(bound))
                  for kind, bound in modules.items()]
        return cls(tuple(gates))

    def names(self) -> list[str]:
        return [g.name for g in self.gates]


@dataclass(frozen=True)
class LayerGateResult:
    gate: LayerGate
    value: float  # the largest ratio over the points and prompts read (nan: not measurable)
    point: str  # where it is reached: layers.0.attn
    prompt_id: str
    view: str
    points: int  # how many point-prompt pairs were read
    passed: bool
    configuration: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**self.gate.as_dict(), "value": self.value, "passed": self.passed,
                "point": self.point, "prompt_id": self.prompt_id, "view": self.view,
                "points": self.points, "configuration": self.configuration,
                "note": self.note}


@dataclass(frozen=True)
class LayerNotJudged:
    """A layer gate the run could not judge, and why (no capture: a served candidate,
    --localize off, pytest-xdist; a kind of point the model does not have)."""

    gate: LayerGate
    reason: str
    strict: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**self.gate.as_dict(), "reason": self.reason, "strict": self.strict}


def judge_layer_gates(gates: LayerGates, results: Sequence[Localization], *,
                      configuration: str | None = None, strict: bool = False,
                      ) -> tuple[tuple[LayerGateResult, ...], tuple[LayerNotJudged, ...]]:
    """Each gate's largest ratio over the points it reads, in every localized prompt."""
    judged, not_judged = [], []
    for gate in gates.gates:
        read = [(p, r) for r in results for p in r.points
                if gate.module is None or p.module == gate.module]
        if not read:
            not_judged.append(LayerNotJudged(gate, (
                f"the capture has no {gate.module} point (this model's layers have none)"
                if results else "nothing was captured"), strict))
            continue
        bad = [(p, r) for p, r in read if not math.isfinite(p.ratio)]
        point, result = bad[0] if bad else max(read, key=lambda pr: pr[0].ratio)
        value = point.ratio if not bad else math.nan
        note = ""
        if bad:
            note = f"{point.name} could not be measured (a NaN or infinite difference)"
        lacking = [r for r in results if r.reference_layers != r.candidate_layers]
        short = bool(lacking) and gate.module in (None, "output")
        if short:
            r = lacking[0]
            note = (f"the candidate has {r.candidate_layers} decoder layers and the reference "
                    f"{r.reference_layers}: the layers one lacks are not within any bound")
        passed = not bad and not short and value <= gate.threshold
        judged.append(LayerGateResult(gate, value, point.name, result.prompt_id, result.view,
                                      len(read), bool(passed), configuration, note))
    return tuple(judged), tuple(not_judged)


def layer_gate_line(entry: dict[str, Any]) -> str:
    """One gate's outcome in words, from its verdict entry."""
    value = entry.get("value")
    where = (f" at {entry['point']} (prompt {entry['prompt_id']}, "
             f"{str(entry.get('view', '')).replace('_', ' ')} view)") if entry.get("point") else ""
    shown = "unmeasurable" if value is None or not math.isfinite(value) else f"{value:.3g}x"
    return (f"largest ratio to the bf16 floor over {entry['over']} = {shown}{where}, must be "
            f"<= {entry['threshold']:.3g}x" + (f"; {entry['note']}" if entry.get("note") else ""))
