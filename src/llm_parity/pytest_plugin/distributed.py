"""pytest-xdist: `pytest -m precision -n N` gives each worker a share of the prompts, with
its own engines, and the controller one verdict judged on all prompts.

Each worker runs the candidate on its share before its first test (so no worker waits on
one that has not started) and reads the others' shares back (runner/exchange.py): every
worker judges the same gates on all prompts. The controller reads them too, once the
workers are done, and writes the one verdict and report. The float32 reference and the
noise floor must be in a golden store before the workers start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llm_parity.pytest_plugin.state import OUTCOMES_KEY, SESSION_KEY

EXCHANGE = "llm_parity_exchange"


def is_controller(config: pytest.Config) -> bool:
    return (not hasattr(config, "workerinput")
            and bool(config.getoption("numprocesses", None))
            and config.getoption("dist", "no") != "no")


def setup_controller(config: pytest.Config) -> None:
    """Before the workers start: the store must exist, the exchange directory is made."""
    session = config.stash[SESSION_KEY]
    store = session.settings.reference_store
    from llm_parity.runner.golden import ReferenceStore

    build = ("Build it once first, with the run's --model, --prompts, --long-prompts and "
             "--continuation: llm-parity reference build DIR ..., then run pytest -n N "
             "--reference-store=DIR")
    if store is None or not ReferenceStore(store).exists():
        where = f"--reference-store {store}" if store else "no --reference-store"
        raise pytest.UsageError(
            f"llm-parity: pytest -n splits the prompts across workers, which share the "
            f"float32 reference through a golden store ({where}: "
            f"{'it does not exist yet' if store else 'none given'}). {build}")
    settings = session.settings
    if settings.reference_store_update:
        raise pytest.UsageError(
            "llm-parity: --reference-store-update under pytest -n would have every worker "
            f"rewrite {store}; rewrite it once without -n (or with llm-parity reference build), "
            "then run pytest -n N")
    if _floor_needed(settings) and not ReferenceStore(store).floor_path(
            settings.candidate_dtype, settings.logprobs).is_file():
        raise pytest.UsageError(
            f"llm-parity: the gates relative to the noise floor need it in the golden store "
            f"{store}, which holds no {settings.candidate_dtype} floor at --logprobs "
            f"{settings.logprobs}; under pytest -n the workers only read it. {build} (without "
            "--noise-floor off), or add --noise-floor off to leave those gates unjudged")
    config.pluginmanager.register(Controller(config), "llm-parity-xdist-controller")


def _floor_needed(settings) -> bool:
    """Whether this run reads a noise floor, on any platform its gates may resolve to."""
    from llm_parity.runner.floor import _floor_wanted

    return any(_floor_wanted(settings, settings.thresholds(platform, settings.model))
               for platform in (None, "npu", "cuda", "cpu", "xpu"))


class Controller:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.path = Path(tempfile.mkdtemp(prefix="llm-parity-exchange-"))
        self.workers = 0
        self.expects_precision = False  # a worker collected a precision test of the suite
        session = config.stash[SESSION_KEY]
        thresholds = session.settings.thresholds_path
        root = Path(config.rootpath).resolve()
        prefix = (thresholds.relative_to(root).as_posix() if root in thresholds.parents
                  else "llm-parity")
        config.stash[OUTCOMES_KEY].prefix = prefix + "::"

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        # A worker that dies before any test reports: its peers' collection still says the
        # precision tests were to run, so the verdict is still written.
        if any(f"::{name}[" in nodeid for nodeid in ids for name in PRECISION_TESTS):
            self.expects_precision = True

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        node.workerinput[EXCHANGE] = str(self.path)
        self.workers += 1

    def finish(self) -> None:
        """Read every worker's shares and build the run the verdict is made from; when no
        worker shared any, the verdict says so (an error), never nothing."""
        from llm_parity.errors import EngineError
        from llm_parity.runner.exchange import Exchange

        session = self.config.stash[SESSION_KEY]
        if session.attempted:
            return
        ran = self.config.stash[OUTCOMES_KEY].selected
        if not self.expects_precision and not any(
                f"::{name}[" in nodeid for nodeid in ran for name in PRECISION_TESTS):
            return  # no precision test of the suite was to run (deselected): nothing to judge
        if not any(self.path.glob("*.pickle")):
            exchange = Exchange(self.path, self.workers, index=None)
            lost = [why for i in range(self.workers) if (why := exchange.lost(i, 0.0))]
            session.attempted = True
            session.error = EngineError(
                f"no pytest-xdist worker of {self.workers} shared its candidate answers: each "
                "stopped before the exchange (their errors are in the test report above)"
                + "".join(f"; {why}" for why in lost))
            return
        session.exchange = Exchange(self.path, self.workers, index=None, wait_s=5.0)
        try:
            session.precision()
        except Exception:  # noqa: BLE001 - kept in session.error, reported in the verdict
            pass

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def setup_worker(config: pytest.Config) -> None:
    """On a worker: its share of the prompts, and its share of the cores."""
    from llm_parity.runner.exchange import Exchange

    workerinput = config.workerinput  # type: ignore[attr-defined]
    count = int(workerinput.get("workercount", 1))
    index = int(str(workerinput["workerid"]).removeprefix("gw"))
    exchange = Exchange(Path(workerinput[EXCHANGE]), count, index)
    exchange.announce()  # the others can tell a worker that died from one still working
    config.stash[SESSION_KEY].exchange = exchange
    # Processes computing at once on shared cores slow each other down many times when
    # each takes every core: give each its share, unless the user chose.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    per_worker = config.stash[SESSION_KEY].settings.devices_per_worker
    if per_worker:
        os.environ.update(visible_devices(index, per_worker))
    config.pluginmanager.register(Worker(), "llm-parity-xdist-worker")


VISIBILITY = ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")


def visible_devices(index: int, per_worker: int) -> dict[str, str]:
    """The visibility variables that give worker `index` its own `per_worker` devices."""
    devices = ",".join(str(d) for d in range(index * per_worker, (index + 1) * per_worker))
    return {name: devices for name in VISIBILITY}


# The suite's tests that read the precision run (each worker runs it before the first).
PRECISION_TESTS = ("test_prompt", "test_sequence", "test_decode", "test_gate")


class Worker:
    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        state = session.config.stash[SESSION_KEY]
        if any(getattr(item, "originalname", "") in PRECISION_TESTS for item in session.items):
            try:
                state.precision()  # this worker's share first, then everyone's
            except Exception:  # noqa: BLE001 - kept in session.error; each test raises it
                pass
        return (yield)
