"""Quantized ports without vLLM: the checkpoint `llm-parity quantize` writes, the scheme read
back from it, the Transformers run of it (engines/quantized.py), the [quantization] gates,
and the suite's two questions end to end with a Transformers candidate. The real engine's
side is tests/test_quantized_e2e.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import junit_cases
from test_suite_e2e import QUICK, run_suite

from llm_parity.config.thresholds import ThresholdsFile, packaged_thresholds_path
from llm_parity.engines.quantized import quantize_activation, read_scheme
from llm_parity.errors import ModelError, ThresholdsError
from llm_parity.runner.quantization import QuantizationRun
from llm_parity.runner.quantize import quantize_checkpoint, quantize_weight
from llm_parity.runner.toymodel import toy_model_dir


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    return quantize_checkpoint(toy_model_dir(), tmp_path_factory.mktemp("q") / "w8a8")[0]


def test_the_checkpoint_holds_int8_weights_with_one_scale_per_output_channel(w8a8):
    import torch
    from safetensors.torch import load_file

    scheme = read_scheme(w8a8)
    assert scheme.name == "w8a8" and scheme.weight_strategy == "channel"
    assert scheme.activation_strategy == "token" and scheme.ignore == ("lm_head",)
    tensors = load_file(str(w8a8 / "model.safetensors"))
    original = load_file(str(toy_model_dir() / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj"
    weight, scale = tensors[name + ".weight"], tensors[name + ".weight_scale"]
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
    assert int(weight.abs().amax(dim=1).min()) == 127  # each row reaches the grid's end
    back = weight.float() * scale
    wide = original[name + ".weight"].float()
    assert (back - wide).abs().max() <= scale.max() / 2 + 1e-7  # round to nearest
    # Embeddings and norms are left as they were; 7 projections x 4 layers quantized.
    assert tensors["model.embed_tokens.weight"].dtype == original["model.embed_tokens.weight"].dtype
    assert sum(n.endswith(".weight_scale") for n in tensors) == 28
    assert (w8a8 / "tokenizer.json").is_file()


def test_a_mixed_precision_checkpoint_keeps_the_layers_it_ignores(tmp_path):
    path, scheme, count = quantize_checkpoint(toy_model_dir(), tmp_path / "mixed",
                                              ignore=["re:.*down_proj"])
    assert count == 24 and scheme.ignore == ("lm_head", "re:.*down_proj")
    assert not scheme.covers("model.layers.0.mlp.down_proj")
    assert scheme.covers("model.layers.0.mlp.up_proj")


def test_quantize_refuses_what_it_cannot_write(w8a8, tmp_path):
    with pytest.raises(ModelError, match="already quantized"):
        quantize_checkpoint(w8a8, tmp_path / "again")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a checkpoint this command wrote"):
        quantize_checkpoint(toy_model_dir(), foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ModelError, match="--scheme 'w4a4'"):
        quantize_checkpoint(toy_model_dir(), tmp_path / "x", scheme="w4a4")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_the_command_says_what_it_wrote(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llm_parity.cli", "quantize",
                           str(toy_model_dir()), str(tmp_path / "q"), "--scheme", "w8a16"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "w8a16 (int8 per channel weights, activations not quantized)" in done.stdout
    assert "28 linear layers quantized" in done.stdout
    assert read_scheme(tmp_path / "q").activation_bits is None


@pytest.mark.parametrize("edit, message", [
    ({"quant_method": "awq"}, "quant_method is 'awq'; llm-parity reads compressed-tensors"),
    ({"format": "float-quantized"}, "format is 'float-quantized'"),
    ({"config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "int",
                                                "strategy": "group"}}}},
     "weights.strategy is 'group'; expected channel or tensor"),
    ({"config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                              "dynamic": False}}}},
     "input_activations must be dynamic"),
])
def test_a_scheme_it_cannot_read_is_named_with_its_file_and_key(w8a8, tmp_path, edit,
                                                                 message):
    copy = tmp_path / "edited"
    shutil.copytree(w8a8, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(edit)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as caught:
        read_scheme(copy)
    assert str(copy / "config.json") in str(caught.value) and message in str(caught.value)


def test_activations_are_rounded_per_token_or_per_tensor():
    import torch

    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -7.0]])
    token = quantize_activation(x, "token")
    tensor = quantize_activation(x, "tensor")
    assert torch.allclose(token[0], x[0], atol=1 / 127)  # its own scale: fine steps
    step = 100.0 / 127
    assert torch.equal(tensor[0], torch.round(x[0] / step) * step)  # the big row's steps
    assert tensor[0, 2] == 0.0 and token[0, 2] != 0.0
    q, s = quantize_weight(torch.tensor([[0.5, -1.0], [2.0, 0.1]]))
    assert q.tolist() == [[64, -127], [127, 6]] and torch.allclose(s[:, 0],
                                                                   torch.tensor([1, 2]) / 127)


def test_transformers_runs_the_quantized_checkpoint_as_its_scheme_says(w8a8):
    """One layer checked by hand: the emulated layer's output is the textbook W8A8 product;
    the whole model moves away from the original by quantization's cost, not more."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_parity.engines._torch import transformers_dtype_kwarg
    from llm_parity.engines.quantized import load_emulated

    dtype = transformers_dtype_kwarg()
    emulated = load_emulated(str(w8a8), read_scheme(w8a8), torch.float32, False, dtype)
    original = AutoModelForCausalLM.from_pretrained(str(toy_model_dir()),
                                                    **{dtype: torch.float32})
    layer = emulated.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    wq, ws = quantize_weight(original.model.layers[1].mlp.down_proj.weight)
    xs = x.abs().amax(dim=-1, keepdim=True) / 127
    expected = (torch.round(x / xs) * xs) @ (wq.float() * ws).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        a = original(ids).logits[0].log_softmax(-1)
        b = emulated(ids).logits[0].log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    assert 1e-6 < float(kl.mean()) < 0.05


def test_quantization_gates_are_validated_like_the_others():
    base = json.loads(json.dumps({"quantization": {"gates": {"kl_mean": {
        "metric": "kl", "aggregate": "mean", "max": 0.05}}}}))
    assert [g.name for g in ThresholdsFile(base).resolve().quantization_gates] == ["kl_mean"]
    bad = {"quantization": {"gates": {"kl_mean": {"metric": "kl", "aggregate": "mean",
                                                  "max": 3, "relative_to": "noise_floor"}}}}
    with pytest.raises(ThresholdsError, match=r"quantization\.gates\.kl_mean.*relative_to"):
        ThresholdsFile(bad)
    with pytest.raises(ThresholdsError, match=r"quantization.*unknown key 'gate'"):
        ThresholdsFile({"quantization": {"gate": {}}})
    packaged = ThresholdsFile.read(packaged_thresholds_path()).resolve()
    assert {g.name for g in packaged.quantization_gates} == {
        "kl_mean", "top1_match_rate", "decode_kl_mean"}


def test_a_quantized_port_reads_its_own_bounds_for_the_gates_it_names():
    packaged = ThresholdsFile.read(packaged_thresholds_path()).resolve()
    assert dict(packaged.quantized_port_bounds) == {"sequence_kl_vs_floor": 1.5}
    quant = QuantizationRun(scheme=None, checkpoint="q", original=None)
    port = quant.port_thresholds(packaged)
    gates = {g.name: g.threshold for g in port.gates}
    assert gates["sequence_kl_vs_floor"] == 1.5 and gates["kl_vs_floor"] == 3.0
    assert quant.bounds == {"sequence_kl_vs_floor": 1.5}
    # A bf16 port keeps the [precision] bound.
    assert {g.name: g.threshold for g in packaged.gates}["sequence_kl_vs_floor"] == 3.0
    for bounds, match in (({"kl_mean": 2}, r"port_bounds\.kl_mean.*names no gate bounded by "
                                           r"a multiple of the noise floor"),
                          ({"sequence_kl_vs_floor": "tight"},
                           r"port_bounds\.sequence_kl_vs_floor.*positive number")):
        data = {"precision": {"gates": {"kl_mean": {"metric": "kl", "aggregate": "mean",
                                                    "max": 0.01}}},
                "quantization": {"port_bounds": bounds}}
        with pytest.raises(ThresholdsError, match=match):
            ThresholdsFile(data).resolve()


def _quantization_tests(cases):
    return {n: outcome for n, (outcome, _) in cases.items()
            if n.startswith("test_quantization_gate[")}


def test_a_quantized_candidate_is_judged_twice_and_the_three_outputs_agree(
        pytester, w8a8, read_json):
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={w8a8}", *QUICK)
    assert result.ret == 0, result.stdout.str()[-3000:]
    verdict = read_json(pytester.path / "verdict.json")  # schema
    block = verdict["quantization"]
    assert block["scheme"]["scheme"] == "w8a8" and block["port"]["verdict"] == "pass"
    cost = block["quantization"]
    assert cost["judged"] and cost["verdict"] == "pass"
    assert cost["original"] == str(toy_model_dir()) and verdict["model"] == "llm-parity/toy"
    assert 0 < cost["aggregate"]["kl_mean"] < 0.05
    # The port's reference is the quantized checkpoint, run as its scheme says; its gates
    # are those read against the floor, the absolute ones left out and skipped, saying so.
    assert verdict["reference"]["quantization"]["scheme"] == "w8a8"
    assert "kl_mean" in block["port"]["left_out"] and "kl_vs_floor" not in block["port"]["left_out"]
    assert {g["name"] for g in verdict["gates"]} == {
        "kl_vs_floor", "sequence_kl_vs_floor", "decode_kl_vs_floor", "sequence_tail_vs_floor"}
    assert block["port"]["bounds"] == {"sequence_kl_vs_floor": 1.5}
    assert {g["name"]: g["threshold"] for g in verdict["gates"]}["sequence_kl_vs_floor"] == 1.5
    cases = junit_cases(pytester.path / "junit.xml")
    assert cases["test_gate[kl_mean]"][0] == "skipped"
    assert cases["test_gate[kl_vs_floor]"][0] == "passed"
    assert _quantization_tests(cases) == {
        f"test_quantization_gate[{g}]": "passed"
        for g in ("kl_mean", "top1_match_rate", "decode_kl_mean")}
    out = result.stdout.str()
    assert "quantized candidate: w8a8" in out and "the quantization: PASS" in out


def test_a_quantization_over_its_budget_fails_its_own_question_alone(pytester, w8a8,
                                                                   read_json):
    text = packaged_thresholds_path().read_text().replace(
        '[quantization.gates.kl_mean]\nmetric = "kl"\naggregate = "mean"\nmax = 0.05',
        '[quantization.gates.kl_mean]\nmetric = "kl"\naggregate = "mean"\nmax = 0.000001')
    (pytester.path / "tight.toml").write_text(text)
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={w8a8}",
                       "--thresholds=tight.toml", *QUICK)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "fail"
    assert verdict["quantization"]["port"]["verdict"] == "pass"
    assert verdict["quantization"]["quantization"]["failed_gates"] == ["kl_mean"]
    assert verdict["verdict_reasons"][0].startswith(
        "the quantization failed its gates against the unquantized original: kl_mean")
    tests = _quantization_tests(junit_cases(pytester.path / "junit.xml"))
    assert tests["test_quantization_gate[kl_mean]"] == "failure"
    assert [n for n, o in junit_cases(pytester.path / "junit.xml").items()
            if o[0] == "failure"] == ["test_quantization_gate[kl_mean]"]
    assert "quantization gate kl_mean: mean kl" in result.stdout.str()


def test_a_quantized_model_alone_judges_the_port_and_says_why(pytester, w8a8, read_json):
    result = run_suite(pytester, "--candidate", "hf", f"--model={w8a8}", *QUICK)
    assert result.ret == 0, result.stdout.str()[-3000:]
    verdict = read_json(pytester.path / "verdict.json")
    cost = verdict["quantization"]["quantization"]
    assert not cost["judged"] and "no unquantized original" in cost["reason"]
    assert not _quantization_tests(junit_cases(pytester.path / "junit.xml"))
    assert "the quantization: not judged" in result.stdout.str()


def test_an_unreadable_scheme_stops_the_run_before_any_model_loads(pytester, w8a8):
    copy = pytester.path / "awq"
    shutil.copytree(w8a8, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (copy / "config.json").write_text(json.dumps(config))
    result = run_suite(pytester, "--candidate", "hf", f"--candidate-model={copy}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"llm-parity: {copy / 'config.json'}: quantization_config.quant_method is 'awq'" \
        in err and "Traceback" not in err
    assert not (pytester.path / "verdict.json").exists()
