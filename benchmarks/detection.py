"""Detection power: which deliberately broken ports the founding protocol and the whole
suite catch, and whether benign changes pass. Each catalogue entry of
`llm_parity.testing.mutants` is made from the toy checkpoint and run through the suite as
`--candidate-model`; the float32 reference and the bf16 noise floor are computed once
and replayed from a golden store.

    .venv/bin/python benchmarks/detection.py --candidate vllm --out /tmp/detection
    .venv/bin/python benchmarks/detection.py --model SMOLLM2_DIR --out /tmp/detection-real \
        -- --configurations eager

`--family F` runs that family's catalogue (`llm_parity.testing.family_mutants`) on its
stand-in (`llm-parity toy-model --family F`, or `--model`), and its test-only vLLM faults
(tests/plugins, installed by scripts/install.sh) on the correct checkpoint, and says where
localization put each:

    .venv/bin/python benchmarks/detection.py --family qwen3_moe --out /tmp/detect-moe \
        -- --configurations eager
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llm_parity.runner.toymodel import write_toy_model
from llm_parity.testing.family_mutants import FAMILY_CATALOGUE, family_mutant
from llm_parity.testing.mutants import BENIGN, CATALOGUE, detection, make_mutant

# The test-only engine faults (tests/plugins/llm_parity_test_faults.py) of each family.
FAMILY_FAULTS = {"qwen3_moe": ("moe_renormalize",), "gemma3": ("gemma_embed_scale",)}


def run_suite(out: Path, name: str, candidate: str, model: Path | None, extra: list[str],
              source: Path | None = None, fault: str = "") -> dict:
    verdict_path = out / f"{name}.json"
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "precision",
            "--candidate", candidate, f"--reference-store={out / 'store'}",
            f"--parity-json={verdict_path}", *extra]
    if source is not None:
        args += [f"--model={source}"]
    if model is not None:
        args += [f"--candidate-model={model}"]
    started = time.perf_counter()
    env = {**os.environ, "LLM_PARITY_VLLM_FAULT": fault}
    proc = subprocess.run(args, cwd=out, capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if not verdict_path.is_file():
        raise SystemExit(f"{name}: no verdict written (exit {proc.returncode}); see "
                         f"{out / (name + '.log')}")
    verdict = json.loads(verdict_path.read_text())
    row = detection(verdict)
    row["where"] = (verdict.get("localization") or {}).get("where", "")
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", default="vllm")
    parser.add_argument("--model", type=Path, default=None,
                        help="the checkpoint the catalogue breaks (default: the toy model), "
                             "e.g. one made by `llm-parity smollm2`")
    parser.add_argument("--out", type=Path, default=Path("/tmp/llm-parity-detection"))
    parser.add_argument("--only", nargs="*", default=None, help="catalogue names to run")
    parser.add_argument("--family", default=None, choices=sorted(FAMILY_CATALOGUE),
                        help="run this family's catalogue and engine faults instead")
    parser.add_argument("extra", nargs="*", help="more suite options, after --")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of an earlier run's detection.json")
    args = parser.parse_args()
    if args.table_only:
        rows = json.loads((args.out / "detection.json").read_text())
        for name, row in rows.items():
            if name != "correct":
                verdict = json.loads((args.out / f"{name}.json").read_text())
                row.update(detection(verdict))
        print_table(rows, [n for n in rows if n != "correct"])
        return
    args.out.mkdir(parents=True, exist_ok=True)
    family = args.family
    catalogue = FAMILY_CATALOGUE[family] if family else CATALOGUE
    faults = FAMILY_FAULTS.get(family, ()) if family else ()
    names = args.only or [*catalogue, *(f"fault:{f}" for f in faults)]
    source = args.model
    if source is None:
        source = args.out / "models" / "correct"
        if not source.exists():
            write_toy_model(source, family or "llama")
    rows = {"correct": run_suite(args.out, "correct", args.candidate, None, args.extra,
                                 source)}
    for name in names:
        target = args.out / "models" / name
        if name.startswith("fault:"):
            rows[name] = run_suite(args.out, name.replace(":", "-"), args.candidate, None,
                                   args.extra, source, fault=name.removeprefix("fault:"))
        else:
            if not target.exists():
                if family:
                    family_mutant(source, target, family, name)
                else:
                    make_mutant(source, target, name)
            rows[name] = run_suite(args.out, name, args.candidate, target, args.extra, source)
        print(name, rows[name]["verdict"], rows[name]["failed_gates"], flush=True)
        # written after every row, so an interrupted catalogue keeps what it measured
        (args.out / "detection.json").write_text(json.dumps(rows, indent=2))
    print_table(rows, names)


def print_table(rows: dict, names: list[str]) -> None:
    print("\n| candidate | expected | founding protocol | full suite | caught by | where |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        broken = name != "correct" and name not in BENIGN
        expected = "fail" if broken else "pass"
        founding = "fail" if row["founding_caught"] else "pass"
        if row.get("founding_near_ties_only"):
            founding = "fail (near-tie flip only)"
        suite = row["verdict"]
        caught = ", ".join(row["failed_gates"][:4]) or (row["error"] or "")[:60]
        if not row["failed_gates"] and row["failed_prompt_gates"]:
            caught = "per-prompt: " + ", ".join(row["failed_prompt_gates"][:3])
        print(f"| {name} | {expected} | {founding} | {suite} | {caught} | "
              f"{row.get('where', '')} |")
    broken_rows = [rows[n] for n in names if n not in BENIGN]
    benign_rows = [rows[n] for n in names if n in BENIGN] + [rows["correct"]]
    luck = sum(r.get("founding_near_ties_only", False) for r in broken_rows)
    print(f"\nbroken caught: founding protocol {sum(r['founding_caught'] for r in broken_rows)}"
          f"/{len(broken_rows)} ({luck} of them only through a near-tie flip), "
          f"full suite {sum(r['suite_caught'] for r in broken_rows)}"
          f"/{len(broken_rows)}; benign passing: "
          f"{sum(not r['suite_caught'] for r in benign_rows)}/{len(benign_rows)}")


if __name__ == "__main__":
    main()
