"""Layer outputs captured with forward hooks, in one canonical form for every engine.

The points, in the order a token's hidden state passes them:

    embed
    layers.{i}.{point}              (each sub-module point of the family, in its order)
    layers.{i}                      (the residual stream after layer i)
    final_norm

A Llama layer's points are input_norm, attn, post_attn_norm and mlp; other families add
theirs (qk-norm, a MoE router, MLA's latent norms, Gemma's sandwich norms): the family
adapter (families/) names them and the attribute paths that reach them.

`embed` is the hidden state entering the first decoder layer, read by a hook on that
layer's inputs rather than on the embedding module: engines differ in what the module
returns (Transformers' Gemma scales the lookup by sqrt(hidden) inside it, vLLM's after it),
and the stream the first layer reads is what a port must get right, wherever it computes it.

Transformers exposes the residual stream directly: a decoder layer returns it. vLLM fuses
the residual add into the next layer's norm: its layers return `(hidden, residual)`, where
`hidden` is the MLP's output not yet added, and its norms return `(normed, residual)`. The
canonical residual stream after a vLLM layer is therefore `hidden + residual`, and a norm's
output is the first element. Fused projections (q/k/v in one `qkv_proj`, gate/up in one
`gate_up_proj`) need no mapping: only whole sub-modules' outputs are captured, and those
are the same tensors in both (`self_attn` ends with the output projection, `mlp` with the
down projection).

Only the rows of the positions asked for are kept (positions x width per point; a point
computed per head, such as a query norm, is kept with its heads side by side), copied to
the host in float32 as the hooks fire: the activation history is never held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_parity.errors import EngineError
from llm_parity.families import Family, family_for


def model_family(model: Any) -> Family:
    """The family of a Transformers or vLLM model, by its config's model type (a
    multimodal config's text model's type where it nests one)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return family_for(getattr(text, "model_type", None) or getattr(config, "model_type", None))


def _reach(layer: Any, path: str) -> Any:
    module = layer
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module


def decoder_parts(model: Any) -> tuple[Any, Any, list[Any], Any]:
    """(inner model, embedding, decoder layers, final norm) of a decoder-only causal LM,
    Transformers' or vLLM's: the inner model is the one holding `layers` and
    `embed_tokens`."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        embed = getattr(module, "embed_tokens", None)
        if layers is not None and embed is not None:
            return module, embed, list(layers), getattr(module, "norm", None)
    raise EngineError(
        f"cannot find decoder layers in {type(model).__name__}: layer capture needs a "
        "Llama-style model (an inner module with embed_tokens, layers and norm)")


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _residual_stream(output: Any) -> Any:
    """vLLM's `(hidden, residual)`: the stream is their sum (the add the next norm fuses)."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and output[1] is not None:
        return output[0] + output[1]
    return _first(output)


class Recorder:
    """Forward hooks on every capture point of `model`, keeping the rows of `positions`.

    Token rows are counted across forward calls (a chunked prefill runs one prompt in
    several), so `positions` index the whole prompt. `fused_residual` says the layers
    return vLLM's `(hidden, residual)` pair.
    """

    def __init__(self, model: Any, positions: Sequence[int], fused_residual: bool) -> None:
        self.positions = sorted({int(p) for p in positions})
        self.rows: dict[str, dict[int, np.ndarray]] = {}
        self.seen = 0  # token rows of earlier forward calls
        self.base = 0  # the first row of the current call
        self.tokens = 0  # token rows of the current call
        self.family = model_family(model)
        _, embed, layers, norm = decoder_parts(model)
        self.hidden_size = int(embed.weight.shape[-1])
        self.num_layers = len(layers)
        self.handles = [layers[0].register_forward_pre_hook(self._on_first_layer,
                                                            with_kwargs=True)]
        layer_output = _residual_stream if fused_residual else _first
        for i, layer in enumerate(layers):
            for point, paths in self.family.points.items():
                module = next((m for m in map(lambda p: _reach(layer, p), paths)
                               if m is not None), None)
                if module is not None:
                    self._hook(module, f"layers.{i}.{point}", _first)
            self._hook(layer, f"layers.{i}", layer_output)
        if norm is not None:
            self._hook(norm, "final_norm", _first)

    def _hook(self, module: Any, name: str, pick: Any) -> None:
        def hook(_module, _inputs, output):
            self._keep(name, pick(output))

        self.handles.append(module.register_forward_hook(hook))

    def _on_first_layer(self, _module, args, kwargs) -> None:
        """The stream entering layer 0: Transformers passes it first (or as
        `hidden_states`), vLLM after the positions; the first floating tensor of the
        model's width is it."""
        stream = kwargs.get("hidden_states")
        if stream is None:
            stream = next((a for a in args if getattr(a, "is_floating_point", None)
                           and a.is_floating_point() and a.shape[-1] == self.hidden_size),
                          None)
        if stream is None:
            raise EngineError("layer capture: the first decoder layer was called without a "
                              f"hidden state of width {self.hidden_size}")
        self.tokens = stream.reshape(-1, stream.shape[-1]).shape[0]
        self.base, self.seen = self.seen, self.seen + self.tokens
        self._keep("embed", stream)

    def _keep(self, name: str, tensor: Any) -> None:
        # One row per token of this call: a per-head output (tokens x heads x head size)
        # keeps its heads side by side; one that is not a whole number of rows per token
        # (a module run on other tokens than the call's) is left out.
        if self.tokens == 0 or tensor.numel() % self.tokens:
            return
        if tensor.dim() == 4 and tensor.shape[1] != self.tokens == tensor.shape[2]:
            # (batch, heads, tokens, head size): Transformers' Gemma normalises queries
            # and keys after moving the heads first; vLLM keeps the tokens first.
            tensor = tensor.transpose(1, 2)
        flat = tensor.reshape(self.tokens, -1)
        wanted = [p for p in self.positions if self.base <= p < self.base + flat.shape[0]]
        if not wanted:
            return
        picked = flat[[p - self.base for p in wanted]].detach().float().cpu().numpy()
        kept = self.rows.setdefault(name, {})
        for position, row in zip(wanted, picked):
            kept[position] = row.copy()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def result(self) -> dict[str, np.ndarray]:
        """Point name -> float32 array (positions x hidden), every position present."""
        if not self.rows:
            raise EngineError("no layer output was captured: the model's forward did not run "
                              "through the hooked modules (a compiled graph bypasses hooks)")
        out = {}
        for name, kept in self.rows.items():
            missing = [p for p in self.positions if p not in kept]
            if missing:
                raise EngineError(
                    f"layer capture: {name} has no output for positions {missing[:5]} (they "
                    f"were not computed: {self.seen} token rows ran)")
            out[name] = np.stack([kept[p] for p in self.positions])
        return out

    def packed(self) -> dict[str, list]:
        """`result()` as plain lists and bytes, which any RPC serializer carries."""
        return {name: [int(a.shape[0]), int(a.shape[1]), a.astype(np.float32).tobytes()]
                for name, a in self.result().items()}


def unpack(packed: dict[str, list]) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(bytes(data), dtype=np.float32).reshape(rows, cols)
            for name, (rows, cols, data) in packed.items()}
