"""Interrupted runs end in seconds, leave no process behind, and say so. A real pytest run on
the toy model (the candidate is vLLM on CPU) is signalled during the float32 reference,
during vLLM's start and during the candidate's depth view: SIGINT to its process group (what
Ctrl-C does) and SIGTERM to pytest alone (what CI sends to a cancelled job). Each must end
within 15 s of the signal with exit status 2 or 143, a verdict "interrupted" naming the
signal and the step it cut short, a JUnit XML and a report that agree, and no process left:
none in its process group, none of those that ever ran under it.

The phase is read from the run itself: the llm_parity logger's INFO lines (shown live with
--log-cli-level=INFO) and the processes under pytest (vLLM's EngineCore names itself).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import junit_cases, needs_vllm, own_cores

pytestmark = pytest.mark.engine

LIMIT_S = 15  # from the signal to the end of the run
CANDIDATE = "candidate (vllm, configuration eager)"
# Four prompts continued 128 steps: the reference's and the candidate's depth views each
# last a second or more, long enough to be signalled in, and the run stays short.
PROMPTS = [
    "Retrieval-augmented generation first finds passages related to the question, then "
    "writes an answer that quotes them. Why do quotes make the answer easier to check?",
    "A reader asks where to find a history of the printing press. Describe how a helpful "
    "assistant would look the book up in the library's catalogue.",
    "Two documents disagree about when the bridge was opened. Write an answer that names "
    "both documents and says which date is more reliable.",
    "Context: the museum opens at nine on weekdays and at ten on weekends. Question: when "
    "should a family arrive on a Saturday morning?",
]
ARGS = ("-p", "no:cacheprovider", "-m", "precision", "--candidate", "vllm",
        "--configurations", "eager", "--long-prompts", "none", "--continuation", "128",
        "--noise-floor", "off", "--parity-json", "verdict.json", "--parity-report", "report.md",
        "--junitxml", "junit.xml", "--reference-store", "store", "--prompts", "prompts.jsonl",
        "--log-cli-level", "INFO")
# The phase: (what the run must have said, a process it must have started), and the step
# the verdict must say the signal cut short. The reference computes while the candidate's
# engine starts (runner/beside.py): both are under way then, the main thread's first. The
# engine's start is signalled once the reference is done and stored.
PHASES = {
    "reference": (("reference (hf): decoding 4 prompts", None),
                  (f"{CANDIDATE}: starting; reference (hf): decoding 4 prompts",)),
    "engine start": ((f"{CANDIDATE}: starting", "VLLM::EngineCore"),
                     (f"{CANDIDATE}: starting",)),
    "depth view": ((f"{CANDIDATE}: scoring 4 sequences", None),
                   (f"{CANDIDATE}: scoring 4 sequences", f"{CANDIDATE}: decoding 4 prompts")),
}
# Ctrl-C reaches the whole foreground process group; CI signals the process it started.
SIGNALS = {"SIGINT": (signal.SIGINT, True, pytest.ExitCode.INTERRUPTED),
           "SIGTERM": (signal.SIGTERM, False, 128 + signal.SIGTERM)}


@dataclass
class Interrupted:
    path: Path
    returncode: int | None = None
    signalled_after: float | None = None  # seconds from the start of the run to the signal
    ended_after: float | None = None  # seconds from the signal to the end of the run
    engines_at_exit: list[str] = field(default_factory=list)  # vLLM's, alive as it ended
    left: list[str] = field(default_factory=list)  # anything alive a moment later
    problem: str | None = None

    @property
    def output(self) -> str:
        return (self.path / "out.txt").read_text(errors="replace")


def _name(process) -> str:
    import psutil

    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return str(process.pid)


def _running(process) -> bool:
    """Alive and not a zombie (a zombie holds nothing; its parent, or init, reaps it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def interrupt_run(path: Path, phase: str, signame: str, core: int) -> Interrupted:
    """One pytest run in `path`, signalled in `phase`; every process it started is watched
    and, whatever happens, none is left running."""
    import psutil

    (said, started), _ = PHASES[phase]
    signum, to_group, _ = SIGNALS[signame]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
           "PYTHONUNBUFFERED": "1"}
    result = Interrupted(path)
    out = path / "out.txt"
    began = time.monotonic()
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *ARGS], cwd=path, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}  # everything that ever ran under pytest
    me = psutil.Process(proc.pid)

    def watch() -> None:
        try:
            for child in me.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def in_group() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == proc.pid:
                    found.append(process)
            except OSError:
                pass
        return found

    def alive() -> list[str]:
        return sorted({_name(p) for p in [*in_group(), *seen.values()] if _running(p)})

    try:
        while proc.poll() is None and result.signalled_after is None:
            watch()
            if said in out.read_text(errors="replace") and (
                    started is None or any(_name(p).endswith(started) for p in seen.values()
                                           if _running(p))) and (
                    phase != "engine start" or (path / "store" / "key.json").is_file()):
                (os.killpg if to_group else os.kill)(proc.pid, signum)
                result.signalled_after = time.monotonic() - began
                signalled = time.monotonic()
            elif time.monotonic() - began > 600:
                result.problem = f"never reached the {phase}"
                break
            time.sleep(0.05)
        if result.signalled_after is None and result.problem is None:
            result.problem = f"ended (status {proc.returncode}) before the {phase}"
        while proc.poll() is None and result.problem is None:
            watch()
            if time.monotonic() - signalled > 60:
                result.problem = "still running 60 s after the signal"
                break
            time.sleep(0.05)
        if result.problem is None:
            result.returncode = proc.returncode
            result.ended_after = time.monotonic() - signalled
            result.engines_at_exit = [name for name in alive() if "VLLM" in name]
            # multiprocessing's resource tracker exits when it sees pytest gone: a moment.
            deadline = time.monotonic() + 5
            while alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            result.left = alive()
    finally:
        # Whatever went wrong, this test leaves nothing running either.
        for process in [*seen.values(), *([me] if proc.poll() is None else [])]:
            if _running(process):
                try:
                    process.kill()
                except psutil.Error:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every (phase, signal) run, two at a time where two cores are free, longest first."""
    pytest.importorskip("psutil")
    where = tmp_path_factory.mktemp("interrupted")
    cores: queue.Queue = queue.Queue()
    for core in own_cores()[:2]:
        cores.put(core)
    cases = [(phase, signame) for phase in reversed(PHASES) for signame in SIGNALS]

    def run(case):
        path = where / "-".join(case).replace(" ", "_")
        path.mkdir()
        (path / "prompts.jsonl").write_text("".join(
            json.dumps({"id": f"p-{i}", "prompt": text}) + "\n" for i, text in enumerate(PROMPTS)))
        core = cores.get()
        try:
            result = interrupt_run(path, *case, core)
        finally:
            cores.put(core)
        if result.ended_after is not None:  # shown with -rA: how close each run came
            print(f"{case[0]}, {case[1]}: signalled {result.signalled_after:.1f} s in, "
                  f"ended {result.ended_after:.1f} s later")
        return result

    with ThreadPoolExecutor(max_workers=cores.qsize()) as pool:
        return dict(zip(cases, pool.map(run, cases)))


@needs_vllm
@pytest.mark.parametrize("signame", list(SIGNALS))
@pytest.mark.parametrize("phase", list(PHASES))
def test_an_interrupted_run_ends_in_seconds_leaves_nothing_and_says_so(
        runs, read_json, phase, signame):
    run = runs[(phase, signame)]
    assert run.problem is None, f"{run.problem}\n{run.output[-3000:]}"
    assert run.returncode == SIGNALS[signame][2], run.output[-3000:]
    assert run.ended_after < LIMIT_S, f"ended {run.ended_after:.1f} s after the signal"
    assert run.engines_at_exit == [] and run.left == [], (run.engines_at_exit, run.left)

    verdict = read_json(run.path / "verdict.json")  # checked against the shipped schema
    assert verdict["verdict"] == "interrupted"
    assert verdict["interrupted"]["signal"] == signame
    assert verdict["interrupted"]["during"] in PHASES[phase][1], verdict["interrupted"]
    assert verdict["session"]["exit_status"] == run.returncode
    reason = verdict["verdict_reasons"][0]
    assert reason.startswith(f"interrupted by {signame} while ")
    # In every phase it was the precision run itself that the signal stopped.
    assert verdict["error"] == reason and not verdict["prompts"]

    # JUnit agrees: the test the signal cut short is an error that says why, none passed.
    cases = junit_cases(run.path / "junit.xml")
    errors = [name for name, (outcome, _) in cases.items() if outcome == "error"]
    assert len(errors) == 1 == verdict["session"]["tests"]["error"], cases
    assert not [name for name, (outcome, _) in cases.items() if outcome == "passed"]
    assert f"interrupted by {signame}" in (run.path / "junit.xml").read_text()
    assert "INTERRUPTED" in (run.path / "report.md").read_text()

    # The golden store is written only once the reference is whole: never half of one.
    store = run.path / "store"
    if phase == "reference":
        assert not store.exists()
    else:
        assert (store / "key.json").is_file() and (store / "reference.safetensors").is_file()
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".store")]
