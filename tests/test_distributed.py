"""Prompt sets split across pytest-xdist workers (`pytest -m precision -n 2`): the same
verdict as one process on the same golden store, one JSON verdict and JUnit file written by
the controller, and a clear refusal without a store. Real Transformers on the toy model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from conftest import junit_cases

from llm_parity.runner.toymodel import toy_model_dir
from llm_parity.testing.mutants import make_mutant

pytestmark = pytest.mark.engine

QUICK = ("--long-prompts", "none", "--continuation", "6")
SAME = ("verdict", "gates", "prompts", "sequences", "decodes", "aggregate", "noise_floor",
        "not_judged")


@pytest.fixture(scope="module", autouse=True)
def torch_loaded_before_pytester():
    """pytester drops modules first imported during a test; torch cannot be imported twice."""
    import torch

    return torch


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The toy's reference and floor, built once, before any worker starts."""
    where = tmp_path_factory.mktemp("shared")
    done = subprocess.run([sys.executable, "-m", "llm_parity.cli", "reference", "build",
                           "store", *QUICK], cwd=where, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return where / "store"


def run(pytester, store, name, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", *QUICK,
        f"--reference-store={store}", f"--parity-json={name}.json",
        "--junitxml", f"{name}.xml", *args)


@pytest.mark.parametrize("broken", [False, True], ids=["correct", "layer_noise"])
def test_two_workers_give_the_single_process_verdict(pytester, store, read_json, broken):
    extra = ()
    if broken:
        model = make_mutant(toy_model_dir(), pytester.path / "broken", "layer_noise")
        extra = (f"--candidate-model={model}",)
    one = run(pytester, store, "one", *extra)
    two = run(pytester, store, "two", "-n", "2", *extra)
    assert one.ret == two.ret == (pytest.ExitCode.TESTS_FAILED if broken else 0)
    assert "prompts split across 2 workers (pytest-xdist), judged together" in two.stdout.str()
    single, split = read_json(pytester.path / "one.json"), read_json(pytester.path / "two.json")
    # The layer gates read a capture, which workers do not make: not judged there, saying
    # why; everything else is the single process's.
    (layer_gate,) = single["layer_gates"]
    layer_not_judged = [n for n in split["not_judged"] if n.get("scope") == "layer"]
    assert [n["name"] for n in layer_not_judged] == [layer_gate["name"]]
    assert "xdist" in layer_not_judged[0]["reason"]
    split["not_judged"] = [n for n in split["not_judged"] if n.get("scope") != "layer"]
    for key in SAME:
        assert single[key] == split[key], key
    assert split["candidate"]["workers"] == 2
    # Replayed on both sides: neither run built a reference or floor engine.
    assert "reference_load_s" not in split["timings"]
    cases_one = junit_cases(pytester.path / "one.xml")
    cases_two = junit_cases(pytester.path / "two.xml")
    # Localization loads the float32 reference the split exists to avoid: the split run says
    # so and skips it; the single process localizes the broken port (and fails with it).
    assert split["localization"]["skipped"].startswith("not under pytest-xdist")
    assert cases_two.pop("test_localization")[0] == "skipped"
    assert cases_one.pop("test_localization")[0] == ("failure" if broken else "skipped")
    gate_test = f"test_layer_gate[{layer_gate['name']}]"
    assert cases_two.pop(gate_test)[0] == "skipped"
    assert cases_one.pop(gate_test)[0] == ("passed" if layer_gate["passed"] else "failure")
    tests_one, tests_two = dict(single["session"]["tests"]), dict(split["session"]["tests"])
    tests_one["passed" if layer_gate["passed"] else "failed"] -= 1
    tests_one["skipped"] += 1
    if broken:
        tests_one["failed"] -= 1
        tests_one["skipped"] += 1
    assert tests_one == tests_two
    assert {n: o for n, (o, _) in cases_one.items()} == {n: o for n, (o, _) in cases_two.items()}
    assert cases_two["test_gate[kl_mean]"][1]["value"] == cases_one["test_gate[kl_mean]"][1]["value"]
    if broken:
        assert split["verdict"] == "fail"
        assert "llm-parity" in two.stdout.str() and "verdict: FAIL" in two.stdout.str()


def test_workers_without_a_store_are_refused_before_any_model(pytester, tmp_path):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--candidate", "hf", *QUICK, "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "pytest -n splits the prompts across workers" in result.stderr.str()
    assert "llm-parity reference build DIR" in result.stderr.str()
    missing = tmp_path / "nothing-here"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--candidate", "hf", *QUICK, "-n", "2",
                                           f"--reference-store={missing}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--reference-store {missing}: it does not exist yet" in result.stderr.str()


def test_workers_never_rewrite_or_measure_into_the_store(pytester, store, tmp_path):
    # Before: -n with --reference-store-update had every worker rewrite the store, and a
    # store without the floor had every worker measure it, racing on one temporary file.
    update = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--candidate", "hf", *QUICK, "-n", "2",
                                           f"--reference-store={store}",
                                           "--reference-store-update")
    assert update.ret == pytest.ExitCode.USAGE_ERROR
    assert "--reference-store-update under pytest -n would have every worker rewrite" \
        in update.stderr.str()
    no_floor = tmp_path / "no-floor"
    shutil.copytree(store, no_floor)
    for floor in no_floor.glob("noise_floor-*"):
        floor.unlink()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "precision",
                                           "--candidate", "hf", *QUICK, "-n", "2",
                                           f"--reference-store={no_floor}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "holds no bfloat16 floor at --logprobs 20" in result.stderr.str()
    assert "or add --noise-floor off" in result.stderr.str()


def test_a_run_whose_workers_share_nothing_still_writes_its_verdict(pytester, store,
                                                                   read_json):
    # Before: a stale store stopped every worker before the exchange, nothing was written,
    # and a verdict.json from an earlier run stayed on disk saying pass while pytest exited 1.
    (pytester.path / "two.json").write_text('{"verdict": "pass"}')
    result = run(pytester, store, "two", "-n", "2", "--continuation", "4")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    verdict = read_json(pytester.path / "two.json")
    assert verdict["verdict"] == "error" and verdict["session"]["exit_status"] == 1
    assert "no pytest-xdist worker of 2 shared its candidate answers" in verdict["error"]
    cases = junit_cases(pytester.path / "two.xml")
    assert cases and any(o in ("failure", "error") for o, _ in cases.values())


@pytest.mark.parametrize("when", ["before it reports its collection",
                                  "as its tests are sent"])
def test_a_worker_lost_before_the_exchange_ends_the_run_naming_it(pytester, store,
                                                                 read_json, when):
    # Before: the other workers waited six hours for its share. When a worker dies just
    # after its collection reached the controller, pytest-xdist's send of its tests fails
    # with an internal error, and pytest then prints no summary (seen in CI). Here the
    # controller kills gw1 once both collections are in and fails as pytest-xdist does.
    # The verdict is still written, and shown.
    late = when.startswith("as")
    pytester.makeconftest(f"""
        import os, pathlib, signal, time
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(session):
            if os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
                staging = pathlib.Path("gw1.pid.tmp")
                staging.write_text(str(os.getpid()))
                staging.rename("gw1.pid")  # whole, or not there
                if not {late}:
                    os._exit(3)  # dies before it has any answer to share

        collected = []

        @pytest.hookimpl(trylast=True)
        def pytest_xdist_node_collection_finished(node, ids):
            collected.append(node)
            if {late} and len(collected) == 2:  # xdist sends the tests when this returns
                written = pathlib.Path("gw1.pid")  # gw1 writes it just after it reports
                for _ in range(600):
                    if written.exists() and written.read_text():
                        break
                    time.sleep(0.05)
                pid = int(written.read_text())
                os.kill(pid, signal.SIGKILL)
                stat = pathlib.Path(f"/proc/{{pid}}/stat")
                while stat.exists() and stat.read_text().split()[2] != "Z":
                    time.sleep(0.05)
                raise OSError("cannot send (already closed?)")
    """)
    started = time.monotonic()
    result = run(pytester, store, "two", "-n", "2", "--max-worker-restart=0")
    assert time.monotonic() - started < 60
    assert result.ret != 0
    verdict = read_json(pytester.path / "two.json")
    assert verdict["verdict"] == "error", verdict.get("error")
    # Named by gw0 while it waits, or by the controller once xdist has stopped the run.
    assert "worker gw1 of 2 (pid" in verdict["error"], verdict["error"]
    assert "ended before it shared its candidate answers" in verdict["error"]
    assert "worker gw1 of 2 (pid" in result.stdout.str()


def test_each_worker_can_be_given_its_own_devices():
    from llm_parity.pytest_plugin.distributed import visible_devices

    assert visible_devices(0, 1) == {"CUDA_VISIBLE_DEVICES": "0",
                                     "ASCEND_RT_VISIBLE_DEVICES": "0"}
    assert visible_devices(2, 4)["ASCEND_RT_VISIBLE_DEVICES"] == "8,9,10,11"


def test_workers_see_the_devices_they_were_given(pytester, store):
    # A user test in the same run reads the worker's environment.
    pytester.makepyfile(test_env="""
        import json, os
        def test_where(request):
            worker = os.environ["PYTEST_XDIST_WORKER"]
            with open(f"env-{worker}.json", "w") as f:
                json.dump({k: os.environ.get(k) for k in
                           ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES",
                            "OMP_NUM_THREADS")}, f)
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--candidate", "hf", *QUICK,
        f"--reference-store={store}", "-n", "2", "--devices-per-worker", "2", "--dist", "each", "test_env.py",
        "-m", "not precision and not performance")
    assert result.ret == 0, result.stdout.str()[-2000:]
    import json

    seen = {w: json.loads((pytester.path / f"env-{w}.json").read_text()) for w in ("gw0", "gw1")}
    assert seen["gw0"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert seen["gw1"]["ASCEND_RT_VISIBLE_DEVICES"] == "2,3"
    assert seen["gw0"]["OMP_NUM_THREADS"] is not None
