"""Architecture families: the registry, config nesting, and layer capture on real (tiny,
random) Transformers models of every family, in float32 and bf16."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_parity import families
from llm_parity.compare.localize import localize, relative_error
from llm_parity.families import Family, family_for, text_config

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=256)


def tiny_model(model_type: str, dtype: str = "float32"):
    """A random Transformers model of the family, built in memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict = {}
    if model_type == "qwen3_moe":
        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                     norm_topk_prob=True, decoder_sparse_step=1)
    elif model_type == "deepseek_v2":
        extra = dict(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                     num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                     first_k_dense_replace=1, n_group=1, topk_group=1,
                     topk_method="greedy", norm_topk_prob=False)
    elif model_type == "gemma3_text":
        extra = dict(sliding_window=8, query_pre_attn_scalar=32,
                     layer_types=["sliding_attention", "sliding_attention",
                                  "full_attention"])
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # float32 in every release
    # Norm weights and biases start at 0 or 1: give them values so a wrong one shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(getattr(torch, dtype)).eval()


def capture(model, ids, positions):
    import torch

    from llm_parity.engines.capture import Recorder

    recorder = Recorder(model, positions, fused_residual=False)
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        recorder.remove()
    return recorder.result()


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize("model_type, name", [
    ("llama", "llama"), ("mistral", "llama"), ("qwen3", "qwen3"), ("qwen3_moe", "qwen3_moe"),
    ("gemma3", "gemma3"), ("gemma3_text", "gemma3"), ("deepseek_v2", "deepseek_v2"),
    ("deepseek_v3", "deepseek_v2"), ("something_new", "llama"), (None, "llama"),
])
def test_a_model_type_finds_its_family(model_type, name):
    assert family_for(model_type).name == name


def test_a_family_registered_at_run_time_is_found_and_checked():
    custom = Family("glm_test", ("glm_test",), {"input_norm": ("input_layernorm",),
                                                "attn": ("self_attention",),
                                                "mlp": ("mlp",)})
    families.register(custom)
    try:
        assert family_for("glm_test") is custom
        assert "glm_test" in families.names()
    finally:
        families._REGISTERED.pop("glm_test")
    with pytest.raises(ValueError, match="unknown points \\['gate'\\]"):
        Family("bad", ("bad",), {"gate": ("mlp.gate",)})
    with pytest.raises(KeyError, match="unknown family 'nope'"):
        families.family("nope")


def test_a_nested_text_config_is_read_for_the_checkpoint_card(tmp_path):
    from llm_parity.runner.models import checkpoint_card

    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", "vocab_size": 262208,
                              "num_hidden_layers": 34, "max_position_embeddings": 131072},
              "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    card = checkpoint_card(tmp_path)
    assert card["vocab_size"] == 262208
    assert card["layers"] == 34
    assert card["max_position_embeddings"] == 131072
    assert card["family"] == "gemma3"
    assert card["architecture"] == "Gemma3ForConditionalGeneration"
    assert text_config({"vocab_size": 5}) == {"vocab_size": 5}


# ------------------------------------------------------------------------- capture

def _known(model_type: str):
    """A family whose Transformers model this release has: DeepSeek-V2 came after 4.51, the
    founding environment's release (CI's second pass deselects `transformers5`)."""
    return pytest.param(model_type, marks=pytest.mark.transformers5) \
        if model_type == "deepseek_v2" else model_type


FAMILY_TYPES = [_known(t) for t in ("llama", "qwen3", "qwen3_moe", "deepseek_v2",
                                     "gemma3_text")]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_point_of_the_family_is_captured_and_near_its_bf16_copy(model_type):
    """Each family's sub-modules are hooked in every layer that has them (a dense layer has
    no router), one row per position whatever the module's own layout (per-head norms,
    router logits), and a bf16 copy of the same model stays close at every point: the
    points are the same quantities in both."""
    family = family_for(model_type)
    ids = [int(i) for i in np.random.default_rng(1).integers(4, 500, size=24)]
    positions = [3, 11, 23]
    reference = capture(tiny_model(model_type), ids, positions)
    floor = capture(tiny_model(model_type, "bfloat16"), ids, positions)
    assert set(reference) == set(floor)
    expected = {"embed", "final_norm", *(f"layers.{i}" for i in range(3))}
    for point in family.points:
        layers = range(3)
        if model_type == "deepseek_v2" and point in ("router", "shared_experts"):
            layers = range(1, 3)  # first_k_dense_replace=1: layer 0 is dense
        expected |= {f"layers.{i}.{point}" for i in layers}
    assert set(reference) == expected
    for name, rows in reference.items():
        assert rows.shape[0] == len(positions), name
        assert np.isfinite(rows).all(), name
        assert relative_error(floor[name], rows) < 0.08, name
    # Each row is its own token's: a causal model's point at position 23 is the same when
    # nothing follows it, and at position 11 when the tokens after 11 are cut off (a
    # per-head output read in the wrong layout mixes positions and fails this).
    cut = capture(tiny_model(model_type), ids[:12], [3, 11])
    for name, rows in cut.items():
        assert np.allclose(rows, reference[name][:2], rtol=1e-4, atol=1e-5), name
    if model_type == "qwen3_moe":
        assert reference["layers.0.router"].shape == (3, 4)  # logits over 4 experts
        assert reference["layers.0.q_norm"].shape == (3, 4 * 32)  # heads side by side
    if model_type == "deepseek_v2":
        assert reference["layers.1.kv_a_norm"].shape == (3, 32)  # the cached latent


def test_gemma_embedding_is_captured_scaled():
    """Transformers' Gemma scales inside the embedding module: the captured `embed` is the
    lookup times sqrt(hidden), the quantity the first layer reads."""
    import torch

    model = tiny_model("gemma3_text")
    ids = [5, 9, 17, 33, 65, 129]
    rows = capture(model, ids, [0, 5])["embed"]
    lookup = model.model.embed_tokens.weight[[5, 129]].detach().numpy()
    assert np.allclose(rows, lookup * 128 ** 0.5, rtol=1e-6)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(128 ** 0.5)
    del torch


def test_a_lost_qk_norm_is_localized_at_the_query_norm():
    """Qwen3 with one layer's query-norm weights reset to ones (a port that does not load
    them): localization names that layer's query norm, not the attention after it."""
    import torch

    ids = [int(i) for i in np.random.default_rng(2).integers(4, 500, size=24)]
    positions = [5, 15, 23]
    reference = capture(tiny_model("qwen3"), ids, positions)
    floor = capture(tiny_model("qwen3", "bfloat16"), ids, positions)
    broken = tiny_model("qwen3", "bfloat16")
    with torch.no_grad():
        broken.model.layers[1].self_attn.q_norm.weight.fill_(1.0)
    found = localize(reference, capture(broken, ids, positions), floor, dtype="bfloat16",
                     limit=5.0, output_failed=True)
    assert found.where == "layer 1, query norm", found.points


# --------------------------------------------------------------- the family catalogue

_CATALOGUE_TYPES = {"qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "deepseek_v2": "deepseek_v2",
                    "gemma3": "gemma3_text"}


def _catalogue_cases():
    from llm_parity.testing.family_mutants import FAMILY_CATALOGUE

    for family, entries in FAMILY_CATALOGUE.items():
        for name in entries:
            marks = [pytest.mark.transformers5] if family == "deepseek_v2" else []
            yield pytest.param(family, name, marks=marks, id=f"{family}-{name}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved once, as a checkpoint directory."""
    made: dict = {}

    def get(family):
        if family not in made:
            path = tmp_path_factory.mktemp(family) / "model"
            tiny_model(_CATALOGUE_TYPES[family]).save_pretrained(path)
            made[family] = path
        return made[family]

    return get


@pytest.mark.parametrize("family, name", list(_catalogue_cases()))
def test_each_family_mutant_is_localized_where_it_breaks(saved, tmp_path, family, name):
    """Every family catalogue entry, applied to the family's checkpoint and loaded by
    Transformers in bf16, is named by localization at the place the catalogue says."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_parity.testing.family_mutants import FAMILY_CATALOGUE, family_mutant

    source = saved(family)
    broken = family_mutant(source, tmp_path / name, family, name)
    ids = [int(i) for i in np.random.default_rng(3).integers(4, 500, size=32)]
    positions = [9, 20, 31]

    def load(path, dtype):
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()

    reference = capture(load(source, torch.float32), ids, positions)
    floor = capture(load(source, torch.bfloat16), ids, positions)
    found = localize(reference, capture(load(broken, torch.bfloat16), ids, positions), floor,
                     dtype="bfloat16", limit=5.0, output_failed=True)
    layer, module = FAMILY_CATALOGUE[family][name][2]
    assert (found.layer, found.module) == (layer, module), (found.where, [
        (p.name, round(p.ratio, 1)) for p in found.points if p.ratio > 2])
