"""Layer-gate calibration: how far a correct candidate's captured points sit from the
reference, as multiples of the bf16 floor, measured on every packaged prompt and over
several choices of the positions compared.

A first-token capture compares one position (the prompt's last): one vector against one
vector, a noisy ratio whose largest value over a hundred points and a few prompts has a
long tail. The prefill computes every prompt position anyway; comparing the last K of them
averages the noise out. This prints, per position choice, the largest ratio over every
point and prompt (and where), and the same per kind of point, so a bound can be set with
its margin over the correct ports and under the broken ones.

    .venv/bin/python benchmarks/layer_gates.py --model DIR --candidate vllm \
        [--candidate-model DIR] [--out layer_gates.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

LASTS = (1, 8, 32, 128)  # how many of the prompt's last positions a comparison reads


def per_position(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    c, r = candidate.astype(np.float64), reference.astype(np.float64)
    return np.linalg.norm(c - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), 1e-300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--candidate", default="vllm", choices=("hf", "vllm"))
    parser.add_argument("--candidate-model", help="the candidate's checkpoint (default: --model)")
    parser.add_argument("--prompt-set", default="rag25")
    parser.add_argument("--out", default="layer_gates.json")
    args = parser.parse_args()

    from llm_parity.compare.localize import MIN_FLOOR, parse_point
    from llm_parity.config.prompts import load_prompts, packaged_prompts_path
    from llm_parity.engines.base import EngineSpec, build_engine
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    model = str(Path(args.model).resolve())
    prompts = load_prompts(packaged_prompts_path(args.prompt_set))
    ids = tokenize_prompts(load_tokenizer(model, False), prompts)
    names = [p.id for p in prompts.prompts]
    longest = max(LASTS)
    positions = [list(range(max(0, len(t) - longest), len(t))) for t in ids]

    def captures(backend: str, spec: EngineSpec) -> list[dict]:
        started = time.perf_counter()
        with build_engine(backend, spec) as engine:
            out = [engine.capture(t, p) for t, p in zip(ids, positions)]
        print(f"{spec.role}: {time.perf_counter() - started:.0f} s", flush=True)
        return out

    reference = captures("hf", EngineSpec(model=model, dtype="float32", device="cpu",
                                          role="reference"))
    errors = {}
    for role, backend, spec in (
            ("floor", "hf", EngineSpec(model=model, dtype="bfloat16", device="cpu",
                                       role="floor")),
            ("candidate", args.candidate, EngineSpec(
                model=str(Path(args.candidate_model or model).resolve()), tokenizer=model,
                dtype="bfloat16", device="cpu" if args.candidate == "hf" else "auto",
                role="candidate",
                options={"enforce_eager": True, "enable_prefix_caching": False}
                if args.candidate == "vllm" else {}))):
        got = captures(backend, spec)
        errors[role] = [{n: per_position(c[n], r[n]) for n in r if n in c}
                        for c, r in zip(got, reference)]
        del got

    minimum = MIN_FLOOR["bfloat16"]
    table = {}
    for last in LASTS:
        rows = []
        for prompt, floor, cand in zip(names, errors["floor"], errors["candidate"]):
            for name in cand:
                f = float(np.mean(floor[name][-last:]))
                c = float(np.mean(cand[name][-last:]))
                rows.append((c / max(f, minimum), name, prompt, c, f))
        rows.sort(reverse=True)
        kinds: dict[str, tuple] = {}
        for row in rows:
            kinds.setdefault(parse_point(row[1])[1], row)
        table[last] = {"top": rows[:5], "kinds": kinds,
                       "p99": float(np.percentile([r[0] for r in rows], 99))}
        print(f"\nlast {last} positions: largest {rows[0][0]:.2f}x at {rows[0][1]} "
              f"({rows[0][2]}), p99 {table[last]['p99']:.2f}x")
        for kind, row in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            print(f"  {kind:16s} {row[0]:6.2f}x  {row[1]} ({row[2]})")
    Path(args.out).write_text(json.dumps(
        {"model": model, "candidate": args.candidate,
         "candidate_model": args.candidate_model, "prompts": names, "table": table},
        indent=1, default=str))


if __name__ == "__main__":
    main()
