"""Wall time and peak memory of one pytest run, as a whole process tree.

Runs the given pytest command line in a subprocess (in a scratch directory, so no project
conftest or testpaths join in) and samples, every 0.2 s, the resident set of the test
process and of all its descendants (a vLLM engine core is one). The sampled peaks can miss
a spike shorter than the interval; the kernel's own high-water marks
(`getrusage(RUSAGE_CHILDREN)`, the largest single process once it has exited) cannot, so
both are printed. A sum of resident sets counts the pages processes share (the torch
libraries, a memory-mapped file) once per process: it is an upper bound. CPU time (user
plus system, the whole tree) is printed beside the wall time: on a shared machine it moves
far less than the wall time does.

    python benchmarks/peak_rss.py [--label NAME] [--json out.json] [--repeats N] -- \
        -m precision --model=DIR --candidate hf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

INTERVAL_S = 0.2
GIB = 1 << 30


def measure(args: list[str], cwd: Path, interval: float = INTERVAL_S) -> dict:
    """One run of `python -m pytest ARGS`: its exit status, wall time and peak memory."""
    import psutil

    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peaks = {"process": 0, "tree": 0, "processes": 1}
    started = time.perf_counter()
    with open(cwd / "pytest.log", "w") as log:
        child = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(child.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    own = root.memory_info().rss
                    family = root.children(recursive=True)
                except psutil.Error:
                    return
                total = own
                for process in family:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        continue  # gone between the listing and the reading
                peaks["process"] = max(peaks["process"], own)
                peaks["tree"] = max(peaks["tree"], total)
                peaks["processes"] = max(peaks["processes"], 1 + len(family))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = child.wait()
        finally:
            if child.poll() is None:  # interrupted here: stop the run we started
                child.terminate()
                child.wait()
            done.set()
            sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is in KiB on Linux; it only grows, so an earlier repeat may hide this one's.
    largest = after.ru_maxrss * 1024 if after.ru_maxrss > before.ru_maxrss else None
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"command": cmd, "rc": rc, "wall_s": wall, "cpu_s": cpu,
            "peak_rss_process_bytes": peaks["process"],
            "peak_rss_tree_bytes": peaks["tree"],
            "max_rss_largest_bytes": largest,
            "processes": peaks["processes"], "log": str(cwd / "pytest.log")}


def table(label: str, runs: list[dict]) -> str:
    head = (f"{'run':<16} {'rc':>3} {'wall s':>8} {'cpu s':>8} {'test process GiB':>17} "
            f"{'process tree GiB':>17} {'largest maxrss GiB':>19} {'processes':>9}")
    lines = [head]
    for i, run in enumerate(runs):
        largest = run["max_rss_largest_bytes"]
        lines.append(
            f"{label + (f' #{i + 1}' if len(runs) > 1 else ''):<16} {run['rc']:>3} "
            f"{run['wall_s']:>8.1f} {run['cpu_s']:>8.1f} "
            f"{run['peak_rss_process_bytes'] / GIB:>17.2f} "
            f"{run['peak_rss_tree_bytes'] / GIB:>17.2f} "
            f"{(f'{largest / GIB:.2f}' if largest else '-'):>19} {run['processes']:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [--label NAME] [--json FILE] [--repeats N] -- PYTEST_ARGS...")
    parser.add_argument("--label", default="run", help="the run's name in the table")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cwd", help="run pytest here (default: a scratch directory)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    if not pytest_args:
        parser.error("give the pytest command line after --, e.g. -- -m precision --candidate hf")
    runs = []
    with tempfile.TemporaryDirectory(prefix="peak_rss.") as scratch:
        cwd = Path(args.cwd).resolve() if args.cwd else Path(scratch)
        for _ in range(args.repeats):
            run = measure(pytest_args, cwd)
            lines = Path(run["log"]).read_text(errors="replace").splitlines()
            run["summary"] = lines[-1] if lines else ""
            if run["rc"] not in (0, 1):  # 1: a gate failed, still a whole run
                print("\n".join(lines[-40:]), file=sys.stderr)
            runs.append(run)
            print(f"{args.label}: rc {run['rc']}, {run['summary']}", file=sys.stderr)
    print("python " + " ".join(runs[0]["command"][1:]))
    print(table(args.label, runs))
    if args.json:
        out = {"label": args.label, "cwd": str(cwd) if args.cwd else None,
               "environment": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "PYTHONPATH")
                               if k in os.environ},
               "runs": [{k: v for k, v in run.items() if k != "log"} for run in runs]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(max(run["rc"] for run in runs) if any(r["rc"] not in (0, 1) for r in runs) else 0)


if __name__ == "__main__":
    main()
