"""What the precision suite costs over the bare calls it needs, as whole processes.

Runs, back to back and alternating, `bare_calls.py` and `pytest -m precision` on the same
model and candidate, and prints wall times, their ratio (target: at most 1.3), and the
suite's own split into model loading and comparison (from its JSON verdict).

    python benchmarks/precision_overhead.py [--model DIR] [--candidate vllm] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: a gate failed, still a full run
        sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the toy model)")
    parser.add_argument("--candidate", default="vllm", choices=("vllm", "hf"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--continuation", default="0",
                        help="the suite's --continuation (0: the founding protocol, which is "
                             "what the bare calls do)")
    args = parser.parse_args()
    from llm_parity.runner.toymodel import toy_model_dir

    model = str(Path(args.model).resolve()) if args.model else str(toy_model_dir())
    bare, suite, timings = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        verdict = work / "verdict.json"
        for _ in range(args.repeats):
            bare.append(timed([sys.executable, str(HERE / "bare_calls.py"), model,
                               "--candidate", args.candidate], work))
            suite.append(timed([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                                "-m", "precision", f"--model={model}", "--candidate",
                                args.candidate, "--continuation", args.continuation,
                                # the bare calls have no noise floor to measure
                                "--noise-floor", "off",
                                f"--parity-json={verdict}"], work))
            timings = json.loads(verdict.read_text())["timings"]
    b, s = statistics.median(bare), statistics.median(suite)
    loading = sum(v for k, v in timings.items() if k.endswith("_load_s"))
    comparing = sum(v for k, v in timings.items() if not k.endswith("_load_s"))
    print(f"model: {model}\ncandidate: {args.candidate}")
    print(f"bare calls, whole process: {b:.1f} s (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"precision suite, whole process: {s:.1f} s (runs: {', '.join(f'{x:.1f}' for x in suite)})")
    print(f"ratio: {s / b:.2f} (target <= 1.3)")
    print(f"suite split: model loading {loading:.1f} s, comparison and the rest {comparing:.1f} s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in timings.items())})")


if __name__ == "__main__":
    main()
