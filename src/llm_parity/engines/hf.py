"""HuggingFace Transformers engine: the float32 reference, or a candidate in any dtype.

It exposes the full vocabulary. Sequences run one at a time (no padding, so no padding
can change a result), and logits are computed only at the positions asked for, so memory
stays one vocabulary row per compared position.
"""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken, next_token_from_logits
from llm_parity.engines._torch import resolve_device, torch_dtype, transformers_dtype_kwarg
from llm_parity.engines.base import Engine, EngineSpec, Timing
from llm_parity.errors import EngineError


class HfEngine(Engine):
    backend = "hf"

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(spec.device, spec.role)
        kwargs = {transformers_dtype_kwarg(): torch_dtype(spec.dtype)}
        kwargs.update(spec.options)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.model, trust_remote_code=spec.trust_remote_code, **kwargs
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"{spec.role}: transformers cannot load {spec.model}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self._torch = torch
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def preflight(cls, spec: EngineSpec) -> None:
        resolve_device(spec.device, spec.role)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "dtype": self.spec.dtype}

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def position_logits(self, token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Float32 logits (positions x vocabulary) of the token after each given position."""
        torch = self._torch
        ids = torch.tensor([list(token_ids)], device=self.device)
        where = torch.tensor(list(positions), device=self.device)
        with torch.inference_mode():
            if self._keeps_logits:
                logits = self.model(input_ids=ids, logits_to_keep=where).logits[0]
            else:
                logits = self.model(input_ids=ids).logits[0, where]
            return logits.float().cpu().numpy()

    def next_token(self, prompts: Sequence[Sequence[int]], k: int) -> list[NextToken]:
        return [next_token_from_logits(self.position_logits(ids, [len(ids) - 1])[0], k)
                for ids in prompts]

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[NextToken]]:
        results = []
        for ids, start in zip(sequences, starts, strict=True):
            rows = self.position_logits(ids, range(start, len(ids) - 1))
            results.append([next_token_from_logits(row, k) for row in rows])
        return results

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int, k: int) -> list[Decoded]:
        """Greedy decoding with the KV cache; argmax of the float64 log-probs, EOS ignored."""
        torch = self._torch
        results = []
        for ids in prompts:
            tokens: list[int] = []
            views: list[NextToken] = []
            with torch.inference_mode():
                # Only the last position's logits: a long prompt's full logits would be
                # sequence x vocabulary.
                keep = {"logits_to_keep": 1} if self._keeps_logits else {}
                out = self.model(input_ids=torch.tensor([list(ids)], device=self.device),
                                 use_cache=True, **keep)
                for _ in range(steps):
                    view = next_token_from_logits(out.logits[0, -1].float().cpu().numpy(), k)
                    views.append(view)
                    token = int(np.argmax(view.full_logprobs))
                    tokens.append(token)
                    if len(tokens) == steps:
                        break
                    out = self.model(
                        input_ids=torch.tensor([[token]], device=self.device),
                        past_key_values=out.past_key_values,
                        use_cache=True,
                    )
            results.append(Decoded(tokens, views))
        return results

    def generate_timed(self, prompts: Sequence[Sequence[int]], output_len: int) -> list[Timing]:
        """Greedy decoding with the KV cache, one prompt after another, timed per token.

        Reading each token back to the host (int(...)) waits for the device, so the
        timestamps are when each token really existed.
        """
        torch = self._torch
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
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
        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

