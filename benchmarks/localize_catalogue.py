"""Localization on the mutant catalogue (llm_parity/testing/catalogue.py): for each broken
copy of a checkpoint, the first diverging layer and module named, against where the mutant
broke it; the benign copies must name nothing. Writes a JSON of rows and prints a table.

    .venv/bin/python benchmarks/localize_catalogue.py --candidate hf
    .venv/bin/python benchmarks/localize_catalogue.py --candidate vllm
    .venv/bin/python benchmarks/localize_catalogue.py --model smollm2 --candidate vllm
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from llm_parity.compare.localize import MODULE_NAMES, LocalizeSettings
from llm_parity.report.messages import ratio
from llm_parity.testing.catalogue import NAMES, run_catalogue


def resolve(model: str) -> Path:
    if model == "toy":
        from llm_parity.runner.toymodel import toy_model_dir

        return toy_model_dir()
    if model == "smollm2":
        from llm_parity.runner.smollm2 import build_smollm2

        return build_smollm2(Path("/tmp/llm-parity-smollm2"))
    return Path(model)


def where(location) -> str:
    """Where a mutant broke the model, as the table says it."""
    if location is None:
        return "nothing (benign)"
    layer, module = location
    if module == "head":
        return "output head"
    if module == "missing":
        return f"layer {layer} (missing)"
    name = MODULE_NAMES.get(module, module) if module else "any module"
    return f"{'any layer' if layer is None else f'layer {layer}'}, {name}"


def times(value) -> str:
    return "" if value is None else ratio(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="toy, smollm2 or a checkpoint directory")
    parser.add_argument("--candidate", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--prompts", nargs="+", default=["rag-01", "long-01"],
                        help="packaged prompt ids (default: a short and a long one)")
    parser.add_argument("--ratio", type=float, default=LocalizeSettings.ratio)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("/tmp/llm-parity-localize"))
    args = parser.parse_args()
    source = resolve(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def report(name, row):
        print(f"{name:24s} {row['where'] or '-':30s} {'ok' if row['right'] else 'WRONG':5s} "
              f"ratio {row['ratio_at_found'] or 0:8.3g} before {row['max_ratio_before'] or 0:6.3g} "
              f"kl/floor {row['kl_vs_floor']:8.3g} load {row['load_s']:5.1f}s capture "
              f"{row['capture_s']:.2f}s", flush=True)

    rows = run_catalogue(source, args.candidate, args.out / "models", prompt_ids=args.prompts,
                         names=args.only or NAMES, ratio=args.ratio, report=report)
    summary = {"model": args.model, "candidate": args.candidate, "prompts": args.prompts,
               "ratio": args.ratio, "rows": rows, "seconds": time.perf_counter() - started,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "right": sum(r["right"] for r in rows.values()), "total": len(rows)}
    name = args.model if args.model in ("toy", "smollm2") else "model"
    (args.out / f"localize-{name}-{args.candidate}.json").write_text(json.dumps(summary, indent=2))
    print("\n| mutant | broken at | named | ratio to floor there | max before |")
    print("|---|---|---|---|---|")
    for key, row in rows.items():
        named = (row["where"] or "nothing") + ("" if row["right"] else " (WRONG)")
        print(f"| {key} | {where(row['expected'])} | {named} | {times(row['ratio_at_found'])} "
              f"| {times(row['max_ratio_before'])} |")
    print(f"\n{summary['right']}/{summary['total']} right in {summary['seconds']:.0f} s; "
          f"peak RSS of this process {summary['peak_rss_mib']:.0f} MiB")
    sys.exit(0 if summary["right"] == summary["total"] else 1)


if __name__ == "__main__":
    main()
