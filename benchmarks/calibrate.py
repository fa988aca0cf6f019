"""Calibration numbers for the default gates on a checkpoint: the bf16 noise floor per view,
rounding flips with their reference margins and choice gaps (how far below the reference's
top-1 the flipped-to token sits: what near_tie_margin must cover), the reference mass outside the candidate's
top-k per position, and the top-k KL (a lower bound) against the full-vocabulary KL.

    .venv/bin/python benchmarks/calibrate.py --model DIR [--candidate hf] [--store DIR]

The Transformers candidate (bf16) exposes the whole vocabulary, so both KLs are known.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def percentiles(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 95, 99)} | {
        "max": float(values.max()), "mean": float(values.mean()), "n": int(values.size)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--candidate", default="hf")
    parser.add_argument("--store")
    parser.add_argument("--out", default="calibration.json")
    args = parser.parse_args()

    from llm_parity.config.options import OPTIONS, build_settings
    from llm_parity.runner.precision import run_precision

    raw = {o.flag.lstrip("-"): o.default for o in OPTIONS}
    raw.update(model=args.model, candidate=args.candidate, **{"noise-floor": "on"})
    if args.store:
        raw["reference-store"] = args.store
    settings = build_settings(raw, Path.cwd())
    run = run_precision(settings, {})
    precision = run.precision
    out: dict = {"model": args.model, "candidate": args.candidate, "views": {}}
    for view in ("first_token", "sequence", "decode"):
        results = precision.view(view)
        positions = [p for r in results for p in r.positions]
        if not positions:
            continue
        c = [p.comparison for p in positions]
        entry = {
            "p_tail": percentiles([x.p_tail for x in c]),
            "kl": percentiles([x.kl for x in c]),
            "flips": sum(not x.top1_match for x in c),
            "flip_margins": sorted(float(x.top1_margin) for x in c if not x.top1_match),
            # What the near-tie rule reads: how far below the reference's top-1 each flip chose.
            "flip_choice_gaps": sorted(float(x.choice_gap) for x in c if not x.top1_match),
        }
        if c[0].kl_full is not None:
            full = np.array([x.kl_full for x in c])
            bins = np.array([x.kl for x in c])
            entry["kl_full"] = percentiles(full)
            entry["kl_bound_ratio"] = percentiles(bins / np.maximum(full, 1e-12))
        floor = precision.noise_floor
        if floor is not None:
            entry["floor_flip_margins"] = sorted(floor.flip_margins.get(view, []))
            entry["floor_p_tail"] = (percentiles(floor.values("p_tail", view))
                                     if floor.values("p_tail", view) else None)
        out["views"][view] = entry
    out["gates"] = [g.as_dict() for g in precision.gate_results]
    out["timings"] = run.timings
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({v: {k: e[k] for k in ("p_tail", "flips")} for v, e in out["views"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
