"""Candidate configurations (fast layer): the file's [configurations], their selection,
the comparison between configurations, and how the verdict, summary and report show them.
The real-engine matrix is in test_configurations_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import configured_session

from llm_parity.config.configurations import Configuration, parse_configurations
from llm_parity.config.options import OPTIONS, build_settings
from llm_parity.config.thresholds import ThresholdsFile, packaged_thresholds_path
from llm_parity.errors import SettingsError, ThresholdsError
from llm_parity.report.document import render_verdict
from llm_parity.report.schema import validate_verdict
from llm_parity.report.summary import precision_summary
from llm_parity.report.verdict import full_verdict


def settings_with(tmp_path, **raw):
    values = {o.flag.lstrip("-"): o.default for o in OPTIONS}
    values.update({k.replace("_", "-"): v for k, v in raw.items()})
    return build_settings(values, tmp_path)


# ---------------------------------------------------------------- the file


@pytest.mark.parametrize("table, expected", [
    ({"Eager-2": {}}, "lower-case letters, digits and underscores"),
    ({"default": {}}, "the name 'default' is kept"),
    ({"x": {"arg": {}}}, "unknown key 'arg'; expected one of: backend, args, default, runs"),
    ({"x": {"runs": 0}}, "runs must be an integer >= 1, got 0"),
    ({"x": {"runs": True}}, "runs must be an integer >= 1, got True"),
    ({"x": {"args": "enforce_eager=true"}}, "args must be a table of engine arguments"),
    ({"x": {"default": "yes"}}, "default must be true or false, got 'yes'"),
    # (other tests register more backends at import: only the packaged ones are named here)
    ({"x": {"backend": 3}}, "backend must be one of hf, vllm, openai"),
    ({"x": {"backend": "vlm"}}, "backend must be one of hf, vllm, openai"),
    ({"x": 3}, "[configurations.x] must be a table"),
])
def test_bad_configuration_tables_are_named(table, expected):
    with pytest.raises(ThresholdsError) as err:
        parse_configurations(table, "my.toml")
    assert str(err.value).startswith("my.toml: [configurations") and expected in str(err.value)
    x = table.get("x")
    if isinstance(x, dict) and "backend" in x:
        assert str(err.value).endswith(f"got {x['backend']!r}")


def test_a_configuration_declared_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "thresholds.toml"
    path.write_text('[configurations.eager]\nargs = { enforce_eager = true }\n\n'
                    '[configurations.eager]\nargs = { enforce_eager = false }\n')
    with pytest.raises(ThresholdsError) as err:
        ThresholdsFile.read(path)
    assert str(path) in str(err.value) and "eager" in str(err.value)
    assert "line 4" in str(err.value)


def test_the_packaged_file_ships_the_matrix():
    declared = ThresholdsFile.read(packaged_thresholds_path()).configurations
    assert list(declared) == ["compiled", "eager", "serial", "chunked_prefill",
                              "prefix_cache", "past_capture_size"]
    assert [n for n, c in declared.items() if c.default] == ["compiled", "eager"]
    assert declared["compiled"].args["enforce_eager"] is False
    assert declared["serial"].args["max_num_seqs"] == 1
    assert declared["chunked_prefill"].args["max_num_batched_tokens"] == 32
    assert declared["prefix_cache"].runs == 2
    assert declared["prefix_cache"].args["enable_prefix_caching"] is True
    # Off everywhere else: a view must not read blocks an earlier view left behind.
    assert all(c.args["enable_prefix_caching"] is False
               for n, c in declared.items() if n != "prefix_cache")
    assert declared["past_capture_size"].args["compilation_config"] == {
        "cudagraph_capture_sizes": [1, 2, 4, 8]}


def test_switch_names_the_arguments_that_differ():
    eager = Configuration("eager", "vllm", {"enforce_eager": True, "enable_prefix_caching": False})
    prefix = Configuration("prefix_cache", "vllm", {"enforce_eager": True,
                                                    "enable_prefix_caching": True,
                                                    "block_size": 32}, runs=2)
    assert prefix.switch(eager) == "block_size=32, enable_prefix_caching=true, runs=2"
    assert eager.switch(prefix) == "block_size=(unset), enable_prefix_caching=false, runs=1"
    assert eager.switch(eager) == "(no difference)"


# ---------------------------------------------------------------- selection


def names(settings):
    return [c.name for c in settings.configurations]


def test_vllm_judges_compiled_and_eager_unless_told(tmp_path):
    assert names(settings_with(tmp_path, candidate="vllm")) == ["compiled", "eager"]
    assert names(settings_with(tmp_path, candidate="vllm",
                               configurations="eager,prefix_cache")) == ["eager", "prefix_cache"]
    assert len(settings_with(tmp_path, candidate="vllm", configurations="all").configurations) == 6


def test_a_backend_without_configurations_has_one_implicit(tmp_path):
    (only,) = settings_with(tmp_path, candidate="hf").configurations
    assert only.name == "default" and not only.declared and not only.args


@pytest.mark.parametrize("asked, expected", [
    ("eager,eager", "--configurations: 'eager' is named twice"),
    ("eagre", "unknown configuration 'eagre'; "),
    (" , ", "expected names separated by commas"),
])
def test_bad_selections_are_named(tmp_path, asked, expected):
    with pytest.raises(SettingsError) as err:
        settings_with(tmp_path, candidate="vllm", configurations=asked)
    assert expected in str(err.value)
    if asked == "eagre":
        assert "declares for the vllm candidate: compiled, eager, serial" in str(err.value)


def test_a_configuration_of_another_backend_is_refused(tmp_path):
    with pytest.raises(SettingsError) as err:
        settings_with(tmp_path, candidate="hf", configurations="eager")
    assert "'eager' is declared in" in str(err.value) and "for the vllm candidate" in str(err.value)
    with pytest.raises(SettingsError, match="declares no configuration for the hf candidate"):
        settings_with(tmp_path, candidate="hf", configurations="all")


def test_an_unknown_configuration_stops_pytest_before_any_model(pytester):
    result = pytester.runpytest_subprocess("-m", "precision", "--candidate", "vllm",
                                           "--configurations", "compiled,graph")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--configurations: unknown configuration 'graph'*"])
    assert not list(Path(pytester.path).glob("*.json"))


# ---------------------------------------------------------------- verdict, summary, report


def test_a_failing_configuration_is_named_as_the_switch_in_every_output():
    session = configured_session(others={"compiled": {"defect_prompts": (1, 3), "seed": 0}},
                                 errors={"small_blocks": "vLLM could not start (block_size)"})
    data = full_verdict(session, None, {"tests": {"failed": 3}, "exit_status": 1})
    validate_verdict(data)
    block = data["configurations"]
    assert block["base"] == "eager"
    verdicts = {e["name"]: (e["verdict"], e["introduces_error"]) for e in block["entries"]}
    assert verdicts == {"eager": ("pass", False), "compiled": ("fail", True),
                        "small_blocks": ("error", False)}
    compiled = block["entries"][1]
    assert compiled["switch"] == "enforce_eager=false"
    assert "top1_match_rate" in compiled["failed_gates"] or compiled["failed_prompts"]
    first = compiled["vs_base"]["first_token"]
    assert first["positions"] == 6 and first["top1_differ"] >= 2
    assert first["kl_ratio_low"] <= first["kl_ratio"] <= first["kl_ratio_high"]
    assert data["verdict"] == "fail"
    reasons = " | ".join(data["verdict_reasons"])
    assert "configuration compiled failed gates" in reasons
    assert "enforce_eager=false introduces the error" in reasons
    assert "configuration small_blocks could not run (vLLM could not start" in reasons

    summary = "\n".join(precision_summary(data))
    assert "gates of the base configuration, eager:" in summary
    assert "compiled fails where eager passes: enforce_eager=false introduces the error" in summary
    assert "small_blocks could not run: vLLM could not start" in summary
    assert "compiled vs eager, first token: top-1 agrees at 4/6 positions" in summary
    matrix = summary.split("configurations (")[1]
    assert "eager" in matrix.splitlines()[1] and "FAIL" in matrix

    markdown = render_verdict(data, ".md")
    assert "## Configurations" in markdown
    assert "**compiled** fails where eager passes: `enforce_eager=false`" in markdown
    html = render_verdict(data, ".html")
    assert "Configurations</h2>" in html and "small_blocks" in html


def test_configurations_that_all_pass_leave_the_verdict_a_pass():
    session = configured_session(others={"compiled": {"seed": 0}})
    data = full_verdict(session, None, {"tests": {"passed": 10}, "exit_status": 0})
    validate_verdict(data)
    assert data["verdict"] == "pass" and "verdict_reasons" not in data
    compiled = data["configurations"]["entries"][1]
    # Same made-up candidate as the base: they agree everywhere, KL ratio exactly 1.
    assert compiled["vs_base"]["sequence"]["top1_differ"] == 0
    assert compiled["vs_base"]["sequence"]["kl_ratio"] == pytest.approx(1.0)


def test_a_backend_without_configurations_writes_no_block():
    from synthetic import make_session

    data = full_verdict(make_session(), None, {"tests": {"passed": 1}, "exit_status": 0})
    assert "configurations" not in data
