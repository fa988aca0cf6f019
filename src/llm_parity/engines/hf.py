"""HuggingFace Transformers engine: the float32 reference, or a candidate in any dtype.

It exposes the full vocabulary, and computes logits only at the positions asked for, so
memory stays one float32 vocabulary row per compared position (compare/answers.py).

Prompts run in batches of `spec.batch` (left-padded, with the attention mask and each
row's own positions): every decoding step streams the weights once for the whole batch
instead of once per prompt. The batches are cut from the list in order, in groups of
`batch` from its start, so a list cut at multiples of `batch` (shards, xdist workers:
golden.shard_range) is computed in the very batches the whole list is, bit for bit. How
far a batch moves a float32 logit from the one-prompt path is measured in
docs/notes/batching.md and bounded by tests/test_batching.py.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken, next_token_from_logits
from llm_parity.engines._torch import (
    release_memory,
    resolve_device,
    torch_dtype,
    transformers_dtype_kwarg,
)
from llm_parity.engines.base import Engine, EngineSpec, Timing
from llm_parity.engines.progress import advance, announce, settle
from llm_parity.engines.quantized import load_emulated, read_scheme
from llm_parity.errors import EngineError

# The most bytes of float32 logits one batched call may hold, and the most padded tokens it
# may run at once (a long prompt's attention and activations grow with both): a batch is cut
# smaller past either.
LOGIT_BUDGET = 512 * 2**20
TOKEN_BUDGET = 4096

# Placement targets that are not devices (accelerate's memory tiers).
TIERS = ("cpu", "disk")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _pads(config: Any) -> bool:
    """Whether this Transformers release decodes the model left-padded. Before 5, a model
    with sliding-window layers builds its cache as long as the prefill and refuses the
    padding mask growing with each step (4.51's Gemma 3): it decodes one prompt at a time."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return True
    text = getattr(config, "text_config", None) or config
    return not (getattr(text, "sliding_window", None)
                and getattr(text, "use_sliding_window", True) is not False)


def _input_device(placement: dict[str, str]) -> str | None:
    for where in placement.values():
        if where not in TIERS:
            return where if not where.isdigit() else f"cuda:{where}"
    return "cpu" if placement else None


def check_placement(options: dict[str, Any], role: str) -> None:
    """device_map and max_memory name only devices that exist here; said before any model
    loads. Integers and cuda:N are CUDA devices, npu:N Ascend ones."""
    import torch

    from llm_parity.engines._torch import npu_available

    named: list[tuple[str, Any]] = []
    device_map = options.get("device_map")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS and device_map.split(":")[0] not in (
                "cpu", "cuda", "npu", "xpu"):
            raise EngineError(f"{role}: device_map {device_map!r}: expected one of "
                              f"{', '.join(DEVICE_MAPS)}, a device, or a table of module -> "
                              "device")
        if device_map not in DEVICE_MAPS:
            named.append(("device_map", device_map))
    elif isinstance(device_map, dict):
        named += [(f"device_map[{module!r}]", where) for module, where in device_map.items()]
    elif device_map is not None:
        raise EngineError(f"{role}: device_map must be a name or a table, got {device_map!r}")
    max_memory = options.get("max_memory")
    if max_memory is not None:
        if not isinstance(max_memory, dict):
            raise EngineError(f"{role}: max_memory must be a table of device -> size, e.g. "
                              f'{{"cpu": "8GiB", "0": "70GiB"}}, got {max_memory!r}')
        named += [(f"max_memory key {key!r}", key) for key in max_memory]
        if device_map is None:
            raise EngineError(f"{role}: max_memory needs device_map (e.g. device_map=auto) "
                              "to place the layers by it")
    for where_named, where in named:
        text = str(where)
        if text in TIERS:
            continue
        base, _, index = text.partition(":")
        if text.isdigit():
            base, index = "cuda", text
        count = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "npu": _npu_count() if npu_available() else 0}.get(base)
        if count is None:
            raise EngineError(f"{role}: {where_named} names {where!r}, which is not a device: "
                              "expected cpu, disk, an index, cuda:N or npu:N")
        if int(index or 0) >= count:
            raise EngineError(f"{role}: {where_named} names {where!r}, but this machine has "
                              f"{count} {base} device{'s' if count != 1 else ''}")


def _npu_count() -> int:
    import torch

    return int(torch.npu.device_count())  # type: ignore[attr-defined]


class HfEngine(Engine):
    backend = "hf"
    # from_pretrained's loading and placement arguments; anything else it would take as a
    # config override, changing the model under test.
    known_options = ("device_map", "max_memory", "offload_folder", "offload_state_dict",
                     "offload_buffers", "attn_implementation", "low_cpu_mem_usage",
                     "revision", "subfolder", "variant", "use_safetensors",
                     "local_files_only", "gguf_file")

    @classmethod
    def compute_device(cls, spec: EngineSpec) -> str:
        """Where the model computes, as a golden key records it: the device `auto` resolves
        to, or under a device_map the devices it may place layers on."""
        device_map = spec.options.get("device_map")
        if device_map is None:
            return resolve_device(spec.device, spec.role)
        if isinstance(device_map, dict):
            named = {str(v) for v in device_map.values()} - {"disk"}
            targets = sorted(f"cuda:{t}" if t.isdigit() else t for t in named)
        elif device_map in DEVICE_MAPS:
            targets = sorted({resolve_device("auto", spec.role), "cpu"})
        else:
            targets = [str(device_map)]
        return "device_map:" + ",".join(targets)

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(spec.device, spec.role)
        kwargs = {transformers_dtype_kwarg(): torch_dtype(spec.dtype)}
        kwargs.update(copy.deepcopy(spec.options))  # from_pretrained rewrites max_memory
        # A quantized checkpoint is run as its scheme says (engines/quantized.py), never
        # through whatever kernel an installed quantization library would pick.
        self.scheme = read_scheme(Path(spec.model)) if Path(spec.model).is_dir() else None
        try:
            if self.scheme is not None:
                if "device_map" in spec.options:
                    raise EngineError(f"{spec.role}: a quantized checkpoint is run on one "
                                      "device; drop device_map")
                model = load_emulated(spec.model, self.scheme, torch_dtype(spec.dtype),
                                      spec.trust_remote_code, transformers_dtype_kwarg())
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    spec.model, trust_remote_code=spec.trust_remote_code, **kwargs
                )
        except (OSError, ValueError, ImportError) as exc:
            raise EngineError(f"{spec.role}: transformers cannot load {spec.model}: {exc}") from exc
        if "device_map" in spec.options:
            # Accelerate placed the layers (devices, CPU memory, disk) and moves activations
            # between them; inputs go where the first layer is.
            self.placement = {str(k): str(v) for k, v in
                              (getattr(model, "hf_device_map", None) or {}).items()}
            self.model = model.eval()
            self.device = _input_device(self.placement) or self.device
        else:
            self.placement = {}
            self.model = model.to(self.device).eval()
        self._torch = torch
        self.batch = max(1, int(spec.batch)) if _pads(model.config) else 1
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def preflight(cls, spec: EngineSpec) -> str:
        device = resolve_device(spec.device, spec.role)
        check_placement(spec.options, spec.role)
        return device

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.backend, "device": self.device,
                                "dtype": self.spec.dtype}
        if self.spec.options:
            info["options"] = {k: v for k, v in self.spec.options.items()}
        if self.scheme is not None:
            info["quantization"] = {**self.scheme.describe(), "run_as": (
                "weights dequantized, activations rounded as the scheme says")}
        if self.placement:
            counts: dict[str, int] = {}
            for where in self.placement.values():
                counts[where] = counts.get(where, 0) + 1
            info["placement"] = counts  # modules per device, "disk" for offloaded ones
        return info

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _groups(self, widths: Sequence[int], rows: int = 1) -> list[range]:
        """The batches of a list whose prompts have these lengths: cells of `batch`
        consecutive prompts from its start, each cut into equal runs of a divisor of
        `batch` when its logits (`rows` a prompt) would pass LOGIT_BUDGET bytes or its
        padded tokens TOKEN_BUDGET. A cell is cut by its own prompts alone, so a list cut
        at multiples of `batch` is computed in the same batches as the whole."""
        groups: list[range] = []
        for start in range(0, len(widths), self.batch):
            cell = range(start, min(start + self.batch, len(widths)))
            widest = max(widths[i] for i in cell)
            size = self.batch
            while size > 1 and (size * rows * self.vocab_size * 4 > LOGIT_BUDGET
                                or size * widest > TOKEN_BUDGET):
                size = next(d for d in range(size - 1, 0, -1) if self.batch % d == 0)
            groups += [range(i, min(i + size, cell.stop)) for i in range(start, cell.stop, size)]
        return groups

    def _padded(self, rows: Sequence[Sequence[int]]):
        """Left-padded token ids, the attention mask and each row's positions (as its own
        sequence alone would number them)."""
        torch = self._torch
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward(self, rows: Sequence[Sequence[int]], keep: int, **kwargs):
        """One batched forward pass; the logits of the last `keep` columns."""
        if len({len(r) for r in rows}) == 1:  # no padding: one prompt's path, unchanged
            ids = self._torch.tensor([list(r) for r in rows], device=self.device)
            out = self.model(input_ids=ids, **self._keep(keep), **kwargs)
            return out, None, None
        ids, mask, positions = self._padded(rows)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **self._keep(keep), **kwargs)
        return out, mask, positions

    def _keep(self, keep: int) -> dict[str, Any]:
        return {"logits_to_keep": keep} if self._keeps_logits else {}

    def next_token(self, prompts: Sequence[Sequence[int]], k: int) -> list[NextToken]:
        announce(f"{self.spec.role}: scoring {len(prompts)} prompts", len(prompts))
        results: list[NextToken] = []
        with self._torch.inference_mode():
            for group in self._groups([len(ids) for ids in prompts]):
                out = self._forward([prompts[i] for i in group], 1)[0]
                logits = out.logits[:, -1].float().cpu().numpy()
                del out
                results += [next_token_from_logits(row.copy(), k) for row in logits]
                advance(len(group))
        return results

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[NextToken]]:
        """The views after each position from `start` to the one before the last (teacher
        forced). Rows are right-aligned, so every sequence's positions are among the last
        columns."""
        announce(f"{self.spec.role}: scoring {len(sequences)} sequences", len(sequences),
                 "sequences")
        wanted = [len(ids) - 1 - start for ids, start in zip(sequences, starts, strict=True)]
        results: list[list[NextToken]] = []
        with self._torch.inference_mode():
            for group in self._groups([len(ids) for ids in sequences], max(wanted, default=1)):
                keep = max(wanted[i] for i in group) + 1
                out = self._forward([sequences[i] for i in group], keep)[0]
                logits = out.logits[:, -keep:].float().cpu().numpy()
                del out
                for row, i in enumerate(group):
                    span = logits[row, keep - 1 - wanted[i]:keep - 1]
                    results.append([next_token_from_logits(r.copy(), k) for r in span])
                advance(len(group))
        return results

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int, k: int) -> list[Decoded]:
        """Greedy decoding with the KV cache, EOS ignored; each token is the argmax of the
        float32 logits, which is the float64 log-probs' (without computing them again)."""
        announce(f"{self.spec.role}: decoding {len(prompts)} prompts", len(prompts) * steps,
                 "tokens")
        torch = self._torch
        results: list[Decoded] = []
        for group in self._groups([len(ids) + steps for ids in prompts]):
            rows = [prompts[i] for i in group]
            tokens: list[list[int]] = [[] for _ in rows]
            views: list[list[NextToken]] = [[] for _ in rows]
            with torch.inference_mode():
                # Only the last position's logits: a long prompt's full logits would be
                # sequence x vocabulary.
                out, mask, positions = self._forward(rows, 1, use_cache=True)
                for _ in range(steps):
                    # Rows of their own: a view would keep the whole step's logits alive.
                    logits = out.logits[:, -1].float().cpu().numpy()
                    chosen = []
                    for i, row in enumerate(logits):
                        views[i].append(next_token_from_logits(row.copy(), k))
                        chosen.append(int(np.argmax(row)))
                        tokens[i].append(chosen[-1])
                    advance(len(rows))
                    if len(tokens[0]) == steps:
                        break
                    step = torch.tensor([[t] for t in chosen], device=self.device)
                    if mask is None:
                        out = self.model(input_ids=step, past_key_values=out.past_key_values,
                                         use_cache=True)
                        continue
                    mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
                    positions = positions[:, -1:] + 1
                    out = self.model(input_ids=step, attention_mask=mask,
                                     position_ids=positions,
                                     past_key_values=out.past_key_values, use_cache=True)
            results += [Decoded(t, v) for t, v in zip(tokens, views)]
        return results

    @classmethod
    def capture_options(cls, options: dict[str, Any]) -> dict[str, Any] | None:
        return dict(options)

    def capture(self, token_ids: Sequence[int], positions: Sequence[int]) -> dict[str, Any]:
        from llm_parity.engines.capture import Recorder

        recorder = Recorder(self.model, positions, fused_residual=False)
        keep = self._keep(1)
        try:
            with self._torch.inference_mode():
                self.model(input_ids=self._torch.tensor([list(token_ids)], device=self.device),
                           **keep)
        finally:
            recorder.remove()
        return recorder.result()

    def generate_timed(self, prompts: Sequence[Sequence[int]], output_len: int) -> list[Timing]:
        """Greedy decoding with the KV cache, one prompt after another, timed per token.

        Reading each token back to the host (int(...)) waits for the device, so the
        timestamps are when each token really existed.
        """
        torch = self._torch
        keep = self._keep(1)
        timings = []
        for ids in prompts:
            with torch.inference_mode():
                started = time.perf_counter()
                out = self.model(input_ids=torch.tensor([list(ids)], device=self.device),
                                 use_cache=True, **keep)
                token = int(out.logits[0, -1].argmax())
                first = time.perf_counter()
                tokens = 1
                while tokens < output_len:
                    out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                     past_key_values=out.past_key_values, use_cache=True)
                    token = int(out.logits[0, -1].argmax())
                    tokens += 1
                last = time.perf_counter()
            timings.append(Timing(prompt_tokens=len(ids), output_tokens=tokens,
                                  latency_s=last - started, ttft_s=first - started,
                                  decode_s=last - first))
        return timings

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        settle()
        release_memory()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

