"""The embedded toy model and the Pleias-RAG-350M-shaped checkpoint writer."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llm_parity.runner import toymodel
from llm_parity.runner.toymodel import (
    PLEIAS_CONFIG,
    toy_model_dir,
    write_pleias_shape,
    write_toy_model,
)

# Markers the founding acceptance report shows in its prompts, plus the framing tokens.
REQUIRED_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|query_start|>",
    "<|query_end|>",
    "<|source_start|>",
    "<|source_end|>",
    "<|source_id_start|>",
    "<|source_id_end|>",
    "<|source_analysis_start|>",
    "<|answer_start|>",
    "<|answer_end|>",
]

ENGLISH_PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "This program is free software; you can redistribute it and/or modify it under the terms "
    "of the GNU General Public License",
    "Create a new thread and start it. The thread will run the target function",
    "<|query_start|>What does os.path.join do?<|query_end|>\n"
    "<|source_start|><|source_id_start|>1<|source_id_end|>os.path.join: Join two or more "
    "pathname components, inserting '/' as needed.<|source_end|>\n"
    "<|source_analysis_start|>Source 1 documents os.path.join.<|source_analysis_end|>\n"
    "<|answer_start|>",
]


def config() -> dict:
    return json.loads((toy_model_dir() / "config.json").read_text())


def test_import_stays_cheap():
    code = (
        "import sys, llm_parity.runner.toymodel; "
        "heavy = {'torch', 'transformers', 'safetensors'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packaged_files_exist_and_are_small():
    root = toy_model_dir()
    for name in toymodel.TOY_MODEL_FILES:
        assert (root / name).is_file(), name
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 20 * 1024 * 1024, total
    assert not list(root.glob("*.bin")), "weights must ship as safetensors only"


def test_architecture_matches_the_founding_family():
    c = config()
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert c["model_type"] == "llama"
    assert c["num_attention_heads"] == 2 * c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    assert head_dim * c["num_attention_heads"] == c["hidden_size"]
    assert head_dim in (64, 128)  # head sizes every vLLM attention backend accepts
    assert c["hidden_act"] == "silu"
    assert c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 10000.0
    assert c["max_position_embeddings"] >= 2048
    assert c["torch_dtype"] == "bfloat16"


def test_weights_are_bf16_tied_and_match_config():
    from safetensors import safe_open

    c = config()
    with safe_open(str(toy_model_dir() / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_dtype() == "BF16"
        assert embed.get_shape() == [c["vocab_size"], c["hidden_size"]]
    assert "lm_head.weight" not in names  # tied to the embedding, as in Pleias-RAG-350M
    assert names == set(toymodel.pleias_tensor_shapes(c))


def test_tokenizer_carries_pleias_special_tokens_and_prepends_bos():
    from transformers import AutoTokenizer

    c = config()
    tok = AutoTokenizer.from_pretrained(toy_model_dir())
    for special in REQUIRED_SPECIAL:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, (special, ids)
        assert special in tok.all_special_tokens, special
    assert tok.bos_token_id == c["bos_token_id"]
    assert tok.eos_token_id == c["eos_token_id"]
    assert tok.pad_token_id is not None
    ids = tok("The quick brown fox").input_ids
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert len(tok) <= c["vocab_size"]


def test_write_toy_model_copies(tmp_path):
    dest = write_toy_model(tmp_path / "toy")
    for name in toymodel.TOY_MODEL_FILES:
        assert (dest / name).read_bytes() == (toy_model_dir() / name).read_bytes()


def test_write_toy_model_accepts_an_existing_empty_dir(tmp_path):
    assert write_toy_model(tmp_path) == tmp_path
    assert (tmp_path / "model.safetensors").is_file()


def test_write_toy_model_refuses_non_empty_dest(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(tmp_path)):
        write_toy_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_next_token_distributions_have_structure():
    """Trained, not random: peaked on some positions, broad on others."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir())
    from llm_parity.engines._torch import transformers_dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(
        toy_model_dir(), **{transformers_dtype_kwarg(): torch.float32}
    )
    model.eval()
    max_probs, entropies = [], []
    with torch.no_grad():
        for prompt in ENGLISH_PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            max_probs += logp.exp().max(dim=-1).values.tolist()
            entropies += (-(logp.exp() * logp).sum(dim=-1)).tolist()
    n = len(max_probs)
    peaked = sum(p > 0.5 for p in max_probs)
    broad = sum(h > 2.0 for h in entropies)
    uniform = math.log(model.config.vocab_size)
    mean_entropy = sum(entropies) / n
    assert peaked >= 0.1 * n, (peaked, n)
    assert broad >= 0.1 * n, (broad, n)
    assert max(max_probs) > 0.9
    assert mean_entropy < 0.6 * uniform, (mean_entropy, uniform)


def test_pleias_shape_config_is_the_founding_one():
    c = PLEIAS_CONFIG
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (1024, 2560, 26)
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (16, 8)
    assert (c["vocab_size"], c["rope_theta"], c["tie_word_embeddings"]) == (65536, 10000.0, True)
    assert c["torch_dtype"] == "bfloat16"
    shapes = toymodel.pleias_tensor_shapes()
    assert len(shapes) == toymodel.PLEIAS_NUM_TENSORS == 236
    assert sum(math.prod(s) for s in shapes.values()) == toymodel.PLEIAS_NUM_PARAMETERS


def test_write_pleias_shape(tmp_path):
    """Writes the real file (~674 MiB) and reads its header back."""
    from safetensors import safe_open
    from transformers import AutoConfig

    dest = write_pleias_shape(tmp_path / "pleias", seed=0)
    assert json.loads((dest / "config.json").read_text()) == PLEIAS_CONFIG
    weights = dest / "model.safetensors"
    assert weights.stat().st_size == pytest.approx(674 * 2**20, rel=0.01)
    n_params = 0
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
        for name in names:
            piece = f.get_slice(name)
            assert piece.get_dtype() == "BF16", name
            n_params += math.prod(piece.get_shape())
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert bool((norm == 1).all())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        assert 0.015 < float(q.std()) < 0.025
    assert len(names) == 236
    assert n_params == 353_424_384
    loaded = AutoConfig.from_pretrained(dest)
    assert loaded.num_key_value_heads == 8 and loaded.tie_word_embeddings
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (dest / name).is_file()


def test_write_pleias_shape_refuses_non_empty_dest(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        write_pleias_shape(tmp_path)
