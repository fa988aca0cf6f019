"""The live line: on a terminal (a pseudo-terminal here) the phases and their counts are
redrawn in place while the run works, and wiped before pytest writes; into a file they are
plain lines; `-q` and JUnit are left as they were. The real suite on the toy model."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest
from conftest import needs_vllm

from llm_parity.engines.progress import Step
from llm_parity.pytest_plugin.live import SEPARATOR, text

QUICK = ("--long-prompts", "none", "--continuation", "6")


def test_the_line_says_the_count_the_rate_and_the_time_left():
    step = Step("reference (hf): decoding 8 prompts", total=256, unit="tokens", done=96,
                started=100.0)
    assert text(step, 108.0) == ("reference (hf): decoding 8 prompts · 96/256 tokens · "
                                 "12 tokens/s · ETA 13 s · 8 s")
    assert text(Step("candidate (vllm): starting", started=0.0), 75.0) == (
        "candidate (vllm): starting · 1 min 15 s")
    cut = text(step, 108.0, width=64)
    assert len(cut) <= 64 and cut.startswith("reference (hf): …") and cut.endswith("96/256 tokens · 12 tokens/s · ETA 13 s · 8 s")


def run_in_a_terminal(cwd, *args: str, columns: int = 200) -> tuple[int, list[tuple[float, bytes]]]:
    """pytest under a pseudo-terminal; what it wrote, chunk by chunk, with when."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(columns)}
    process = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks: list[tuple[float, bytes]] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the follower side closed: the run is over
                break
            if not data:
                break
            chunks.append((time.monotonic(), data))
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=60), chunks


@pytest.mark.engine
def test_a_terminal_sees_each_phase_and_its_count_while_the_run_works(tmp_path):
    code, chunks = run_in_a_terminal(tmp_path, "-p", "no:cacheprovider", "-m", "precision",
                                     "--candidate", "hf", *QUICK)
    screen = b"".join(data for _, data in chunks).decode("utf-8", "replace")
    assert code == 0, screen[-3000:]
    verdict = screen.index("verdict: PASS")
    for phase in ("reference (hf): starting", "reference (hf): scoring 25 prompts · 25/25 prompts",
                  "reference (hf): decoding 25 prompts · 150/150 tokens",
                  "candidate (hf): scoring 25 sequences · 25/25 sequences",
                  "noise floor (hf bfloat16): first token · 25/25 prompts",
                  "noise floor (hf bfloat16): depth, 6 tokens each · 25/25 prompts"):
        drawn = screen.find("\rllm-parity: " + phase)
        assert 0 <= drawn < verdict, phase  # drawn in place, before the run ended
    # Each drawing is drawn over or wiped before pytest writes again: no line of ours is
    # left on screen.
    for drawn in re.finditer(r"\rllm-parity: [^\r\n]*", screen):
        after = screen[drawn.end():]
        assert after.startswith(("\rllm-parity: ", "\r\x1b[K")), screen[drawn.start():][:200]
    # The lines came while the run worked, not all at its end.
    times = [when for when, data in chunks if b"\rllm-parity: " in data]
    assert times and times[0] < chunks[-1][0]


@pytest.mark.engine
def test_a_file_gets_plain_lines_and_quiet_or_junit_get_none(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--candidate", "hf", *QUICK,
                                           "--progress-interval=0", "--junitxml=out.xml")
    assert result.ret == 0, result.stdout.str()[-3000:]
    out = result.stdout.str()
    assert "\r" not in out and "\x1b[K" not in out
    lines = result.stdout.lines
    for line in ("llm-parity: reference (hf): starting",
                 "llm-parity: reference (hf): scoring 25 prompts · 25/25 prompts",
                 "llm-parity: noise floor (hf bfloat16): first token · 25/25 prompts"):
        assert any(seen.startswith(line) for seen in lines), line
    assert "llm-parity: " not in (pytester.path / "out.xml").read_text()
    # pytest writes the file's name again before the results that follow a line of ours.
    assert re.search(r"^llm-parity \.+", out, re.M) or re.search(r"^\S*thresholds\.toml \.", out, re.M)

    quiet = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-m", "precision",
                                          "--candidate", "hf", *QUICK, "--progress-interval=0")
    assert quiet.ret == 0
    assert not any(line.startswith("llm-parity: ") for line in quiet.stdout.lines)


@needs_vllm
@pytest.mark.engine
def test_a_terminal_sees_the_reference_compute_beside_the_engines_start(tmp_path, read_json):
    code, chunks = run_in_a_terminal(tmp_path, "-p", "no:cacheprovider", "-m", "precision",
                                     "--candidate", "vllm", "--configurations", "eager",
                                     *QUICK, "--parity-json=verdict.json")
    screen = b"".join(data for _, data in chunks).decode("utf-8", "replace")
    assert code == 0, screen[-3000:]
    starting = "candidate (vllm, configuration eager): starting"
    both = [line for line in re.findall(r"\rllm-parity: ([^\r\n\x1b]*)", screen)
            if line.startswith(starting) and SEPARATOR + "reference (hf): " in line
            or line.startswith(starting) and SEPARATOR + "noise floor (hf bfloat16): " in line]
    assert both, screen[-3000:]  # one line, the engine's lane first
    timings = read_json(tmp_path / "verdict.json")["timings"]
    assert 0 < timings["overlap_s"] <= timings["candidate_load_s"] + 0.5, timings
