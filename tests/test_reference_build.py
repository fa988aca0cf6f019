"""Larger models: the reference built once without a candidate (whole, or in shards merged
afterwards), and the reference placed across devices and memory tiers (accelerate's
device_map, max_memory, disk offload). Real Transformers on the toy model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_parity.config.options import OPTIONS, build_settings
from llm_parity.config.thresholds import ThresholdsFile
from llm_parity.errors import EngineError, SettingsError, StoreError, ThresholdsError
from llm_parity.runner.golden import merge_stores, shard_range

QUICK = ("--long-prompts", "none", "--continuation", "6")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_parity.cli", *args], cwd=cwd,
                          capture_output=True, text=True)


# ---------------------------------------------------------------- fast: no model


def test_shards_cover_every_prompt_once():
    for count in (1, 2, 7, 25, 33):
        for shards in (1, 2, 3, 4):
            ranges = [shard_range(count, i, shards) for i in range(shards)]
            assert [i for r in ranges for i in r] == list(range(count))


def test_reference_options_come_from_the_file_and_the_command_line(tmp_path):
    (tmp_path / "thresholds.toml").write_text(
        '[reference]\noptions = { device_map = "auto", max_memory = { cpu = "4GiB" } }\n')
    raw = {o.flag.lstrip("-"): o.default for o in OPTIONS}
    raw["thresholds"] = str(tmp_path / "thresholds.toml")
    settings = build_settings(raw, tmp_path)
    assert settings.reference_options == {"device_map": "auto", "max_memory": {"cpu": "4GiB"}}
    raw["reference-option"] = ['max_memory={"cpu": "1GiB"}', "offload_folder=/tmp/off"]
    settings = build_settings(raw, tmp_path)
    assert settings.reference_options == {"device_map": "auto", "max_memory": {"cpu": "1GiB"},
                                          "offload_folder": "/tmp/off"}
    raw["reference-option"] = ['max_memory={"cpu": 1GiB}']
    with pytest.raises(SettingsError, match="--reference-option: max_memory: not valid JSON"):
        build_settings(raw, tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("[reference]\nopts = {}\n", "[reference] unknown key 'opts'"),
    ("[reference]\noptions = 3\n", "options must be a table of from_pretrained arguments"),
])
def test_bad_reference_tables_are_named(tmp_path, text, expected):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ThresholdsError) as err:
        ThresholdsFile.read(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("options, expected", [
    ({"device_map": "auto", "max_memory": {"0": "10GiB"}},
     "max_memory key '0' names '0', but this machine has 0 cuda devices"),
    ({"device_map": {"model.layers.0": "cuda:1"}},
     "device_map['model.layers.0'] names 'cuda:1', but this machine has 0 cuda devices"),
    ({"device_map": {"model.layers.0": "gpu7"}}, "names 'gpu7', which is not a device"),
    ({"max_memory": {"cpu": "1GiB"}}, "max_memory needs device_map"),
    ({"device_map": "everywhere"}, "device_map 'everywhere': expected one of auto"),
])
def test_a_placement_naming_a_missing_device_is_refused_before_loading(options, expected):
    pytest.importorskip("torch")
    from llm_parity.engines.base import EngineSpec, engine_class

    with pytest.raises(EngineError) as err:
        engine_class("hf").preflight(EngineSpec(model="/nonexistent", options=options,
                                                role="reference (hf)"))
    assert str(err.value).startswith("reference (hf): ") and expected in str(err.value)


# ---------------------------------------------------------------- with the toy model


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The toy's reference built whole and in three shards (each with its bf16 floor)."""
    where = tmp_path_factory.mktemp("stores")
    done = cli(where, "reference", "build", "whole", *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["first_token_prompts"] == 25 and summary["noise_floor"] == "bfloat16"
    for i in (1, 2, 3):
        done = cli(where, "reference", "build", f"part{i}", "--shard", f"{i}/3", *QUICK)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["shard"] == f"{i}/3"
    return where


def read(store: Path):
    from safetensors.numpy import load_file

    return (json.loads((store / "key.json").read_text())["key"],
            load_file(str(store / "reference.safetensors")),
            json.loads((store / "noise_floor-bfloat16-top20.json").read_text()))


@pytest.mark.engine
def test_a_store_merged_from_shards_is_the_store_built_whole(stores):
    done = cli(stores, "reference", "merge", "merged", "part3", "part1", "part2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["noise_floors"] == ["noise_floor-bfloat16-top20.json"]
    whole_key, whole, whole_floor = read(stores / "whole")
    merged_key, merged, merged_floor = read(stores / "merged")
    assert merged_key == whole_key
    assert whole.keys() == merged.keys()
    for name in whole:
        assert np.array_equal(whole[name], merged[name]), name
    assert merged_floor == whole_floor


@pytest.mark.engine
def test_a_merged_store_replays_in_a_test_run_like_the_whole_one(stores, pytester, read_json):
    if not (stores / "merged").exists():
        merge_stores(stores / "merged", [stores / f"part{i}" for i in (1, 2, 3)])
    verdicts = []
    for name in ("whole", "merged"):
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", *QUICK,
            f"--reference-store={stores / name}", f"--parity-json={name}.json")
        assert result.ret == 0, result.stdout.str()[-3000:]
        verdict = read_json(pytester.path / f"{name}.json")
        # Replayed: neither the float32 reference nor the floor engine was built.
        assert "reference_store_load_s" in verdict["timings"]
        assert "reference_load_s" not in verdict["timings"]
        assert "noise_floor_load_s" not in verdict["timings"]
        verdicts.append(verdict)
    whole, merged = verdicts
    assert whole["gates"] == merged["gates"] and whole["prompts"] == merged["prompts"]
    assert whole["sequences"] == merged["sequences"]


@pytest.mark.engine
def test_shards_that_disagree_are_refused_naming_the_field(stores):
    done = cli(stores, "reference", "build", "other2", "--shard", "2/3", "--long-prompts",
               "none", "--continuation", "4")
    assert done.returncode == 0, done.stderr
    with pytest.raises(StoreError) as err:
        merge_stores(stores / "nope", [stores / "part1", stores / "other2", stores / "part3"])
    assert "disagree on continuation (6 and 4)" in str(err.value)
    with pytest.raises(StoreError, match="missing 3/3"):
        merge_stores(stores / "nope", [stores / "part1", stores / "part2"])
    with pytest.raises(StoreError, match="given twice 1/3"):
        merge_stores(stores / "nope", [stores / "part1", stores / "part1", stores / "part3"])
    with pytest.raises(StoreError, match="a whole store, not a shard"):
        merge_stores(stores / "nope", [stores / "whole", stores / "part2"])
    assert not (stores / "nope").exists()
    done = cli(stores, "reference", "merge", "whole", "part1", "part2", "part3")
    assert done.returncode == 2 and "exists; merge into a new directory" in done.stderr
    done = cli(stores, "reference", "build", "x", "--shard", "4/3")
    assert done.returncode == 2 and "--shard: expected I/N with 1 <= I <= N" in done.stderr


@pytest.mark.engine
def test_a_reference_offloaded_to_disk_answers_bit_for_bit_alike(tmp_path):
    # Accelerate does the placement: installed with the suite's real-model extra (the
    # first CI pass); the transformers-4.51 pass has no accelerate.
    pytest.importorskip("accelerate")
    from llm_parity.engines.base import EngineSpec, build_engine
    from llm_parity.runner.toymodel import toy_model_dir

    model = str(toy_model_dir())
    ids = [[1, 5, 9, 200, 37], [1, 77, 3000, 12, 5, 6, 7]]
    answers = []
    for options in ({}, {"device_map": "auto", "max_memory": {"cpu": "3MB"},
                         "offload_folder": str(tmp_path / "offload")}):
        engine = build_engine("hf", EngineSpec(model=model, dtype="float32", device="cpu",
                                               options=options))
        try:
            info = engine.describe()
            answers.append((engine.next_token(ids, 20),
                            engine.score([ids[1] + [3, 4, 5]], [6], 20)[0],
                            [s for d in engine.greedy(ids, 5, 20) for s in d.steps]))
        finally:
            engine.close()
    assert info["placement"] == {"disk": 1}  # the whole model offloaded to disk
    assert options["max_memory"] == {"cpu": "3MB"}  # the caller's options left as given
    for plain, offloaded in zip(*answers):
        for a, b in zip(plain, offloaded, strict=True):
            assert np.array_equal(a.full_logprobs, b.full_logprobs)


@pytest.mark.engine
def test_a_device_map_naming_a_missing_device_stops_the_suite_before_any_model(pytester):
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", *QUICK,
        "--reference-option", 'device_map={"model": "cuda:2"}', "--parity-json=v.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert ("reference (hf): device_map['model'] names 'cuda:2', but this machine has 0 cuda "
            "devices") in result.stdout.str()
    verdict = json.loads((pytester.path / "v.json").read_text())
    assert verdict["verdict"] == "error" and "timings" not in verdict


@pytest.mark.engine
def test_a_suite_run_records_where_the_reference_was_placed(pytester, read_json):
    pytest.importorskip("accelerate")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision", "--candidate", "hf", "--continuation",
        "0", "--noise-floor", "off", "--reference-option", "device_map=auto",
        "--reference-option", 'max_memory={"cpu": "3MB"}', "--reference-option",
        f"offload_folder={pytester.path / 'offload'}", "--parity-json=v.json")
    assert result.ret == 0, result.stdout.str()[-3000:]
    reference = read_json(pytester.path / "v.json")["reference"]  # schema-checked
    assert reference["placement"] == {"disk": 1}
    assert reference["options"]["device_map"] == "auto"
