"""The reference and the noise floor, one prompt at a time against batched: time and how
far batching moves them.

Builds the same golden store twice with `llm-parity reference build` (the float32
reference and the bf16 floor, the run's default depth unless told), once with `--batch 1`
and once with `--batch N`, on the same cores, and prints each phase's seconds, the
largest difference between the two stores' float32 logits (every stored row: first token,
the greedy continuation), whether the greedy tokens agree, and the floor's values side by
side.

    python benchmarks/batching.py --model=DIR [--batch 8] [--cores 0,1] [-- extra options]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def build(store: Path, model: str, batch: int, cores: str, extra: list[str]) -> dict:
    threads = str(len(cores.split(",")))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    command = ["taskset", "-c", cores, sys.executable, "-m", "llm_parity.cli", "reference",
               "build", str(store), f"--model={model}", "--batch", str(batch), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"batch {batch}: {done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cores", default="0,1")
    parser.add_argument("extra", nargs="*", help="more reference build options")
    args = parser.parse_args()

    import numpy as np
    from safetensors.numpy import load_file

    where = Path(tempfile.mkdtemp(prefix="llm-parity-batching-"))
    runs = {b: build(where / f"batch{b}", args.model, b, args.cores, args.extra)
            for b in (1, args.batch)}
    one, many = (load_file(str(where / f"batch{b}" / "reference.safetensors"))
                 for b in (1, args.batch))
    print(f"{'phase':28} {'batch 1':>10} {f'batch {args.batch}':>10} {'speed-up':>9}")
    for phase in runs[1]["timings"]:
        a, b = runs[1]["timings"][phase], runs[args.batch]["timings"].get(phase, float("nan"))
        print(f"{phase:28} {a:10.1f} {b:10.1f} {a / b if b else float('nan'):8.2f}x")
    total = (runs[1]["seconds"], runs[args.batch]["seconds"])
    print(f"{'whole build':28} {total[0]:10.1f} {total[1]:10.1f} {total[0] / total[1]:8.2f}x")
    moves = {}
    for name in one:
        if one[name].dtype.kind == "f":
            moves[name] = float(np.abs(one[name].astype(np.float64) - many[name]).max())
        else:
            print(f"{name}: {'identical' if np.array_equal(one[name], many[name]) else 'DIFFER'}")
    for name, move in moves.items():
        scale = float(np.abs(one[name]).max())
        print(f"largest |logit difference| in {name}: {move:.3g} (largest |logit| {scale:.3g})")
    floors = [json.loads(next((where / f"batch{b}").glob("noise_floor-*.json")).read_text())
              ["floor"]["views"] for b in (1, args.batch)]
    for view in floors[0]:
        means = [float(np.mean([v for row in f[view].values() for v in row["kl"]]))
                 for f in floors]
        print(f"floor {view}: KL mean {means[0]:.4g} one at a time, {means[1]:.4g} batched")
    print(f"stores in {where}")


if __name__ == "__main__":
    main()
