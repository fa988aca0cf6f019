"""Candidate configurations compared with each other, on the positions both compared.

Each configuration is judged against the float32 reference by the gates. This module says
how far two configurations are from each other, so a difference between modes shows even
when both pass: how many top-1 tokens they choose differently, and the ratio of their mean
KL to the reference (with a paired interval over prompts), also counted in noise floors.
"""

from __future__ import annotations

from typing import Any

from llm_parity.compare.metrics import aggregate
from llm_parity.compare.noise_floor import ratio
from llm_parity.compare.precision import PrecisionResult

# Differing top-1 choices listed per view; the count covers them all.
SHOWN = 5


def compare_configurations(base: PrecisionResult, other: PrecisionResult) -> dict[str, Any]:
    """{view: figures} of `other` against `base`, over the positions both compared (decode:
    the common prefix of their comparisons, where both still followed the reference)."""
    from llm_parity.compare.stats import paired_ratio_ci

    out: dict[str, Any] = {}
    for view in ("first_token", "sequence", "decode"):
        pairs = [(b, o) for b, o in zip(base.view(view), other.view(view), strict=True)]
        if not pairs:
            continue
        base_kl, other_kl, differ = [], [], []
        positions = agree = 0
        for b, o in pairs:
            n = min(len(b.positions), len(o.positions))
            base_kl.append([float(p.comparison.kl) for p in b.positions[:n]])
            other_kl.append([float(p.comparison.kl) for p in o.positions[:n]])
            for pb, po in zip(b.positions[:n], o.positions[:n]):
                positions += 1
                if pb.comparison.candidate_top1 == po.comparison.candidate_top1:
                    agree += 1
                    continue
                # Both choices' gaps below the reference's top-1: their difference is how far
                # apart the reference puts the two tokens the configurations chose.
                margin = abs(pb.comparison.choice_gap - po.comparison.choice_gap)
                differ.append({
                    "prompt": b.prompt.id, "position": pb.position,
                    "base_token": pb.candidate_top1_text, "token": po.candidate_top1_text,
                    "reference_token": pb.reference_top1_text,
                    "reference_margin": float(margin),
                    "near_tie": bool(margin < base.near_tie_margin),
                })
        kept = [i for i, g in enumerate(base_kl) if g]
        entry: dict[str, Any] = {
            "positions": positions,
            "top1_agreement": agree / positions if positions else None,
            "top1_differ": len(differ),
            "top1_differ_near_ties": sum(d["near_tie"] for d in differ),
            "differ": differ[:SHOWN],
        }
        if kept:
            point, low, high = paired_ratio_ci([other_kl[i] for i in kept],
                                               [base_kl[i] for i in kept], "mean", ratio)
            entry.update(kl_ratio=point, kl_ratio_low=low, kl_ratio_high=high,
                         base_kl_mean=aggregate([v for i in kept for v in base_kl[i]], "mean"),
                         kl_mean=aggregate([v for i in kept for v in other_kl[i]], "mean"))
            floor = base.noise_floor
            floor_kl = (aggregate(floor.values("kl", view), "mean")
                        if floor is not None and floor.has("kl", view) else None)
            if floor_kl:
                entry["kl_gap_in_floors"] = (entry["kl_mean"] - entry["base_kl_mean"]) / floor_kl
        out[view] = entry
    return out
