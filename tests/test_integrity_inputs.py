"""Verdict integrity, bad input: each case here was accepted before (and judged something
other than what the verdict then said); now it stops before any model loads, with pytest's
usage error (exit 4), in seconds, naming the option or file and what was expected, and
leaving nothing written."""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import pytest

from llm_parity.runner.toymodel import toy_model_dir

ROOT = Path(__file__).resolve().parents[1]


def refused(pytester, *args, within_s: float = 5.0) -> str:
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--parity-json=v.json",
                                           *args)
    elapsed = time.monotonic() - started
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    assert elapsed < within_s, f"refused after {elapsed:.1f} s"
    assert not (pytester.path / "v.json").exists()
    return result.stderr.str()


def test_the_same_prompt_id_in_both_prompt_sets_is_refused(pytester):
    # Two .txt sets both number their prompts p001...: before, one prompt's floor replaced
    # the other's and one of the two depth tests never ran.
    pytester.makefile(".txt", short="a short prompt\nanother one\n")
    pytester.makefile(".txt", long="a long context prompt\n")
    err = refused(pytester, "-m", "precision", "--candidate", "hf", "--prompts=short.txt",
                  "--long-prompts=long.txt")
    assert "--long-prompts: prompt id 'p001'" in err and "long.txt" in err
    assert "short.txt" in err and "keyed by id" in err


@pytest.mark.parametrize(("args", "expected"), [
    (["--candidate", "vllm", "--candidate-option", "dtype=float32"],
     "--candidate-option: 'dtype' changes what this run tests"),
    (["--candidate", "hf", "--candidate-option", "torch_dtype=float32"],
     "use --candidate-dtype"),
    (["--candidate", "vllm", "--candidate-option", "model=/elsewhere"],
     "use --model or --candidate-model"),
    (["--candidate", "vllm", "--candidate-option", "tokenizer=/elsewhere"],
     "--candidate-option: 'tokenizer'"),
    (["--candidate", "hf", "--reference-option", "dtype=bfloat16"],
     "--reference-option (or [reference] options of"),
    (["--candidate", "hf", "--reference-option", "torch_dtype=float16"], "use --reference-dtype"),
    (["--candidate", "hf", "--candidate-option", "rms_norm_eps=0.1"],
     "--candidate-option: 'rms_norm_eps' is not an option of the hf backend; it reads: "
     "device_map"),
    (["--candidate", "openai", "--candidate-url", "http://127.0.0.1:9",
      "--candidate-option", "concurency=4"],
     "'concurency' is not an option of the openai backend; it reads: timeout, retries, "
     "concurrency, served_model"),
], ids=["vllm-dtype", "hf-torch-dtype", "model", "tokenizer", "reference-dtype",
        "reference-torch-dtype", "hf-unknown", "openai-unknown"])
def test_engine_options_that_change_what_is_tested_are_refused(pytester, args, expected):
    assert expected in refused(pytester, "-m", "precision", *args)


def test_a_configuration_or_reference_table_that_changes_the_dtype_is_refused(pytester):
    pytester.makefile(".toml", thresholds=textwrap.dedent("""
        [precision.gates.kl_mean]
        metric = "kl"
        max = 0.01

        [configurations.wide]
        backend = "vllm"
        args = { enforce_eager = true, dtype = "float32" }
        """))
    err = refused(pytester, "-m", "precision", "--candidate", "vllm", "--configurations", "wide")
    assert "[configurations.wide] args: 'dtype' changes what this run tests" in err
    pytester.makefile(".toml", thresholds=textwrap.dedent("""
        [precision.gates.kl_mean]
        metric = "kl"
        max = 0.01

        [reference]
        options = { torch_dtype = "bfloat16" }
        """))
    err = refused(pytester, "-m", "precision", "--candidate", "hf")
    assert "[reference] options of" in err and "use --reference-dtype" in err


@pytest.fixture
def checkout(pytester):
    """A directory laid out like this project's checkout: its pyproject (testpaths naming
    the thresholds file and tests/), the project's own top-level
    conftest.py, tests/ importing its helpers from `conftest`, and an examples/ project with a
    conftest of its own."""
    pytester.makepyprojecttoml(textwrap.dedent("""
        [tool.pytest.ini_options]
        testpaths = ["thresholds.toml", "tests"]
        """))
    shutil.copy(ROOT / "thresholds.toml", pytester.path / "thresholds.toml")
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text("def helper():\n    return 'tests'\n")
    (tests / "test_unit.py").write_text(
        "from conftest import helper\n\ndef test_helper():\n    assert helper() == 'tests'\n")
    example = pytester.mkdir("examples") / "own"
    example.mkdir()
    (example / "conftest.py").write_text("def other():\n    return 'example'\n")
    (example / "test_example.py").write_text("def test_example():\n    pass\n")
    elsewhere = pytester.path.parent / f"{pytester.path.name}-elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copytree(toy_model_dir(), elsewhere / "toy", dirs_exist_ok=True)
    (elsewhere / "store").mkdir(exist_ok=True)
    shutil.copy(ROOT / "thresholds.toml", elsewhere / "other.toml")
    return elsewhere


@pytest.mark.parametrize("flag", ["--model", "--reference-store", "--thresholds"])
def test_a_path_option_written_with_a_space_stops_with_the_spelling_that_works(
        pytester, checkout, flag):
    # Before: 11 collection errors (the rootdir became the path's parent, the ini file was
    # lost, and tests/ imported examples/own/conftest.py as `conftest`), exit 2.
    value = {"--model": checkout / "toy", "--reference-store": checkout / "store",
             "--thresholds": checkout / "other.toml"}[flag]
    err = refused(pytester, "-m", "precision", "--candidate", "hf", flag, str(value))
    assert f"{flag} {value}: pytest takes an existing path" in err
    assert f"Write {flag}={value} (with '=')" in err
    assert str(pytester.path / "pyproject.toml") in err


def test_with_equals_the_checkouts_configuration_holds(pytester, checkout):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "-q", "--candidate", "hf",
        f"--model={checkout / 'toy'}", f"--thresholds={checkout / 'other.toml'}")
    out = result.stdout.str()
    assert result.ret == 0, out + result.stderr.str()
    # testpaths named the checkout's own thresholds.toml, replaced by --thresholds: left out
    # rather than "not found"; the active file's suite and tests/ are collected, never the
    # example project.
    assert "tests/test_unit.py::test_helper" in out and "llm-parity::test_prompt[rag-01]" in out
    assert "examples" not in out and "not found" not in out + result.stderr.str()
    # The checkout's configuration file was the one read.
    header = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "--candidate", "hf",
        f"--model={checkout / 'toy'}").stdout.str()
    assert f"rootdir: {pytester.path}" in header and "configfile: pyproject.toml" in header
    tests = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "tests")
    tests.assert_outcomes(passed=1)
