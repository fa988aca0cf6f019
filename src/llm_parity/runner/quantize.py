"""`llm-parity quantize SRC DST --scheme w8a8`: a compressed-tensors checkpoint of SRC.

W8A8: every linear layer of the decoder blocks stored as int8 with one float32 scale per
output channel (symmetric, round to nearest: `q = round(w / s)`, `s = max|w_row| / 127`),
its input quantized at run time to int8 per token (dynamic, symmetric). W8A16 keeps the
activations. Embeddings, norms and the output head stay as they were, and layers named by
`ignore` (compressed-tensors' `re:` patterns or module names) stay unquantized: a
mixed-precision checkpoint. The config's `quantization_config` says all of it, in the form
vLLM's compressed-tensors reader and `llm_parity.engines.quantized` both read.

This is the plain quantization (no calibration, no smoothing): what a team's tool does
better or worse is the quantization question's to measure, not the port question's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from llm_parity.engines.quantized import SCHEMES, Scheme, read_scheme
from llm_parity.errors import ModelError

MARKER = "quantized_by_llm_parity.json"


def quantization_config(scheme: str, ignore: Sequence[str]) -> dict:
    activations = None
    if scheme == "w8a8":
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                       "dynamic": True, "group_size": None, "block_structure": None,
                       "observer": None, "actorder": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": ["lm_head", *ignore],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                        "strategy": "channel", "dynamic": False, "group_size": None,
                        "block_structure": None, "observer": "minmax", "actorder": None},
            "input_activations": activations,
            "output_activations": None,
        }},
    }


def quantize_weight(weight):
    """(int8 weight, float32 scale of shape [out, 1]) for one 2-D weight, per channel."""
    import torch

    wide = weight.float()
    scale = (wide.abs().amax(dim=1, keepdim=True) / 127.0).clamp(
        min=torch.finfo(torch.float32).tiny)
    return torch.round(wide / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_checkpoint(src: Path, dst: Path, scheme: str = "w8a8",
                        ignore: Sequence[str] = ()) -> tuple[Path, Scheme, int]:
    """Write DST, the SRC checkpoint quantized; returns its path, the scheme as read back
    from it and the number of layers quantized. Refuses a quantized SRC and a DST that is
    neither empty nor an earlier output of this command."""
    import torch
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ModelError(f"--scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: not a checkpoint directory (no config.json)")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise ModelError(f"{src}/config.json: already quantized "
                         f"({config['quantization_config'].get('quant_method')})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{src}: no .safetensors weights to quantize")
    if dst.exists() and any(dst.iterdir()) and not (dst / MARKER).is_file():
        raise ModelError(f"{dst}: exists and is not a checkpoint this command wrote; "
                         "give an empty or new directory")
    quant = quantization_config(scheme, ignore)
    # The rules that decide which layers are quantized are the reader's own.
    probe = Scheme(method="compressed-tensors", format="int-quantized", weight_bits=8,
                   weight_strategy="channel", activation_bits=None, activation_strategy=None,
                   ignore=tuple(quant["ignore"]))
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = 0
    try:
        for file in files:
            out = {}
            for name, tensor in load_file(str(file)).items():
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and tensor.ndim == 2 and probe.covers(module):
                    out[name], out[module + ".weight_scale"] = quantize_weight(tensor)
                    count += 1
                else:
                    out[name] = tensor.contiguous()
            save_file(out, str(partial / file.name), metadata={"format": "pt"})
        if count == 0:
            raise ModelError(f"{src}: no linear layer to quantize (every one ignored?)")
        for other in src.iterdir():
            if other.is_file() and other.suffix != ".safetensors" and other.name != "config.json":
                shutil.copy2(other, partial / other.name)
        config["quantization_config"] = quant
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (partial / MARKER).write_text(json.dumps(
            {"source": str(src.resolve()), "scheme": scheme, "ignore": list(ignore),
             "layers": count, "torch": torch.__version__}, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        partial.rename(dst)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    read = read_scheme(dst)
    assert read is not None
    return dst, read, count
