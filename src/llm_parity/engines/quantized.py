"""Quantized checkpoints: what a `quantization_config` says, and the same arithmetic run in
Transformers as the trusted backend.

A quantized candidate is judged twice (docs/quantized-ports.md): the port against its own
quantized weights run by Transformers, and the quantization against the unquantized float32
original. The first needs Transformers to compute what the checkpoint says, not what a
kernel happens to do: here the integer weights are multiplied back by their scales into
ordinary `nn.Linear` weights, and each quantized layer's input is rounded to the integer
grid its scheme names (per token or per tensor, dynamic) before the matmul. That is the
textbook W8A8 product, `(round(x / s_x) * s_x) @ (q_w * s_w)^T`, computed in the engine's
dtype: exact integer accumulation on an int8 kernel and float accumulation here differ by
rounding only, which the floor measures.

Read here, in this order: compressed-tensors `int-quantized` (and `pack-quantized` read,
not run). Other methods are named in the error, not guessed.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_parity.errors import ModelError

# The schemes this module can emulate, by their short names (`llm-parity quantize --scheme`).
SCHEMES = ("w8a8", "w8a16")
# Linear layers a scheme covers when its targets say "Linear": every projection of a block.
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj", "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2",
                   "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme, as a checkpoint's config states it."""

    method: str  # "compressed-tensors"
    format: str  # "int-quantized"
    weight_bits: int
    weight_strategy: str  # "channel" or "tensor"
    activation_bits: int | None  # None: weights only (W8A16)
    activation_strategy: str | None  # "token" or "tensor"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    source: str = ""  # the file it was read from

    @property
    def name(self) -> str:
        activations = f"a{self.activation_bits}" if self.activation_bits else "a16"
        return f"w{self.weight_bits}{activations}"

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "format": self.format, "scheme": self.name,
                "weights": f"int{self.weight_bits} per {self.weight_strategy}",
                "activations": (f"int{self.activation_bits} per {self.activation_strategy}, "
                                "dynamic" if self.activation_bits else "not quantized"),
                "ignore": list(self.ignore)}

    def covers(self, module: str) -> bool:
        """Whether the scheme quantizes the linear layer `module` (a dotted name)."""
        for pattern in self.ignore:
            if _matches(pattern, module):
                return False
        for target in self.targets:
            if target == "Linear":
                if module.rsplit(".", 1)[-1] in LINEAR_SUFFIXES:
                    return True
            elif _matches(target, module):
                return True
        return False


def _matches(pattern: str, module: str) -> bool:
    """compressed-tensors' forms: `re:<regex>` matched against the name, else the name
    itself or its last part (or a glob over the name)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern) or \
        fnmatch.fnmatchcase(module, pattern)


def read_scheme(path: Path) -> Scheme | None:
    """The checkpoint's quantization scheme, or None for an unquantized checkpoint. A
    quantization this module cannot read is an error naming the file, the key and what it
    can read: a quantized checkpoint judged as if it were not would fail for rounding."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the checkpoint's own checks name a missing or broken config
    quant = config.get("quantization_config")
    if not quant:
        return None
    where = f"{config_file}: quantization_config"
    method = quant.get("quant_method")
    if method != "compressed-tensors":
        raise ModelError(f"{where}.quant_method is {method!r}; llm-parity reads "
                         "compressed-tensors checkpoints (int8 W8A8, W8A16)")
    fmt = quant.get("format")
    if fmt not in ("int-quantized", "pack-quantized"):
        raise ModelError(f"{where}.format is {fmt!r}; expected int-quantized")
    groups = quant.get("config_groups") or {}
    if len(groups) != 1:
        raise ModelError(f"{where}.config_groups has {len(groups)} groups; llm-parity reads "
                         "checkpoints with one scheme for every quantized layer")
    (group_name, group), = groups.items()
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    key = f"{where}.config_groups.{group_name}"
    if weights.get("type", "int") != "int" or weights.get("num_bits") != 8:
        raise ModelError(f"{key}.weights is {weights}; expected 8-bit int weights")
    if not weights.get("symmetric", True):
        raise ModelError(f"{key}.weights.symmetric is false; expected symmetric weights")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ModelError(f"{key}.weights.strategy is {weights.get('strategy')!r}; expected "
                         "channel or tensor")
    act_bits = act_strategy = None
    if acts:
        if acts.get("type", "int") != "int" or acts.get("num_bits") != 8:
            raise ModelError(f"{key}.input_activations is {acts}; expected 8-bit int")
        if not acts.get("dynamic", False) or not acts.get("symmetric", True):
            raise ModelError(f"{key}.input_activations must be dynamic and symmetric "
                             f"(static or asymmetric activation scales are not read), is {acts}")
        if acts.get("strategy") not in ("token", "tensor"):
            raise ModelError(f"{key}.input_activations.strategy is {acts.get('strategy')!r}; "
                             "expected token or tensor")
        act_bits, act_strategy = 8, acts["strategy"]
    return Scheme(method=method, format=fmt, weight_bits=8,
                  weight_strategy=weights["strategy"], activation_bits=act_bits,
                  activation_strategy=act_strategy,
                  targets=tuple(group.get("targets") or ("Linear",)),
                  ignore=tuple(quant.get("ignore") or ()), source=str(config_file))


# ------------------------------------------------------------------ the trusted arithmetic


def quantize_activation(x, strategy: str):
    """Symmetric int8 rounding of a layer's input, dynamic: one scale per token (the last
    dimension's rows) or one for the whole tensor; returned dequantized, in x's dtype."""
    import torch

    wide = x.float()
    if strategy == "token":
        amax = wide.abs().amax(dim=-1, keepdim=True)
    else:
        amax = wide.abs().amax()
    scale = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.round(wide / scale).clamp(-128, 127) * scale).to(x.dtype)


def dequantized_state(path: Path, scheme: Scheme) -> tuple[dict[str, Any], set[str]]:
    """The checkpoint's tensors with every quantized weight multiplied back by its scale
    (float32), and the names of the linear layers quantized."""
    import torch
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: a quantized checkpoint with no .safetensors file")
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    quantized = set()
    for name in [n for n in state if n.endswith(".weight_scale")]:
        module = name.removesuffix(".weight_scale")
        weight = state.get(module + ".weight")
        if weight is None or weight.dtype != torch.int8:
            raise ModelError(f"{path}: {name} has no int8 {module}.weight beside it")
        scale = state.pop(name).float()
        if scale.ndim == 1 and scale.numel() == weight.shape[0]:
            scale = scale[:, None]
        state[module + ".weight"] = weight.float() * scale
        state.pop(module + ".weight_zero_point", None)
        quantized.add(module)
    stray = sorted(n for n, t in state.items() if t.dtype == torch.int8)
    if stray:
        raise ModelError(f"{path}: int8 tensors without a weight_scale: {', '.join(stray[:3])}")
    return state, quantized


def load_emulated(spec_model: str, scheme: Scheme, dtype, trust_remote_code: bool,
                  dtype_kwarg: str):
    """A Transformers model of the quantized checkpoint: dequantized weights in `dtype`,
    and each quantized layer's input rounded as the scheme says (a forward pre-hook)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec_model)
    config = AutoConfig.from_pretrained(spec_model, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state, quantized = dequantized_state(path, scheme)
    try:  # the weights come from the checkpoint: no random initialisation first
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - every supported version has it
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 **{dtype_kwarg: dtype})
    names = dict(model.named_modules())
    missing = sorted(n for n in quantized if n not in names)
    if missing:
        raise ModelError(f"{path}: quantized layers the model does not have: {missing[:3]}")
    result = model.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=False)
    model.tie_weights()
    tied = {n for n in result.missing_keys if n.endswith("lm_head.weight")} \
        if getattr(config, "tie_word_embeddings", False) else set()
    absent = [n for n in result.missing_keys if n not in tied]
    if absent or result.unexpected_keys:
        raise ModelError(f"{path}: the checkpoint's tensors do not fit its config (missing "
                         f"{absent[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    if scheme.activation_bits:
        for module in sorted(quantized):
            names[module].register_forward_pre_hook(
                lambda _m, args, strategy=scheme.activation_strategy:
                (quantize_activation(args[0], strategy), *args[1:]))
    return model.eval()
