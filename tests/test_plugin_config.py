"""The plugin end to end with pytester, up to the point where a model would load.

Every mistake stops the run with pytest's usage error (exit 4) and a message naming the
file, key or value, and no model is loaded (these runs take well under a second each).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from llm_parity.config.prompts import load_prompts, packaged_prompts_path
from llm_parity.config.thresholds import load_thresholds, packaged_thresholds_path


def long_prompt_count():
    path = packaged_prompts_path("rag_long")
    return len(load_prompts(path)) if path.is_file() else 0


GOOD_GATE = '[precision.gates.kl_mean]\nmetric = "kl"\naggregate = "mean"\nmax = 0.01\n'


def usage_error(pytester, *args):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    return result.stderr.str()


def test_help_lists_the_options_and_markers(pytester):
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    out = result.stdout.str()
    for flag in ("--model", "--candidate", "--candidate-model", "--candidate-dtype",
                 "--reference-dtype", "--candidate-device", "--reference-device",
                 "--thresholds", "--prompts", "--logprobs", "--parity-json", "--parity-report"):
        assert flag in out
    markers = pytester.runpytest_subprocess("--markers").stdout.str()
    assert "@pytest.mark.precision" in markers and "@pytest.mark.performance" in markers


def test_importing_the_plugin_does_not_import_torch_or_vllm():
    code = ("import sys, llm_parity.pytest_plugin, llm_parity.compare.metrics, llm_parity.report.verdict; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_metric_in_thresholds_names_file_and_key(pytester):
    pytester.makefile(".toml", thresholds='[precision.gates.kl_mean]\nmetric = "kld"\nmax = 0.01\n')
    err = usage_error(pytester, "-m", "precision")
    assert "thresholds.toml: [precision.gates.kl_mean] unknown metric 'kld' (did you mean 'kl'?)" in err


def test_misspelt_key_and_wrong_type(pytester):
    pytester.makefile(".toml", thresholds='[precision.gates.kl_mean]\nmetric = "kl"\nmaximum = 0.01\n')
    assert "unknown key 'maximum'" in usage_error(pytester)
    pytester.makefile(".toml", thresholds='[precision.gates.kl_mean]\nmetric = "kl"\nmax = "low"\n')
    assert "max must be a number, got a string 'low'" in usage_error(pytester)


def test_explicit_thresholds_path_is_checked(pytester):
    pytester.makefile(".toml", gates="[precision.gates.x]\nmetric = 'kl'\n")
    err = usage_error(pytester, "--thresholds", "gates.toml")
    assert "gates.toml: [precision.gates.x] missing bound" in err
    assert "nope.toml: cannot read" in usage_error(pytester, "--thresholds", "nope.toml")


def test_empty_prompt_set(pytester):
    pytester.makefile(".txt", prompts="# only a comment\n\n")
    err = usage_error(pytester, "--prompts", "prompts.txt")
    assert "prompts.txt: the prompt set is empty" in err


def test_missing_model_directory(pytester):
    err = usage_error(pytester, "--model", "./no-such-checkpoint")
    assert "--model: " in err and "no-such-checkpoint does not exist" in err


def test_directory_that_is_not_a_checkpoint(pytester):
    pytester.mkdir("empty")
    err = usage_error(pytester, "--candidate-model", "empty")
    assert "--candidate-model: " in err and "no readable config.json" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--candidate", "tgi"], "--candidate: unknown backend 'tgi'"),
        (["--candidate-dtype", "bf16"], "--candidate-dtype: unknown dtype 'bf16'"),
        (["--candidate-device", "tpu"], "--candidate-device: unknown device 'tpu'"),
        (["--logprobs", "0"], "--logprobs: expected a positive integer, got 0"),
        (["--logprobs", "many"], "--logprobs: expected a positive integer, got 'many'"),
        (["--parity-json", "missing-dir/v.json"], "--parity-json: the directory"),
        (["--parity-json", "verdict.txt"], "--parity-json: 'verdict.txt' should end in .json"),
        (["--candidate-option", "enforce-eager"], "--candidate-option: expected KEY=VALUE"),
    ],
)
def test_bad_options_are_named(pytester, args, expected):
    assert expected in usage_error(pytester, *args)


def test_ini_keys_work_and_the_command_line_wins(pytester):
    pytester.makeini("[pytest]\nlogprobs = 0\n")
    assert "--logprobs: expected a positive integer, got 0" in usage_error(pytester)
    result = pytester.runpytest_subprocess("--logprobs", "5", "--collect-only", "-q",
                                           "--candidate", "hf")
    assert result.ret == 0


def test_unrelated_project_does_not_get_the_suite(pytester):
    pytester.makepyfile(test_other="def test_one():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)


DEPTH_PROMPT_GATES = """
[precision.prompt_gates.sequence_kl]
over = "sequence"
metric = "kl"
max = 0.1

[precision.prompt_gates.decode_defect]
over = "decode"
metric = "top1_defect"
aggregate = "rate"
max = 0.0
"""


def test_collects_the_suite_from_the_thresholds_file(pytester):
    prompt_gate = '[precision.prompt_gates.kl]\nmetric = "kl"\nmax = 0.1\n'
    pytester.makefile(".toml", thresholds=GOOD_GATE + prompt_gate + DEPTH_PROMPT_GATES)
    pytester.makefile(".txt", prompts="one prompt here\nanother prompt\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "--prompts", "prompts.txt")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "thresholds.toml::test_prompt[[]p001[]]",
        "thresholds.toml::test_prompt[[]p002[]]",
        "thresholds.toml::test_sequence[[]p001[]]",
        "thresholds.toml::test_decode[[]p002[]]",
        "thresholds.toml::test_gate[[]kl_mean[]]",
        "thresholds.toml::test_localization",
    ])
    depth = 2 * (2 + long_prompt_count())
    assert f"{2 + depth + 1 + 1} tests collected" in result.stdout.str()
    # --continuation 0 keeps to the founding protocol: first token only.
    founding = pytester.runpytest_subprocess("--collect-only", "-q", "--prompts", "prompts.txt",
                                             "--continuation", "0")
    assert "4/6 tests collected (2 deselected)" in founding.stdout.str()


def test_depth_tests_are_left_out_when_no_prompt_gate_reads_their_view(pytester):
    # Before, each depth test with no per-prompt gate over its view passed whatever the
    # candidate did: items that could never fail, counted among "passed".
    only_sequence = DEPTH_PROMPT_GATES.split("[precision.prompt_gates.decode_defect]")[0]
    pytester.makefile(".toml", thresholds=GOOD_GATE + only_sequence)
    pytester.makefile(".txt", prompts="one prompt here\nanother prompt\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "--prompts", "prompts.txt")
    assert result.ret == 0
    out = result.stdout.str()
    depth = 2 + long_prompt_count()
    assert "thresholds.toml::test_sequence[p001]" in out and "test_decode[" not in out
    assert f"{2 + depth + 1 + 1}/{2 + 2 * depth + 1 + 1} tests collected ({depth} deselected)" in out


def test_packaged_suite_runs_when_asked_without_a_local_file(pytester):
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-m", "precision",
                                           "--candidate", "hf")
    assert result.ret == 0
    out = result.stdout.str()
    assert "llm-parity::test_prompt[rag-01]" in out and "llm-parity::test_prompt[rag-25]" in out
    assert "llm-parity::test_gate[top1_match_rate]" in out
    assert "llm-parity::test_sequence[rag-01]" in out and "llm-parity::test_decode[rag-25]" in out
    gates = len(load_thresholds(packaged_thresholds_path()).gates)
    # -m precision leaves the performance tests out.
    # test_localization and the packaged layer gate, once each.
    assert f"{25 + 2 * (25 + long_prompt_count()) + gates + 2}/" in out and "deselected" in out
    assert "llm-parity::test_localization" in out
    assert "llm-parity::test_layer_gate[max_ratio]" in out
    assert "test_benchmark" not in out


def test_vllm_suite_ids_carry_the_configuration(pytester):
    # The packaged file declares vLLM configurations; compiled and eager are the defaults.
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-m", "precision",
                                           "--candidate", "vllm")
    assert result.ret == 0
    out = result.stdout.str()
    for name in ("compiled", "eager"):
        assert f"llm-parity::test_prompt[{name}-rag-01]" in out
        assert f"llm-parity::test_gate[{name}-kl_mean]" in out
        assert f"llm-parity::test_decode[{name}-rag-25]" in out
    gates = len(load_thresholds(packaged_thresholds_path()).gates)
    # test_localization and the layer gate once: one configuration is captured.
    assert f"{2 * (25 + 2 * (25 + long_prompt_count()) + gates) + 2}/" in out
    assert "llm-parity::test_layer_gate[max_ratio]" in out and "-max_ratio]" not in out
    chosen = pytester.runpytest_subprocess("--collect-only", "-q", "-m", "precision",
                                           "--candidate", "vllm",
                                           "--configurations", "serial,prefix_cache")
    assert "llm-parity::test_gate[serial-kl_mean]" in chosen.stdout.str()
    assert "llm-parity::test_gate[prefix_cache-kl_mean]" in chosen.stdout.str()
    assert "eager-" not in chosen.stdout.str()


def test_platform_only_gates_are_collected_and_marked(pytester):
    pytester.makefile(".toml", thresholds=GOOD_GATE + (
        '[platforms.npu.precision.gates.js_max]\nmetric = "js"\naggregate = "max"\nmax = 0.1\n'))
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-m", "precision")
    result.stdout.fnmatch_lines(["*test_gate[[]kl_mean[]]", "*test_gate[[]js_max[]]"])
    assert "performance" not in result.stdout.str()
