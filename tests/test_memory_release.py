"""A closed engine's freed memory goes back to the system (engines/_torch.release_memory),
so the next engine's weights do not come on top of it in the run's resident set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import psutil, torch
    from llm_parity.engines._torch import release_memory

    rss = lambda: psutil.Process().memory_info().rss / 2**20
    blocks, pins = [], []
    for _ in range(64):  # 256 MiB in 4 MiB tensors, each followed by a small live one
        blocks.append(torch.ones(4 << 20, dtype=torch.uint8))
        pins.append(torch.ones(16))
    del blocks
    before = rss()
    release_memory()
    print(before, rss())
""")


def test_freed_tensors_leave_the_resident_set():
    # glibc's thresholds fixed where a run's heap grows them to (they rise with each large
    # block freed): 4 MiB blocks come from the heap, which frees nothing back by itself.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
           "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    # Without the trim the freed 256 MiB stay resident (a bare gc.collect() leaves them).
    assert before - after > 200, (before, after)
