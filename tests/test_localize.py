"""Localization without an engine: the comparison of captured layer outputs (synthetic
captures with a known broken point), the [localize] settings, and how the answer is told
(summary lines, JUnit properties, the report's section)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_parity.compare.localize import MIN_FLOOR, localize, parse_point, relative_error
from llm_parity.config.thresholds import ThresholdsFile, load_thresholds
from llm_parity.errors import ThresholdsError

HIDDEN, POSITIONS, LAYERS = 64, 6, 5
SUB = ("input_norm", "attn", "post_attn_norm", "mlp")


def names(layers=LAYERS):
    out = ["embed"]
    for i in range(layers):
        out += [f"layers.{i}.{m}" for m in SUB] + [f"layers.{i}"]
    return out + ["final_norm"]


def captures(seed=0, layers=LAYERS, floor_scale=0.004, candidate_scale=0.004,
             broken=None, broken_scale=0.2):
    """(reference, floor, candidate): the floor and candidate differ from the reference by
    relative noise growing with depth; from `broken` on, the candidate's is far larger."""
    rng = np.random.default_rng(seed)
    reference, floor, candidate = {}, {}, {}
    points = names(layers)
    hit = points.index(broken) if broken else len(points)
    for index, name in enumerate(points):
        r = rng.normal(size=(POSITIONS, HIDDEN)).astype(np.float32)
        growth = 1 + index / 6  # rounding error grows with depth
        reference[name] = r
        floor[name] = r + floor_scale * growth * rng.normal(size=r.shape)
        scale = broken_scale if index >= hit else candidate_scale
        candidate[name] = r + scale * growth * rng.normal(size=r.shape)
    reference["embed"] = floor["embed"] = reference["embed"]  # exact in bf16
    if hit > 0:
        candidate["embed"] = reference["embed"]
    return reference, floor, candidate


def test_relative_error_is_per_position_and_scale_free():
    r = np.array([[3.0, 4.0], [300.0, 400.0]])
    c = r * np.array([[1.1], [1.0]])  # 10% off at the small position only
    assert relative_error(c, r) == pytest.approx(0.05)
    assert relative_error(r, r) == 0.0


def test_point_names_parse_into_layer_and_module():
    assert parse_point("layers.12.attn") == (12, "attn")
    assert parse_point("layers.3") == (3, "output")
    assert parse_point("embed") == (None, "embed")
    assert parse_point("final_norm") == (None, "final_norm")


def test_a_correct_candidate_names_nothing_though_error_grows_with_depth():
    reference, floor, candidate = captures()
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0)
    assert not result.diverged and result.where == ""
    ratios = [p.ratio for p in result.points]
    assert max(ratios) < 2
    # The candidate's raw error grows ~4x from the first layer to the last; the ratio not.
    deepest = next(p for p in result.points if p.name == f"layers.{LAYERS - 1}")
    first = next(p for p in result.points if p.name == "layers.0")
    assert deepest.error > 2 * first.error and abs(deepest.ratio - first.ratio) < 0.5


@pytest.mark.parametrize("broken, layer, module, where", [
    ("layers.2.attn", 2, "attn", "layer 2, attention"),
    ("layers.0.input_norm", 0, "input_norm", "layer 0, input norm"),
    ("layers.3.mlp", 3, "mlp", "layer 3, MLP"),
    ("layers.4.post_attn_norm", 4, "post_attn_norm", "layer 4, post-attention norm"),
    ("embed", None, "embed", "embedding"),
    ("final_norm", None, "final_norm", "final norm"),
])
def test_the_first_point_past_its_floor_is_named(broken, layer, module, where):
    reference, floor, candidate = captures(broken=broken)
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0)
    assert (result.layer, result.module, result.where) == (layer, module, where)
    named = next(p for p in result.points if p.name == broken)
    assert named.diverged and named.ratio > 5
    assert all(not p.diverged for p in result.points[:result.points.index(named)])
    if layer:
        assert result.within_before().startswith(f"layers 0-{layer - 1} within")


def test_a_layer_that_diverges_with_no_sub_module_out_is_named_as_a_whole():
    reference, floor, candidate = captures(broken="layers.2")
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0)
    assert (result.layer, result.module) == (2, "output")
    assert result.where == "layer 2" and "residual" in result.note


def test_a_missing_layer_is_named_when_the_shared_ones_agree():
    reference, floor, _ = captures()
    _, _, candidate = captures(layers=LAYERS - 1)
    candidate = {k: reference[k] for k in candidate if k != "final_norm"}
    candidate["final_norm"] = reference["final_norm"] + 1.0  # reads another depth: ignored
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0)
    assert (result.layer, result.module) == (LAYERS - 1, "missing")
    assert result.where == f"layer {LAYERS - 1} (missing)"
    assert (result.reference_layers, result.candidate_layers) == (LAYERS, LAYERS - 1)
    assert "has 4 decoder layers and the reference 5" in result.note


def test_nothing_diverged_but_the_output_failed_names_the_head():
    reference, floor, candidate = captures()
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0,
                      output_failed=True)
    assert (result.layer, result.module, result.where) == (None, "head", "output head")
    assert "after the final norm" in result.note


def test_non_finite_output_diverges_and_an_exact_floor_counts_as_one_rounding_step():
    reference, floor, candidate = captures()
    points = names()
    for name in points[points.index("layers.1.mlp"):]:  # a NaN travels on downstream
        candidate[name] = candidate[name].copy()
        candidate[name][0, 0] = np.nan
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0)
    assert (result.layer, result.module) == (1, "mlp")
    embed = result.points[0]
    assert embed.floor == 0.0 and embed.ratio == 0.0 and not embed.diverged
    # No floor run (a float32 candidate): the dtype's rounding step stands in.
    reference, _, candidate = captures(candidate_scale=1e-6)
    result = localize(reference, candidate, None, dtype="float32", limit=5.0)
    assert not result.diverged and result.floor_dtype is None
    layer0 = next(p for p in result.points if p.name == "layers.0")
    assert layer0.ratio == pytest.approx(layer0.error / MIN_FLOOR["float32"])


def test_only_points_both_captured_are_compared_and_sizes_are_recorded():
    reference, floor, candidate = captures()
    del candidate["layers.1.attn"]
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0,
                      prompt_id="rag-01", view="sequence", positions=range(10, 16))
    assert "layers.1.attn" not in [p.name for p in result.points]
    assert result.captured_bytes == sum(a.nbytes for a in candidate.values())
    data = result.as_dict()
    assert data["positions"] == list(range(10, 16)) and data["view"] == "sequence"
    assert all(math.isfinite(p["ratio"]) for p in data["points"])


# ---------------------------------------------------------------- settings


def test_localize_settings_come_from_the_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[localize]\nmode = "always"\nratio = 8\nprompts = 2\n')
    settings = ThresholdsFile.read(path).localize
    assert (settings.mode, settings.ratio, settings.prompts) == ("always", 8.0, 2)
    packaged = ThresholdsFile.read(
        __import__("llm_parity.config.thresholds", fromlist=["x"]).packaged_thresholds_path())
    assert packaged.localize.mode == "on-failure" and packaged.localize.ratio == 5.0


@pytest.mark.parametrize("text, expected", [
    ('[localize]\nmode = "sometimes"\n',
     "[localize] mode must be one of on-failure, always, off, got 'sometimes'"),
    ("[localize]\nratio = 1\n", "ratio must be a number above 1"),
    ('[localize]\nratio = "5"\n', "ratio must be a number above 1"),
    ("[localize]\nprompts = 0\n", "prompts must be an integer >= 1, got 0"),
    ("[localize]\nratios = 5\n", "[localize] unknown key 'ratios' (did you mean 'ratio'?)"),
])
def test_localize_mistakes_name_the_file_and_key(tmp_path, text, expected):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_a_bad_localize_option_stops_the_run_before_any_model_loads(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--localize", "sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--localize: expected one of on-failure, always, off, got "
                                 "'sometimes'*"])


# ---------------------------------------------------------------- how it is told


def localization_block(broken="layers.2.attn", **extra):
    from llm_parity.runner.localize import LocalizationRun

    reference, floor, candidate = captures(broken=broken)
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0,
                      prompt_id="rag-08", view="first_token", positions=[14])
    return LocalizationRun("on-failure", configuration="eager", results=(result,),
                           failed=True, **extra).as_dict()


def test_summary_lines_and_junit_properties_say_where():
    from llm_parity.report.messages import localization_lines, localization_properties

    block = localization_block()
    assert block["where"] == "layer 2, attention" and block["diverged"]
    lines = localization_lines(block)
    assert lines[0] == ("where it diverges (configuration eager, prompt rag-08, first-token "
                        "view, 1 position):")
    assert lines[1].startswith("  layer 2, attention: ") and "x its bf16 floor (limit 5x)" in \
        lines[1] and "the 2 layers before it within" in lines[1]
    assert lines[2].startswith("  ratio to floor by layer: embed:0x 0:")
    props = dict(localization_properties(block))
    assert props["where"] == "layer 2, attention" and props["layer"] == 2
    assert props["module"] == "attn" and props["localized"] is True
    assert props["ratio.layers.2"] > 5 > props["ratio.layers.1"]
    skipped = localization_lines({"mode": "on-failure", "skipped": "a served candidate"})
    assert skipped == ["where it diverges: not localized: a served candidate"]


def test_the_report_section_has_the_answer_the_plot_and_the_layer_table():
    from llm_parity.report.document import _localization

    blocks = _localization({"verdict": "fail", "localization": localization_block()})
    text = repr(blocks)
    assert "Where it diverges" in text and "First diverging: **layer 2, attention**" in text
    assert "The 2 layers before it are within" in text
    svg = next(b for b in blocks if type(b).__name__ == "Figure").svg
    assert svg.count("<rect") >= LAYERS + 2 and "limit 5x" in svg
    table = next(b for b in blocks if type(b).__name__ == "Table")
    assert [row[0] for row in table.rows] == [f"layers.2.{m}" for m in SUB] + ["layers.2"]
    # A passing run that was not localized shows no section.
    assert _localization({"verdict": "pass", "localization": {
        "mode": "on-failure", "skipped": "the candidate passed"}}) == []


def _judged_views(decode_defect: bool, prefill_defect: bool):
    """Packaged gates judged on small made views: a prefill-side flip to a token far below
    the reference's top-1, or one only where free-running decoding leaves the reference."""
    from llm_parity.compare.answers import Decoded, NextToken
    from llm_parity.compare.precision import (
        compare_decodes,
        compare_prompts,
        compare_sequences,
        judge,
    )
    from llm_parity.config.prompts import Prompt
    from llm_parity.config.thresholds import packaged_thresholds_path

    def view(probs):
        logprobs = np.log(np.asarray(probs, dtype=np.float64))
        top = np.argsort(-logprobs)[:4]
        return NextToken(top, logprobs[top], logprobs)

    sure = view([0.7, 0.1, 0.1, 0.05, 0.05])
    wrong = view([0.05, 0.1, 0.1, 0.05, 0.7])  # its rank 1 is token 4, far below the top
    prompts = [Prompt(f"p{i}", "x") for i in range(3)]
    ids = [[1, 2, 3]] * 3
    first = [wrong if prefill_defect else sure] + [sure] * 2
    views = {"first_token": compare_prompts(prompts, ids, [sure] * 3, first,
                                            near_tie_margin=0.3, k=4)}
    reference = [Decoded([0, 0], [sure, sure])] * 3
    views["sequence"] = compare_sequences(prompts, ids, reference, [[sure, sure]] * 3,
                                          near_tie_margin=0.3, k=4)
    decoded = [Decoded([0, 4], [sure, wrong]) if decode_defect else Decoded([0, 0], [sure, sure])]
    views["decode"] = compare_decodes(prompts, ids, reference, decoded + reference[1:],
                                      near_tie_margin=0.3, k=4)
    thresholds = load_thresholds(packaged_thresholds_path(), platform="cpu")
    return judge(views, thresholds, k=4, floor_missing="not measured here")


def test_a_failure_the_capture_cannot_see_is_named_by_its_path():
    # Before, nothing diverging in the capture (one eager prefill) always read "output
    # head": a decode-path bug, or one inside a compiled graph, was blamed on the head.
    from llm_parity.config.configurations import Configuration
    from llm_parity.runner.localize import unseen_path
    from llm_parity.runner.precision import ConfigurationRun

    def configuration_run(name, args, **made):
        return ConfigurationRun(Configuration(name, "vllm", args), {}, _judged_views(**made))

    decode_only = configuration_run("eager", {"enforce_eager": True}, decode_defect=True,
                                    prefill_defect=False)
    failing = {p.view for p in decode_only.precision.all_prompt_results if not p.passed}
    assert failing == {"decode"}
    assert unseen_path(decode_only, compiled=False).startswith("the decode path")
    prefill = configuration_run("compiled", {"enforce_eager": False}, decode_defect=False,
                                prefill_defect=True)
    assert not prefill.passed
    assert unseen_path(prefill, compiled=True).startswith(
        "the compiled path: configuration compiled runs a compiled graph")
    # The capture takes the failing path (an eager prefill fails): the head may be named.
    assert unseen_path(prefill, compiled=False) == ""
    passing = configuration_run("eager", {}, decode_defect=False, prefill_defect=False)
    assert passing.passed and unseen_path(passing, compiled=True) == ""


def test_a_sub_module_that_diverges_under_a_layer_output_within_the_limit_is_named():
    # Seen on the toy model: 15% noise in the last layer's down_proj read layers.3.mlp at
    # 8.6x its floor and layers.3 at 4.97x (limit 5x); before, "output head" was named.
    reference, floor, candidate = captures()
    last = LAYERS - 1
    mlp = f"layers.{last}.mlp"
    candidate[mlp] = reference[mlp] + 9 * (floor[mlp] - reference[mlp])
    result = localize(reference, candidate, floor, dtype="bfloat16", limit=5.0,
                      output_failed=True)
    ratios = {p.name: p.ratio for p in result.points}
    assert ratios[mlp] > 5 > ratios[f"layers.{last}"]
    assert (result.layer, result.module) == (last, "mlp")
    assert result.where == f"layer {last}, MLP"
    assert "its layer's output stays within" in result.note
