"""A stand-in candidate backend that only generates, at a speed its options set.

It sleeps a fixed time per token, so the performance gates can be driven end to end in
seconds: a compiled mode twice as fast as eager, a slowdown for regression tracking, an
engine that keeps no timestamps. It also refuses to exist twice at once.
"""

from __future__ import annotations

import time

from llm_parity.engines.base import Engine, Timing
from llm_parity.errors import EngineError

TOKEN_S = {"eager": 0.006, "compiled": 0.002}


class PacedEngine(Engine):
    backend = "paced"
    alive = 0
    builds = 0

    @classmethod
    def preflight(cls, spec):
        return "cpu"

    @classmethod
    def benchmark_options(cls, mode):
        return {"token_s": TOKEN_S[mode]} if mode in TOKEN_S else None

    def __init__(self, spec):
        super().__init__(spec)
        PacedEngine.builds += 1
        if spec.options.get("fail_build"):
            raise EngineError("this paced engine was asked not to start")
        if PacedEngine.alive:
            raise EngineError("a paced engine was built while another was still alive")
        PacedEngine.alive += 1
        self.closed = False
        self.token_s = spec.options.get("token_s", TOKEN_S["eager"]) * spec.options.get(
            "slowdown", 1)
        self.stamps = spec.options.get("stamps", True)
        self.short_by = spec.options.get("short_by", 0)

    def next_token(self, prompts, k):
        raise EngineError("the paced engine only generates")

    def describe(self):
        return {"backend": self.backend, "device": "cpu", "dtype": self.spec.dtype}

    def generate_timed(self, prompts, output_len):
        timings = []
        for ids in prompts:
            tokens = max(1, output_len - self.short_by)
            started = time.perf_counter()
            time.sleep(self.token_s)
            first = time.perf_counter()
            for _ in range(tokens - 1):
                time.sleep(self.token_s)
            last = time.perf_counter()
            timings.append(Timing(
                prompt_tokens=len(ids), output_tokens=tokens, latency_s=last - started,
                ttft_s=first - started if self.stamps else None,
                decode_s=last - first if self.stamps else None,
            ))
        return timings

    def close(self):
        if not self.closed:
            self.closed = True
            PacedEngine.alive -= 1
