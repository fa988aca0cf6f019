"""Model resolution against real cache layouts made here, and what a checkpoint is."""

from __future__ import annotations

import shutil

import pytest

from llm_parity.errors import ModelError
from llm_parity.runner.models import (
    checkpoint_card,
    checkpoint_hash,
    is_local_reference,
    resolve_model,
)
from llm_parity.runner.toymodel import toy_model_dir


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty ModelScope and HuggingFace caches, offline, pointed at by their variables."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def hf_snapshot(root, repo_id, revision="0123abcd"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(toy_model_dir(), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_no_name_is_the_embedded_toy_model():
    resolved = resolve_model(None)
    assert (resolved.name, resolved.source, resolved.path) == (
        "llm-parity/toy", "embedded", toy_model_dir())


def test_local_directory(tmp_path):
    local = tmp_path / "ckpt"
    shutil.copytree(toy_model_dir(), local)
    resolved = resolve_model(str(local))
    assert (resolved.source, resolved.path) == ("local", local.resolve())


@pytest.mark.parametrize("name", ["./model", "/abs/model", "a/b/c", "model", "~/m"])
def test_names_that_can_only_be_paths(name):
    assert is_local_reference(name)


def test_hub_id_shape_is_not_a_path():
    assert not is_local_reference("PleIAs/Pleias-RAG-350M")


def test_huggingface_cache_snapshot_is_found_offline(caches):
    snapshot = hf_snapshot(caches / "hf", "PleIAs/Pleias-RAG-350M")
    resolved = resolve_model("PleIAs/Pleias-RAG-350M")
    assert (resolved.source, resolved.path) == ("hf-cache", snapshot)


def test_several_snapshots_without_refs_main_are_not_guessed_by_date(caches, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):  # as where huggingface_hub cannot tell, offline
        if name == "huggingface_hub":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    older = hf_snapshot(caches / "hf", "org/two", revision="aaaa1111")
    newer = older.parent / "bbbb2222"
    shutil.copytree(older, newer)
    (older.parent.parent / "refs" / "main").unlink()
    with pytest.raises(ModelError, match=r"holds 2 snapshots \(aaaa1111, bbbb2222\) and no "
                                         r"refs/main"):
        resolve_model("org/two")
    shutil.rmtree(newer)
    assert resolve_model("org/two").path == older  # one snapshot: no doubt which


def test_code_hash_covers_the_checkpoints_own_python(tmp_path):
    from llm_parity.runner.golden import code_hash

    shutil.copytree(toy_model_dir(), tmp_path / "m")
    assert code_hash(tmp_path / "m") is None
    (tmp_path / "m" / "modeling_x.py").write_text("x = 1\n")
    first = code_hash(tmp_path / "m")
    (tmp_path / "m" / "modeling_x.py").write_text("x = 2\n")
    assert first and code_hash(tmp_path / "m") != first


def test_modelscope_cache_comes_first(caches):
    hf_snapshot(caches / "hf", "PleIAs/Pleias-RAG-350M")
    # Newer ModelScope releases escape dots in names as ___.
    ms = caches / "modelscope" / "models" / "PleIAs" / "Pleias-RAG-0___35B"
    shutil.copytree(toy_model_dir(), ms)
    hf_snapshot(caches / "hf", "PleIAs/Pleias-RAG-0.35B")
    resolved = resolve_model("PleIAs/Pleias-RAG-0.35B")
    assert (resolved.source, resolved.path) == ("modelscope-cache", ms)


def test_offline_and_not_cached_names_both_caches(caches):
    with pytest.raises(ModelError) as info:
        resolve_model("nobody/nothing")
    message = str(info.value)
    assert "--model: nobody/nothing is not in the ModelScope cache" in message
    assert str(caches / "modelscope") in message and str(caches / "hf") in message
    assert "offline" in message


def test_a_cached_snapshot_without_weights_is_refused(caches):
    snapshot = hf_snapshot(caches / "hf", "org/broken")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="holds no weight files"):
        resolve_model("org/broken")


def test_card_and_hash_of_the_toy_model():
    card = checkpoint_card(toy_model_dir())
    assert card["architecture"] == "LlamaForCausalLM"
    assert (card["layers"], card["attention_heads"], card["kv_heads"]) == (4, 4, 2)
    assert card["tie_word_embeddings"] is True
    # Parameters counted from the safetensors header alone, tied embeddings stored once.
    assert (card["parameters"], card["tensors"]) == (4_196_608, 38)
    digest = checkpoint_hash(toy_model_dir())
    assert len(digest) == 64 and digest == checkpoint_hash(toy_model_dir())


def test_the_checkpoint_hash_covers_config_and_weights(tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(toy_model_dir(), copy)
    base = checkpoint_hash(copy)
    assert base == checkpoint_hash(toy_model_dir())  # the same bytes, wherever they lie
    config = copy / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"rope_theta"', '"rope_theta" ', 1))
    assert checkpoint_hash(copy) != base  # config.json is hashed
    config.write_text(original)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_hash(copy) != base  # so are the weights
