"""The bf16 noise floor: how far a correct low-precision run of the same model strays from
the float32 reference, on the same prompts and positions.

Transformers in the candidate's dtype (bfloat16 by default) on the reference's device is
compared with the reference exactly as a candidate is (same top-k, same views). Its
metrics are what rounding alone costs; a candidate's metric divided by the floor's says
how many times worse than rounding it is: a correct port sits near 1, a broken one far
above. Plain data only, like :mod:`llm_parity.compare.precision`: the floor keeps these
per-position values, never the floor engine's vocabulary rows (runner/floor.py compares
each prompt as it is answered).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_parity.compare.gates import RELATIVE_METRICS, VIEWS
from llm_parity.compare.metrics import aggregate

# Added to both sides of a ratio: far below any floor bf16 rounding leaves (KL ~1e-4 on
# the toy and real models), so it changes no real ratio, yet a floor of ~0 (a candidate in
# the reference's own precision) gives a ratio near 1 rather than a division by zero.
FLOOR_EPSILON = 1e-6
FORMAT = 1


@dataclass
class NoiseFloor:
    """The floor engine's per-position values: view -> prompt id -> metric -> values."""

    dtype: str
    device: str
    k: int
    views: dict[str, dict[str, dict[str, list[float]]]]
    # How far below the reference's top-1 (its own log-probs) each top-1 flip that rounding
    # alone caused chose, per view: what the near-tie margin must cover.
    flip_margins: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_views(cls, compared: Mapping[str, Sequence[Any]], *, k: int, dtype: str,
                   device: str) -> NoiseFloor:
        """From the floor engine's compared views (view -> prompt results)."""
        views: dict[str, dict[str, dict[str, list[float]]]] = {}
        flips: dict[str, list[float]] = {}
        for view in VIEWS:
            results = compared.get(view, ())
            if not results:
                continue
            views[view] = {
                r.prompt.id: {m: [float(v) for v in r.values(m)]
                              for m in RELATIVE_METRICS if r.positions and
                              r.positions[0].value(m) is not None}
                for r in results
            }
            flips[view] = [float(p.comparison.choice_gap) for r in results
                           for p in r.positions if not p.comparison.top1_match]
        return cls(dtype=dtype, device=device, k=k, views=views, flip_margins=flips)

    def values(self, metric: str, view: str) -> list[float]:
        return [v for prompt in self.views.get(view, {}).values()
                for v in prompt.get(metric, [])]

    def has(self, metric: str, view: str) -> bool:
        """Whether the floor kept this metric in this view (an older store may not)."""
        return any(metric in prompt for prompt in self.views.get(view, {}).values())

    def prompt_values(self, metric: str, view: str, prompt_id: str) -> list[float]:
        return self.views.get(view, {}).get(prompt_id, {}).get(metric, [])

    def max_flip_margin(self) -> float:
        margins = [m for values in self.flip_margins.values() for m in values]
        return max(margins) if margins else 0.0

    def summary(self) -> dict[str, Any]:
        """Per view, the floor's mean of each metric it has: what the verdict records."""
        out: dict[str, Any] = {"dtype": self.dtype, "device": self.device, "k": self.k,
                               "max_flip_margin": self.max_flip_margin(), "views": {}}
        for view, prompts in self.views.items():
            metrics = sorted({m for p in prompts.values() for m in p})
            out["views"][view] = {
                "positions": sum(len(next(iter(p.values()), [])) for p in prompts.values()),
                "flips": len(self.flip_margins.get(view, [])),
                **{f"{m}_mean": aggregate(self.values(m, view), "mean") for m in metrics},
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "dtype": self.dtype, "device": self.device, "k": self.k,
                "views": self.views, "flip_margins": self.flip_margins}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseFloor:
        if data.get("format") != FORMAT:
            raise ValueError(f"noise floor format {data.get('format')!r}, expected {FORMAT}")
        return cls(dtype=data["dtype"], device=data["device"], k=int(data["k"]),
                   views=data["views"], flip_margins=data.get("flip_margins", {}))


def ratio(candidate: float, floor: float) -> float:
    """How many times the floor the candidate's value is: (candidate + e) / (floor + e), so
    1 when both are ~0 and never a division by zero. NaN in, NaN out."""
    if math.isnan(candidate) or math.isnan(floor):
        return math.nan
    return (candidate + FLOOR_EPSILON) / (floor + FLOOR_EPSILON)
