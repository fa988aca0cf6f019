"""Layer gates without engines: [layer_gates] read and checked, each gate's largest ratio
over points and prompts, what is not judged and why, and how the verdict and the summary
count them."""

from __future__ import annotations

import math

import pytest

from llm_parity.compare.layer_gates import LayerGates, judge_layer_gates, layer_gate_line
from llm_parity.compare.localize import Localization, PointDiff
from llm_parity.config.thresholds import ThresholdsFile, packaged_thresholds_path
from llm_parity.errors import ThresholdsError
from llm_parity.report.verdict import layer_gate_failures
from llm_parity.runner.localize import LocalizationRun


def read(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    return ThresholdsFile.read(path).layer_gates


def test_the_packaged_file_bounds_every_point_at_5x():
    gates = ThresholdsFile.read(packaged_thresholds_path()).layer_gates
    assert [(g.name, g.module, g.threshold) for g in gates.gates] == [("max_ratio", None, 5.0)]


def test_a_bound_per_kind_of_point_and_a_file_without_the_table(tmp_path):
    gates = read(tmp_path, "[layer_gates]\nmax = 4\n[layer_gates.modules]\nattn = 3\n"
                           "output = 2.5\nrouter = 6\n")
    assert [(g.name, g.module, g.threshold) for g in gates.gates] == [
        ("max_ratio", None, 4.0), ("max_ratio.attn", "attn", 3.0),
        ("max_ratio.output", "output", 2.5), ("max_ratio.router", "router", 6.0)]
    assert read(tmp_path, "[layer_gates.modules]\nmlp = 3\n").names() == ["max_ratio.mlp"]
    assert read(tmp_path, "[localize]\nratio = 5\n").gates == ()
    assert read(tmp_path, "[layer_gates]\nenabled = false\nmax = 4\n").gates == ()


@pytest.mark.parametrize("text, expected", [
    ("[layer_gates]\nmax = 1\n", "[layer_gates] max must be a number above 1"),
    ('[layer_gates]\nmax = "4"\n', "[layer_gates] max must be a number above 1"),
    ("[layer_gates]\nmaximum = 4\n",
     "[layer_gates] unknown key 'maximum' (did you mean 'max'?)"),
    ("[layer_gates]\nenabled = 1\n", "[layer_gates] enabled must be true or false, got 1"),
    ("[layer_gates.modules]\natn = 3\n",
     "[layer_gates.modules] unknown key 'atn' (did you mean 'attn'?)"),
    ("[layer_gates.modules]\nmlp = 0.5\n", "[layer_gates.modules] mlp must be a number above 1"),
    ("[layer_gates]\nmodules = 3\n", "[layer_gates.modules] must be a table, got an integer"),
    ('[models."m".layer_gates]\nmax = 3\n', "unknown key 'layer_gates'"),
])
def test_mistakes_name_the_file_the_key_and_what_was_expected(tmp_path, text, expected):
    with pytest.raises(ThresholdsError) as info:
        read(tmp_path, text)
    assert str(tmp_path / "t.toml") in str(info.value) and expected in str(info.value)


def point(name, ratio, layer=None, module=None):
    if module is None:
        layer, module = (None, name) if "." not in name else (int(name.split(".")[1]), "output")
    return PointDiff(name, layer, module, ratio * 1e-3, 1e-3, ratio, ratio > 5)


def capture(prompt_id, ratios, layers=(2, 2)):
    points = [point(n, r) if n in ("embed", "final_norm") or n.count(".") == 1 else
              point(n, r, int(n.split(".")[1]), n.split(".")[2]) for n, r in ratios.items()]
    return Localization(prompt_id=prompt_id, view="sequence", positions=(1, 2), limit=5.0,
                        points=tuple(points), reference_layers=layers[0],
                        candidate_layers=layers[1], floor_dtype="bfloat16")


A = capture("a", {"embed": 0.0, "layers.0.attn": 2.0, "layers.0.mlp": 1.2, "layers.0": 1.5,
                  "layers.1.attn": 1.1, "layers.1": 1.4, "final_norm": 1.3})
B = capture("b", {"embed": 0.0, "layers.0.attn": 6.2, "layers.0.mlp": 1.0, "layers.0": 2.1,
                  "layers.1.attn": 1.0, "layers.1": 1.9, "final_norm": 1.8})
GATES = LayerGates.build(4.0, {"mlp": 3.0, "output": 2.0, "router": 5.0})


def test_each_gate_reads_the_largest_ratio_over_its_points_and_every_prompt():
    judged, not_judged = judge_layer_gates(GATES, (A, B), configuration="eager")
    by = {r.gate.name: r for r in judged}
    every = by["max_ratio"]
    assert (every.value, every.point, every.prompt_id, every.passed) == (
        6.2, "layers.0.attn", "b", False)
    assert every.points == 14 and every.configuration == "eager"
    assert (by["max_ratio.mlp"].value, by["max_ratio.mlp"].passed) == (1.2, True)
    assert (by["max_ratio.output"].value, by["max_ratio.output"].point) == (2.1, "layers.0")
    assert not by["max_ratio.output"].passed
    # A kind of point the model does not have: not judged, saying so.
    assert [(n.gate.name, n.reason) for n in not_judged] == [
        ("max_ratio.router", "the capture has no router point (this model's layers have none)")]
    # One prompt alone passes: the worst of the prompts decides.
    assert judge_layer_gates(GATES, (A,))[0][0].passed
    line = layer_gate_line(every.as_dict())
    assert line == ("largest ratio to the bf16 floor over every point = 6.2x at layers.0.attn "
                    "(prompt b, sequence view), must be <= 4x")


def test_an_unmeasurable_point_or_a_missing_layer_fails():
    nan = capture("n", {"layers.0.attn": math.nan, "layers.0": 1.0})
    judged, _ = judge_layer_gates(LayerGates.build(4.0, {}), (A, nan))
    assert not judged[0].passed and math.isnan(judged[0].value)
    assert "layers.0.attn could not be measured" in judged[0].note
    assert "unmeasurable" in layer_gate_line({**judged[0].as_dict(), "value": None})
    short = capture("s", {"layers.0": 1.0, "layers.0.attn": 1.0}, layers=(2, 1))
    judged, _ = judge_layer_gates(LayerGates.build(4.0, {"attn": 3.0}), (short,))
    assert not judged[0].passed and "the candidate has 1 decoder layers" in judged[0].note
    assert judged[1].passed  # a kind's own gate reads only its points


def test_without_a_capture_every_gate_is_not_judged_with_the_reason():
    run = LocalizationRun("on-failure", skipped="the openai candidate cannot be localized")
    run.judge(GATES, strict=True)
    assert not run.layer_gates and len(run.layer_not_judged) == 4
    entry = run.layer_not_judged[0].as_dict()
    assert entry["reason"] == "no layer capture: the openai candidate cannot be localized"
    assert (entry["scope"], entry["bound"], entry["strict"]) == ("layer", "max", True)
    failed = LocalizationRun("always", error="EngineError: no memory")
    failed.judge(GATES)
    assert failed.layer_not_judged[0].reason == (
        "the layer capture could not finish: EngineError: no memory")
    done = LocalizationRun("always", results=(A, B))
    done.judge(GATES)
    assert [r.gate.name for r in done.layer_gates] == ["max_ratio", "max_ratio.mlp",
                                                        "max_ratio.output"]


def test_the_verdict_fails_on_a_failing_gate_and_on_strict_gates_not_judged():
    judged = [{"name": "max_ratio", "passed": True}, {"name": "max_ratio.attn", "passed": False}]
    assert layer_gate_failures(judged, []) == ["max_ratio.attn"]
    not_judged = [{"name": "kl_vs_floor", "scope": "run", "strict": True},
                  {"name": "max_ratio", "scope": "layer", "strict": False},
                  {"name": "max_ratio.mlp", "scope": "layer", "strict": True}]
    assert layer_gate_failures([], not_judged) == ["max_ratio.mlp (not judged, strict)"]


def test_a_passing_graph_only_run_gets_no_engine_start_for_its_layer_gates():
    from types import SimpleNamespace

    from test_localize import _judged_views

    from llm_parity.compare.localize import LocalizeSettings
    from llm_parity.config.configurations import Configuration
    from llm_parity.engines.base import EngineSpec
    from llm_parity.runner.localize import localize_run
    from llm_parity.runner.precision import ConfigurationRun

    def configuration_run(name, args):
        return ConfigurationRun(Configuration(name, "vllm", args), {},
                                _judged_views(decode_defect=False, prefill_defect=False))

    settings = SimpleNamespace(localize=LocalizeSettings(),
                               thresholds_file=SimpleNamespace(layer_gates=GATES))
    run = SimpleNamespace(backend="vllm", candidate_spec=EngineSpec("m"), configurations=(
        configuration_run("compiled", {"enforce_eager": False}),))
    out = localize_run(settings, run)  # returns before any engine is built
    assert out.for_gates and not out.results
    assert out.skipped.startswith("the run passed and no configuration it judged is the "
                                  "engine the capture needs (compiled run eagerly)")
    out.judge(GATES)
    assert out.layer_not_judged[0].reason == f"no layer capture: {out.skipped}"
    # Without layer gates a passing on-failure run is not captured at all, as before.
    quiet = SimpleNamespace(localize=LocalizeSettings(),
                            thresholds_file=SimpleNamespace(layer_gates=LayerGates()))
    assert localize_run(quiet, run).skipped.startswith("the candidate passed")


def test_a_first_token_capture_compares_the_prompts_last_positions():
    # One position against one is a noisy ratio: a correct Gemma 3 port read 6.1x at one
    # point over the packaged prompts, 2.4x over the last 32 positions the same prefill
    # computes (benchmarks/layer_gates.py). The teacher-forced view keeps its own positions.
    from types import SimpleNamespace

    from test_localize import _judged_views

    from llm_parity.config.configurations import Configuration
    from llm_parity.runner.localize import worst_sequences
    from llm_parity.runner.precision import ConfigurationRun

    # Three-token prompts, the first failing its first token; two-token continuations.
    target = ConfigurationRun(Configuration("eager", "vllm", {}), {},
                              _judged_views(decode_defect=False, prefill_defect=True))
    run = SimpleNamespace(sequences={f"p{i}": [1, 2, 3, 0, 0] for i in range(3)})
    first_ids = {f"p{i}": [1, 2, 3] for i in range(3)}

    def read(count, **kw):
        return [(p, v, pos) for p, v, _, pos in worst_sequences(run, target, count, first_ids,
                                                                 **kw)]

    assert read(1) == [("p0", "first_token", [2])]  # the last position alone
    assert read(1, first_positions=2) == [("p0", "first_token", [1, 2])]
    assert read(1, first_positions=32) == [("p0", "first_token", [0, 1, 2])]  # all there is
    every = read(6, first_positions=32)
    assert {v for _, v, _ in every} == {"first_token", "sequence"}
    assert all(pos == ([0, 1, 2] if v == "first_token" else [2, 3]) for _, v, pos in every)
