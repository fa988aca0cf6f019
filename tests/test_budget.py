"""The memory budget: worked out from the checkpoint and the prompts before any model loads,
said at the start, and a run that cannot fit what it is given refused then, with the ways
out. The estimate's accuracy against measured peaks is in docs/notes/batching.md
(benchmarks/peak_rss.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_parity.config.options import OPTIONS, build_settings
from llm_parity.config.sizes import parse_size
from llm_parity.errors import SettingsError
from llm_parity.runner import budget


def settings(tmp_path: Path, **options):
    raw = {o.flag.lstrip("-"): o.default for o in OPTIONS}
    raw.update({k.replace("_", "-"): v for k, v in options.items()})
    return build_settings(raw, tmp_path)


CARD = {"parameters": 7_000_000_000, "vocab_size": 152_064, "layers": 28, "hidden_size": 3584,
        "attention_heads": 28, "kv_heads": 4}


@pytest.mark.parametrize("text, size", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20),
                                        ("2G", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
                                        ("1000", 1000)])
def test_sizes_are_read_in_their_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "-1GiB", "0"])
def test_a_bad_size_is_refused_naming_the_option(tmp_path, text):
    with pytest.raises(SettingsError, match=r"--memory-limit: expected a size"):
        settings(tmp_path, memory_limit=text)


def test_a_7b_reference_is_refused_on_a_small_machine_with_the_ways_out(tmp_path):
    run = settings(tmp_path, memory_limit="24GiB")
    first = [[1] * 60] * 25
    depth = (list(range(33)), [[1] * 1900] * 33)
    with pytest.raises(SettingsError) as refused:
        budget.check(CARD, run, first, depth, reference_stored=False, floor=True,
                     candidate_backend="vllm")
    text = str(refused.value)
    assert "reference weights (float32) 26.08 GiB" in text and "24.00 GiB (--memory-limit)" in text
    assert "llm-parity reference build" in text and "device_map=auto" in text
    assert "--long-prompts none" in text
    # Read from a store, the same run holds only the store's rows: it fits.
    fits = budget.check(CARD, run, first, depth, reference_stored=True, floor=True,
                        candidate_backend="vllm")
    assert fits.total < 24 * 2**30 and "reference weights (float32)" not in fits.parts


def test_an_hf_candidate_adds_its_rows_and_the_largest_engine_counts_once(tmp_path):
    run = settings(tmp_path)
    first, depth = [[1] * 50] * 25, (list(range(33)), [[1] * 500] * 33)
    vllm = budget.estimate(CARD, run, first, depth, reference_stored=False, floor=True,
                           candidate_backend="vllm")
    hf = budget.estimate(CARD, run, first, depth, reference_stored=False, floor=True,
                         candidate_backend="hf")
    row = CARD["vocab_size"] * 4
    assert vllm["reference rows"] == (25 + 33 * 32) * row
    assert hf["candidate rows"] == (25 + 2 * 33 * 32) * row and "candidate rows" not in vllm
    # The engines load one at a time: only the float32 reference's weights are counted.
    assert [k for k in hf if "weights" in k] == ["reference weights (float32)"]


@pytest.mark.engine
def test_a_run_too_large_for_its_memory_is_refused_before_any_model_loads(pytester, read_json):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf",
        "--memory-limit=300MiB", "--parity-json=verdict.json", "--junitxml=out.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*this run needs about * GiB in this process (baseline *"
                                 "more than the 0.29 GiB (--memory-limit) it is given*"])
    out = result.stdout.str()
    assert "reference (hf): starting" not in out  # no engine was built
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "error" and "--memory-limit" in verdict["error"]
    assert not any(key.endswith("_load_s") for key in verdict.get("timings", {}))
    assert "this run needs" in (pytester.path / "out.xml").read_text()
    # Given enough, the same run says its budget as it starts.
    fits = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", "--long-prompts",
        "none", "--continuation", "6", "--progress-interval=0", "--memory-limit=8GiB")
    assert fits.ret == 0, fits.stdout.str()[-2000:]
    fits.stdout.fnmatch_lines(["llm-parity: memory: about * GiB in this process (baseline "
                               "0.75 GiB, reference weights (float32) *; given 8.00 GiB "
                               "(--memory-limit)*"])


def test_reference_build_is_refused_too_without_sending_it_to_itself(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "llm_parity.cli", "reference", "build",
                           str(tmp_path / "store"), "--memory-limit=100MiB"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert "this run needs about" in done.stderr and "device_map=auto" in done.stderr
    assert "llm-parity reference build STORE" not in done.stderr
    assert not (tmp_path / "store").exists()
