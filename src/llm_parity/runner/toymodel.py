"""The embedded toy model, and a writer for Pleias-RAG-350M-shaped random checkpoints.

The toy model (``data/toy_model/``) is a small Llama trained by ``scripts/train_toy_model.py``;
it is what the suite runs on when no ``--model`` is named. Its stand-ins for other
architecture families (``data/families/<family>/``: Qwen3, Qwen3-MoE, DeepSeek-V2) are
trained by the same script on the same corpus and share its tokenizer files. ``write_pleias_shape`` produces
a full-size checkpoint with the founding model's exact config and tensor layout, random
weights, for runs at real scale without network access.

torch, transformers and safetensors are imported inside the functions that need them:
importing this module must stay cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llm_parity import DATA_DIR
from llm_parity.config.checkpoint import TOKENIZER_FILES

__all__ = [
    "PLEIAS_CONFIG",
    "PLEIAS_NUM_PARAMETERS",
    "PLEIAS_NUM_TENSORS",
    "TOY_FAMILIES",
    "TOY_MODEL_FILES",
    "pleias_tensor_shapes",
    "toy_model_dir",
    "write_pleias_shape",
    "write_toy_model",
]

# The files that make the toy model directory a complete HF checkpoint.
TOY_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training.json",
)
# A family stand-in's own files; the tokenizer's are the toy model's.
FAMILY_FILES = ("config.json", "generation_config.json", "model.safetensors", "training.json")
TOY_FAMILIES = ("llama", "qwen3", "qwen3_moe", "deepseek_v2")

# config.json of PleIAs/Pleias-RAG-350M. From the founding report: architecture, hidden,
# layers, heads, KV heads, vocab, rope_theta, tied embeddings, bf16; intermediate_size 2560
# is the value that makes its 353,424,384 parameters add up. Recalled from the hub page and
# not checkable offline: rms_norm_eps, max_position_embeddings, bos/eos ids,
# initializer_range and the transformers_version stamp; the rest are Llama defaults.
PLEIAS_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 2560,
    "max_position_embeddings": 2048,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.0",
    "use_cache": True,
    "vocab_size": 65536,
}
PLEIAS_NUM_TENSORS = 236
PLEIAS_NUM_PARAMETERS = 353_424_384



def toy_model_dir(family: str = "llama") -> Path:
    """The packaged toy model directory (a normal HF checkpoint directory), or a family
    stand-in's (its weights and config; the tokenizer is the toy model's)."""
    if family == "llama":
        return DATA_DIR / "toy_model"
    if family not in TOY_FAMILIES:
        raise ValueError(f"no toy model of family {family!r}; expected one of: "
                         f"{', '.join(TOY_FAMILIES)}")
    return DATA_DIR / "families" / family


def _prepare_dest(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists():
        if not dest.is_dir():
            raise ValueError(f"destination {dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise ValueError(f"destination {dest} is not empty; refusing to write into it")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def write_toy_model(dest: Path, family: str = "llama") -> Path:
    """Copy the packaged toy model (or a family's stand-in, with the toy's tokenizer) into
    ``dest`` (created if missing; must be empty)."""
    src, base = toy_model_dir(family), toy_model_dir()
    files = {name: base / name for name in TOY_MODEL_FILES}
    if family != "llama":
        files.update({name: src / name for name in FAMILY_FILES})
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"toy model {family} is incomplete, missing: {missing}")
    dest = _prepare_dest(dest)
    for name, path in files.items():
        shutil.copyfile(path, dest / name)
    return dest


def pleias_tensor_shapes(config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Name and shape of every stored tensor of a tied-embedding Llama checkpoint."""
    c = PLEIAS_CONFIG if config is None else config
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q_dim = c["num_attention_heads"] * head_dim
    kv_dim = c["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    return shapes


def write_pleias_shape(dest: Path, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint with Pleias-RAG-350M's config and layout.

    ``dest`` (created if missing; must be empty) receives config.json,
    generation_config.json, one bf16 model.safetensors (236 tensors, 353,424,384
    parameters) and the toy model's tokenizer files. The tokenizer covers only the first
    few thousand ids of the 65,536-row vocabulary; the rest are valid model outputs with
    no text, which transformers and vLLM both accept.

    Weights follow the usual Llama initialisation: normal(0, 0.02) for matrices, with
    the residual output projections scaled down by sqrt(2 * layers) so activations stay
    bounded through 26 layers, and 1.0 for the RMSNorm weights. The file is streamed in
    blocks of about 16 MiB, so memory use stays small whatever the checkpoint size.
    """
    import torch

    dest = _prepare_dest(dest)
    config = dict(PLEIAS_CONFIG)
    std = config["initializer_range"]
    residual_std = std / (2 * config["num_hidden_layers"]) ** 0.5
    shapes = pleias_tensor_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    def blocks(name: str, shape: tuple[int, ...]):
        if name.endswith("norm.weight"):
            yield torch.ones(shape, dtype=torch.bfloat16)
            return
        scale = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        rows, cols = shape
        step = max(1, (1 << 22) // cols)  # about 16 MiB of float32 at a time
        for start in range(0, rows, step):
            n = min(step, rows - start)
            yield (torch.randn((n, cols), generator=gen) * scale).to(torch.bfloat16)

    _stream_bf16_safetensors(dest / "model.safetensors", shapes, blocks)

    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "transformers_version": config["transformers_version"],
    }
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:  # the ones the toy model has
        if (toy_model_dir() / name).is_file():
            shutil.copyfile(toy_model_dir() / name, dest / name)
    return dest


def _stream_bf16_safetensors(path: Path, shapes: dict, blocks) -> None:
    """Write a bf16 safetensors file block by block instead of holding every tensor at once.

    ``blocks(name, shape)`` yields the tensor's contents as consecutive row blocks. The
    format is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw tensor bytes in that order.
    """
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 2
        for dim in shape:
            nbytes *= dim
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            for block in blocks(name, shape):
                # bf16 has no numpy dtype: view the bits as int16 to reach the bytes.
                f.write(memoryview(block.contiguous().view(torch.int16).numpy()))
