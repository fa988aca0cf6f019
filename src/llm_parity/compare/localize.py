"""Where a port breaks: each captured layer output of the candidate compared with the
reference's, as a multiple of the same difference for the bf16 floor (Transformers in the
candidate's dtype), and the first point whose multiple jumps.

Rounding error grows with depth: layer 20 of a correct bf16 port differs from float32 far
more than layer 1 does. Comparing each point with its own floor takes that growth out, so
a correct port sits near 1x at every depth and a broken one jumps at the point where it
breaks and stays high after it (the residual stream carries the error on).

The points are named in engines/capture.py, a family's sub-modules in families/. The answer
is read in two steps: the first of the embedding, each layer's output and the final norm
above the limit, then, inside that layer, the first of its sub-modules (input norm,
attention, post-attention norm, MLP; a query norm, a MoE router, MLA's latent norms where
the family has them) above the limit. A sub-module's inputs are the points before it, which were within their
floors, so the first one out is where the error enters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_parity.families import SUBMODULES

MODES = ("on-failure", "always", "off")
SUBMODULE_ORDER = tuple(SUBMODULES)  # every family's points, in stream order
MODULE_NAMES = {
    "embed": "embedding",
    **SUBMODULES,
    "final_norm": "final norm",
    "head": "output head",
}
# A bf16 output cannot be closer to float32 than its own rounding: a floor measured below
# one rounding step (an op exact in bf16, such as the embedding lookup of bf16 weights)
# counts as that step. Half the spacing of the dtype's values at 1.0.
MIN_FLOOR = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -16}

_LAYER = re.compile(r"^layers\.(\d+)(?:\.(\w+))?$")


@dataclass(frozen=True)
class LocalizeSettings:
    """[localize] of the thresholds file, with --localize over its mode."""

    mode: str = "on-failure"  # on-failure, always, off
    ratio: float = 5.0  # a point above this multiple of its floor has diverged
    prompts: int = 1  # the worst prompts localized
    # A first-token capture compares the prompt's last `positions` positions, not its last
    # alone: the prefill computes them all, and one vector against one vector is a noisy
    # ratio (a correct Gemma 3 port reads up to 6.1x at one position over the packaged
    # prompts, 2.4x over the last 32; benchmarks/layer_gates.py).
    positions: int = 32


def parse_point(name: str) -> tuple[int | None, str]:
    """("layers.3.attn") -> (3, "attn"); ("layers.3") -> (3, "output"); ("embed") ->
    (None, "embed")."""
    match = _LAYER.match(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2) or "output"


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Mean over positions of |candidate - reference| / |reference| (L2 over the hidden
    size): each position weighs the same, whatever the size of its activations."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(r, axis=-1), np.finfo(np.float64).tiny)
    return float(np.mean(np.linalg.norm(c - r, axis=-1) / norms))


@dataclass(frozen=True)
class PointDiff:
    name: str
    layer: int | None
    module: str  # embed, a sub-module point (families.SUBMODULES), output, final_norm
    error: float  # the candidate's relative error against the reference
    floor: float  # the same for the bf16 floor, as measured
    ratio: float  # error / max(floor, the dtype's rounding step)
    diverged: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "module": self.module,
                "error": self.error, "floor": self.floor, "ratio": self.ratio,
                "diverged": self.diverged}


@dataclass(frozen=True)
class Localization:
    """One sequence localized: every point's ratio to its floor and the first that jumps."""

    prompt_id: str
    view: str
    positions: tuple[int, ...]
    limit: float
    points: tuple[PointDiff, ...]
    reference_layers: int
    candidate_layers: int
    floor_dtype: str | None  # None: no floor run, the dtype's rounding step stood in
    layer: int | None = None  # the first diverging layer, or None
    module: str | None = None  # the first diverging point's module, or None
    note: str = ""  # what a reader must know to read the answer
    timings: dict[str, float] = field(default_factory=dict)
    captured_bytes: int = 0

    @property
    def diverged(self) -> bool:
        return self.module is not None

    @property
    def where(self) -> str:
        """"layer 14, attention", "embedding", "final norm", "output head", or ""."""
        if self.module is None:
            return ""
        name = MODULE_NAMES.get(self.module, self.module)
        if self.layer is None:
            return name
        if self.module in ("output", "missing"):
            return f"layer {self.layer}" + (" (missing)" if self.module == "missing" else "")
        return f"layer {self.layer}, {name}"

    def layer_ratios(self) -> list[tuple[str, float]]:
        """(label, ratio) along the residual stream: embedding, each layer, final norm."""
        return [("embed" if p.module == "embed" else
                 "final norm" if p.module == "final_norm" else str(p.layer), p.ratio)
                for p in self.points if p.module in ("embed", "output", "final_norm")]

    def within_before(self) -> str:
        """The layers shown to be within the floor before the divergence."""
        if self.layer is None or self.layer == 0:
            return ""
        before = [p.ratio for p in self.points if p.module == "output"
                  and p.layer is not None and p.layer < self.layer]
        return (f"layers 0-{self.layer - 1} within {max(before):.2g}x their floors"
                if before else "")

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "view": self.view,
                "positions": list(self.positions), "limit": self.limit,
                "diverged": self.diverged, "where": self.where, "layer": self.layer,
                "module": self.module, "note": self.note,
                "reference_layers": self.reference_layers,
                "candidate_layers": self.candidate_layers, "floor_dtype": self.floor_dtype,
                "points": [p.as_dict() for p in self.points],
                "timings": dict(self.timings), "captured_bytes": self.captured_bytes}


def _order(name: str) -> tuple[int, int]:
    layer, module = parse_point(name)
    if module == "embed":
        return (-1, 0)
    if module == "final_norm":
        return (1 << 30, 0)
    rank = (SUBMODULE_ORDER.index(module) if module in SUBMODULE_ORDER
            else len(SUBMODULE_ORDER))
    return (layer if layer is not None else 1 << 29, rank)


def layer_count(capture: Mapping[str, Any]) -> int:
    return len({parse_point(n)[0] for n in capture if parse_point(n)[1] == "output"})


def localize(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    floor: Mapping[str, np.ndarray] | None,
    *,
    dtype: str,
    limit: float,
    prompt_id: str = "",
    view: str = "",
    positions: Sequence[int] = (),
    output_failed: bool = False,
) -> Localization:
    """Compare every point both captured; name the first that diverges.

    `floor` is the same capture from Transformers in the candidate's dtype (None when the
    candidate runs in the reference's dtype: the dtype's rounding step stands in). When
    every common point is within its floor but the candidate has fewer or more layers,
    the first layer one of them lacks is named. When nothing diverges but the candidate's
    output distributions failed (`output_failed`), the output head is named: the error
    enters after the last point captured.
    """
    minimum = MIN_FLOOR.get(dtype, MIN_FLOOR["bfloat16"])
    points = []
    for name in sorted(set(reference) & set(candidate), key=_order):
        error = relative_error(candidate[name], reference[name])
        measured = relative_error(floor[name], reference[name]) if floor is not None and \
            name in floor else 0.0
        ratio = error / max(measured, minimum)
        layer, module = parse_point(name)
        points.append(PointDiff(name, layer, module, error, measured, ratio,
                                bool(ratio > limit) or not math.isfinite(error)))
    reference_layers, candidate_layers = layer_count(reference), layer_count(candidate)
    layer, module, note = _first_divergence(points, reference_layers, candidate_layers)
    if module is None and output_failed:
        module, note = "head", (
            "every layer and the final norm agree within their floors while the output "
            "distributions differ: the difference enters after the final norm (the output "
            "head or the logits' processing), or on a path this single request did not take "
            "(batching, chunking, the cache)")
    return Localization(
        prompt_id=prompt_id, view=view, positions=tuple(int(p) for p in positions),
        limit=limit, points=tuple(points), reference_layers=reference_layers,
        candidate_layers=candidate_layers, floor_dtype=dtype if floor is not None else None,
        layer=layer, module=module, note=note,
        captured_bytes=sum(int(np.asarray(a).nbytes) for a in candidate.values()))


def _first_divergence(points: Sequence[PointDiff], reference_layers: int,
                      candidate_layers: int) -> tuple[int | None, str | None, str]:
    stream = [p for p in points if p.module in ("embed", "output", "final_norm")]
    # With a layer count that differs, the final norm reads another depth: only the
    # layers both have can be compared.
    if reference_layers != candidate_layers:
        stream = [p for p in stream if p.module != "final_norm"]
    # The first point to leave its floor along the stream, a sub-module counted in its
    # place: a layer whose sub-module diverges while its summed output stays just under the
    # limit (the residual dilutes it) is still named.
    inside_layers = {p.layer for p in stream if p.module == "output"}
    walk = [p for p in points if p in stream or (p.module in SUBMODULE_ORDER
                                                  and p.layer in inside_layers)]
    first = next((p for p in walk if p.diverged), None)
    if first is not None and first.module in SUBMODULE_ORDER:
        output = next((p for p in stream if p.layer == first.layer and p.module == "output"),
                      None)
        if output is not None and not output.diverged:
            return (first.layer, first.module,
                    f"its layer's output stays within {output.ratio:.3g}x its floor: the "
                    "residual stream dilutes what this sub-module adds")
        return first.layer, first.module, ""
    if first is None:
        if reference_layers != candidate_layers:
            common = min(reference_layers, candidate_layers)
            return (common, "missing",
                    f"the candidate has {candidate_layers} decoder layers and the reference "
                    f"{reference_layers}; the {common} they share agree within their floors")
        return None, None, "every captured point is within its floor"
    if first.module != "output":
        return first.layer, first.module, ""
    inside = [p for p in points if p.layer == first.layer and p.module in SUBMODULE_ORDER]
    culprit = next((p for p in inside if p.diverged), None)
    if culprit is None:
        return (first.layer, "output",
                "the layer's output diverges while none of its sub-modules does: the "
                "residual additions (or a sub-module not captured) differ")
    return first.layer, culprit.module, ""


def earliest(results: Sequence[Localization]) -> Localization | None:
    """Of several prompts' results, the one naming the earliest point (the embedding first,
    the output head last); the first result when none diverges."""
    if not results:
        return None
    diverged = [r for r in results if r.diverged]
    if not diverged:
        return results[0]
    return min(diverged, key=lambda r: -1 if r.module == "embed" else
               r.layer if r.layer is not None else 1 << 30)
