"""thresholds.toml: the packaged defaults, overrides, and every kind of mistake named."""

from __future__ import annotations

import json

import pytest

from llm_parity.config.thresholds import (
    Gate,
    ThresholdsFile,
    load_thresholds,
    packaged_thresholds_path,
    resolve_thresholds,
)
from llm_parity.errors import ThresholdsError


def write(tmp_path, text):
    path = tmp_path / "thresholds.toml"
    path.write_text(text)
    return path


def test_packaged_defaults_are_the_founding_gates():
    t = load_thresholds(packaged_thresholds_path())
    gates = {g.name: g for g in t.gates}
    assert (gates["top1_match_rate"].metric, gates["top1_match_rate"].aggregate) == ("top1_match", "rate")
    assert (gates["top1_match_rate"].bound, gates["top1_match_rate"].threshold) == ("min", 0.99)
    assert (gates["cosine_mean"].bound, gates["cosine_mean"].threshold) == ("min", 0.99)
    assert (gates["kl_mean"].bound, gates["kl_mean"].threshold) == ("max", 0.01)
    assert (gates["spearman_mean"].bound, gates["spearman_mean"].threshold) == ("min", 0.95)
    assert {g.name for g in t.prompt_gates} == {"kl", "cosine", "top1_defect", "sequence_kl_mean",
                                             "sequence_kl_vs_floor", "decode_top1_defect"}
    depth = {g.name: g.over for g in t.gates if g.over != "first_token"}
    assert depth == {"sequence_kl_mean": "sequence", "sequence_kl_p99": "sequence",
                     "sequence_top1_defect_rate": "sequence", "decode_kl_mean": "decode",
                     "decode_top1_defect_rate": "decode", "sequence_kl_vs_floor": "sequence",
                     "decode_kl_vs_floor": "decode", "sequence_tail_vs_floor": "sequence"}
    relative = {g.name for g in t.gates if g.relative_to == "noise_floor"}
    assert relative == {"kl_vs_floor", "sequence_kl_vs_floor", "decode_kl_vs_floor",
                        "sequence_tail_vs_floor"}
    # The founding top-1 rate, with near-tie flips excused (docs/notes/real-model.md).
    assert gates["top1_match_rate"].excuse_near_ties and t.near_tie_margin == 0.5
    # The founding performance grid: 4 eager cases, 3 compiled.
    assert [c.id for c in t.grid] == [
        "eager-in16-out100", "eager-in32-out100", "eager-in64-out100", "eager-in128-out100",
        "compiled-in16-out50", "compiled-in32-out50", "compiled-in64-out100",
    ]
    assert t.performance_gates == ()
    npu = load_thresholds(packaged_thresholds_path(), platform="npu")
    assert [(g.metric, g.bound, g.threshold) for g in npu.performance_gates] == [("speedup", "min", 1.5)]


def test_repository_thresholds_match_the_packaged_ones(pytestconfig):
    assert (pytestconfig.rootpath / "thresholds.toml").read_text() == packaged_thresholds_path().read_text()


@pytest.mark.parametrize(
    ("bound", "threshold", "value", "passed"),
    [("min", 0.99, 0.99, True), ("min", 0.99, 0.9899, False), ("max", 0.01, 0.01, True),
     ("max", 0.01, 0.0101, False), ("max", 0.01, float("nan"), False)],
)
def test_gate_bounds_are_inclusive_and_nan_fails(bound, threshold, value, passed):
    assert Gate("g", "kl", "mean", bound, threshold).check(value) is passed


def test_gate_evaluates_its_aggregate():
    gate = Gate("kl_p95", "kl", "p95", "max", 0.5)
    result = gate.evaluate([0.0] * 19 + [1.0])
    assert result.value == pytest.approx(0.05)
    assert result.passed
    assert Gate("r", "top1_match", "rate", "min", 0.9).evaluate([True] * 8 + [False] * 2).value == 0.8


def test_platform_and_model_overrides_merge_over_the_base(tmp_path):
    path = write(tmp_path, """
[precision.gates.kl_mean]
metric = "kl"
aggregate = "mean"
max = 0.01

[platforms.npu.precision.gates.kl_mean]
max = 0.02

[models."PleIAs/Pleias-RAG-350M".precision.gates.kl_mean]
max = 0.03

[models."PleIAs/Pleias-RAG-350M".precision.gates.js_max]
metric = "js"
aggregate = "max"
max = 0.1
""")
    assert load_thresholds(path).gates[0].threshold == 0.01
    assert load_thresholds(path, platform="npu").gates[0].threshold == 0.02
    assert load_thresholds(path, platform="cpu").gates[0].threshold == 0.01
    by_model = load_thresholds(path, platform="npu", model="PleIAs/Pleias-RAG-350M")
    assert [(g.name, g.threshold) for g in by_model.gates] == [("kl_mean", 0.03), ("js_max", 0.1)]
    # A hub id matches that hub id only: not another org's model nor a directory that
    # happens to share its last name.
    for other in ("anyone/Pleias-RAG-350M", "/models/Pleias-RAG-350M", "Pleias-RAG-350M"):
        gates = load_thresholds(path, platform="npu", model=other).gates
        assert [(g.name, g.threshold) for g in gates] == [("kl_mean", 0.02)], other


def test_a_model_override_keyed_by_a_path_matches_that_directory(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    path = write(tmp_path, f"""
[precision.gates.kl_mean]
metric = "kl"
max = 0.01

[models."{model}".precision.gates.kl_mean]
max = 0.05
""")
    assert load_thresholds(path, model=str(model)).gates[0].threshold == 0.05
    assert load_thresholds(path, model=str(model) + "/").gates[0].threshold == 0.05
    assert load_thresholds(path, model=str(tmp_path / "other" / "ckpt")).gates[0].threshold == 0.01


def test_an_override_can_disable_a_gate_or_flip_its_bound(tmp_path):
    path = write(tmp_path, """
[precision.gates.kl_mean]
metric = "kl"
max = 0.01
[precision.gates.cos]
metric = "cosine"
min = 0.9
[platforms.cpu.precision.gates.kl_mean]
enabled = false
[platforms.cuda.precision.gates.cos]
max = 1.0
""")
    assert [g.name for g in load_thresholds(path, platform="cpu").gates] == ["cos"]
    cos = load_thresholds(path, platform="cuda").gates[1]
    assert (cos.bound, cos.threshold) == ("max", 1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[precision.gates.x]\nmetric = "kll"\nmax = 0.1\n',
         "[precision.gates.x] unknown metric 'kll' (did you mean 'kl'?)"),
        ('[precision.gates.x]\nmetric = "kl"\nmaxx = 0.1\n',
         "[precision.gates.x] unknown key 'maxx' (did you mean 'max'?)"),
        ('[precision.gates.x]\nmetric = "kl"\nmax = "0.1"\n',
         "[precision.gates.x] max must be a number, got a string '0.1'"),
        ('[precision.gates.x]\nmetric = "kl"\nmax = true\n',
         "[precision.gates.x] max must be a number, got a boolean True"),
        ('[precision.gates.x]\nmetric = "kl"\n', "[precision.gates.x] missing bound"),
        ('[precision.gates.x]\nmax = 0.1\n', "[precision.gates.x] missing key 'metric'"),
        ('[precision.gates.x]\nmetric = "kl"\nmin = 0\nmax = 1\n', "give one bound"),
        ('[precision.gates.x]\nmetric = "kl"\naggregate = "rate"\nmax = 1\n',
         "aggregate 'rate' does not fit metric 'kl'"),
        ('[precision.gates.x]\nmetric = "top1_match"\naggregate = "mean"\nmin = 1\n',
         "aggregate 'mean' does not fit metric 'top1_match'; expected 'rate'"),
        ('[precision.gates.x]\nmetric = "kl"\naggregate = "p96"\nmax = 1\n',
         "unknown aggregate 'p96'"),
        ('[precison]\n', "[top level] unknown key 'precison' (did you mean 'precision'?)"),
        ('[platforms.tpu.precision]\n', "[platforms] unknown key 'tpu'"),
        ('[precision]\nnear_tie_margin = -1\n', "near_tie_margin must be a non-negative number"),
        ('[performance]\ngrid = [{mode = "graph", input_len = 16, output_len = 50}]\n',
         "[performance.grid[0]] mode must be one of eager, compiled, got 'graph'"),
        ('[performance]\ngrid = [{mode = "eager", input_len = 0, output_len = 50}]\n',
         "input_len must be a positive integer, got 0"),
        ('[performance.gates.s]\nmetric = "speed"\nmin = 1\n',
         "unknown metric 'speed' (did you mean 'speedup'?)"),
        ('[platforms.npu.precision.gates.kl_mean]\nmaxx = 1\n',
         "[platforms.npu.precision.gates.kl_mean] unknown key 'maxx'"),
        ("precision = 3\n", "[precision] must be a table, got an integer"),
        ('[precision.gates.x]\nmetric = "kl"\nover = "prefill"\nmax = 1\n',
         "over must be one of first_token, sequence, decode, got 'prefill'"),
        ("[precision\n", "not valid TOML"),
    ],
)
def test_mistakes_name_the_file_the_key_and_what_was_expected(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_a_new_gate_in_an_override_must_be_whole():
    data = {"platforms": {"npu": {"precision": {"gates": {"new": {"max": 0.1}}}}}}
    with pytest.raises(ThresholdsError, match=r"merged with \[platforms.npu\]\): \[precision.gates.new\] missing key 'metric'"):
        resolve_thresholds(data, platform="npu")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ThresholdsError, match="nope.toml: cannot read"):
        load_thresholds(tmp_path / "nope.toml")


@pytest.mark.parametrize("override, message", [
    # A base rate gate given a KL metric by a platform: a rate of a float.
    ('[platforms.cpu.precision.gates.top1_match_rate]\nmetric = "kl"\n',
     "aggregate 'rate' does not fit metric 'kl'"),
    # A min bound on a cosine, then read relative to the floor by a model section.
    ('[models."org/m".precision.gates.cosine_mean]\nrelative_to = "noise_floor"\n',
     "cannot be read relative to the noise floor"),
])
def test_every_merged_override_is_validated_when_the_file_is_read(tmp_path, override, message):
    path = write(tmp_path, """
[precision.gates.top1_match_rate]
metric = "top1_match"
aggregate = "rate"
min = 0.99

[precision.gates.cosine_mean]
metric = "cosine"
min = 0.99
""" + override)
    with pytest.raises(ThresholdsError, match="merged with") as info:
        ThresholdsFile.read(path)  # no platform or model asked: every section is checked
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_near_tie_flip_is_excused_only_by_a_gate_that_says_so():
    from dataclasses import replace

    from synthetic import make_session, rejudge

    session = make_session(prompts=8, near_tie_prompts=(2,), defect_prompts=(5,))
    precision = session.run.precision
    gate = next(g for g in precision.gate_results if g.gate.name == "top1_match_rate")
    assert gate.gate.excuse_near_ties  # the packaged founding gate
    assert gate.value == 7 / 8  # the defect on p-05 counts, the near-tie on p-02 does not
    assert precision.aggregate()["top1_match_rate"] == 6 / 8  # reported as flipped
    strict = replace(session.run.thresholds, gates=tuple(
        replace(g, excuse_near_ties=False) for g in session.run.thresholds.gates))
    plain = next(g for g in rejudge(session, strict).gate_results
                 if g.gate.name == "top1_match_rate")
    assert plain.value == 6 / 8


def test_excuse_near_ties_fits_top1_match_only():
    data = {"precision": {"gates": {"g": {"metric": "kl", "excuse_near_ties": True,
                                          "max": 0.1}}}}
    with pytest.raises(ThresholdsError, match="excuse_near_ties applies to metric 'top1_match'"):
        resolve_thresholds(data, source="t.toml")


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "32"])
def test_localize_positions_must_be_a_positive_integer(tmp_path, value):
    path = tmp_path / "thresholds.toml"
    path.write_text(f"[localize]\npositions = {json.dumps(value)}\n")
    with pytest.raises(ThresholdsError) as err:
        load_thresholds(path)
    assert str(err.value).startswith(f"{path}: [localize] positions must be an integer >= 1")
    assert "got" in str(err.value)
