"""The one small interface every engine answers, and the registry of backends by name.

Engines are the only code that touches torch or an inference engine. They take token ids
and return plain numpy arrays, so the metrics never know which engine produced them.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.errors import EngineError

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "npu", "xpu")



@dataclass(frozen=True)
class EngineSpec:
    """What to build: a resolved checkpoint directory and how to run it."""

    model: str  # a local directory (hub ids are resolved before an engine is built)
    dtype: str = "bfloat16"
    device: str = "auto"
    tokenizer: str | None = None  # defaults to the model directory
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    logprobs: int = 20  # the most top-k log-probs this run will ask for
    batch: int = 1  # prompts computed at once, where the backend batches (hf)
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific extras
    role: str = "candidate"  # "reference" or "candidate", for messages
    name: str | None = None  # the checkpoint as the user named it (hub id, path)
    url: str | None = None  # a served candidate's base URL (openai backend)
    api_key_env: str | None = None  # variable holding its API key (never the key)


def same_engine(a: EngineSpec, b: EngineSpec) -> bool:
    """Whether two specs build the same engine (roles and names aside): one built for the
    precision run can then serve the performance run."""
    return ((a.model, a.tokenizer or a.model, a.dtype, a.device, a.trust_remote_code,
             a.tensor_parallel_size, a.logprobs, a.url, dict(a.options))
            == (b.model, b.tokenizer or b.model, b.dtype, b.device, b.trust_remote_code,
                b.tensor_parallel_size, b.logprobs, b.url, dict(b.options)))


@dataclass(frozen=True)
class Timing:
    """How long one generation request took, in seconds.

    `latency_s` is the caller's wall clock around the whole call. `ttft_s` (arrival to first
    token) and `decode_s` (first token to last token) come from the engine's own timestamps,
    and are None where the engine keeps none.
    """

    prompt_tokens: int
    output_tokens: int
    latency_s: float
    ttft_s: float | None = None
    decode_s: float | None = None


# Engine arguments that would change what the run tests behind the verdict's back (the
# verdict, the noise floor and the golden key record the suite's own option instead).
SUITE_OWNED: dict[str, str] = {
    "model": "--model or --candidate-model",
    "tokenizer": "--model or --candidate-model (the reference's tokenizer is the run's)",
    "dtype": "the dtype option",
    "torch_dtype": "the dtype option",
    "tensor_parallel_size": "--tensor-parallel-size",
    "trust_remote_code": "--trust-remote-code",
}


class Engine(abc.ABC):
    """A built engine. Subclasses register a backend name with `register`."""

    backend: ClassVar[str]
    # The constructor options this backend reads, or None where any may be given (vLLM's
    # are checked against its EngineArgs in preflight, which imports vLLM).
    known_options: ClassVar[tuple[str, ...] | None] = None
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    @classmethod
    def check_options(cls, options: dict[str, Any], flag: str,
                      dtype_flag: str = "--candidate-dtype") -> None:
        """Without importing anything heavy: no option the suite owns, and none this backend
        does not read. `flag` names where the options came from, for the message."""
        for key in options:
            if key in SUITE_OWNED:
                owner = SUITE_OWNED[key].replace("the dtype option", dtype_flag)
                raise EngineError(f"{flag}: {key!r} changes what this run tests while the "
                                  f"verdict, the noise floor and any golden store would still "
                                  f"describe the suite's own setting; use {owner}")
        if cls.known_options is not None:
            unknown = sorted(set(options) - set(cls.known_options))
            if unknown:
                raise EngineError(f"{flag}: {unknown[0]!r} is not an option of the "
                                  f"{cls.backend} backend; it reads: "
                                  f"{', '.join(cls.known_options)}")

    @classmethod
    def starts_apart(cls) -> bool:
        """Whether its start runs in processes of its own (vLLM's engine core compiles
        there), so the reference can compute beside it (runner/beside.py)."""
        return False

    @classmethod
    def preflight(cls, spec: EngineSpec) -> str | None:
        """Cheap checks (is the asked device here?) run before any model is loaded; the
        device the engine will compute on, where it knows it."""

    @abc.abstractmethod
    def next_token(self, prompts: Sequence[Sequence[int]], k: int) -> list[NextToken]:
        """Score the token after each prompt; all prompts in one call."""

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[NextToken]]:
        """Teacher-forced: for each sequence, the next-token view at every position from its
        start to the second-to-last token (the prefill path), all sequences in one call."""
        raise EngineError(f"the {self.backend} backend cannot score whole sequences")

    def greedy(
        self, prompts: Sequence[Sequence[int]], steps: int, k: int
    ) -> list[Decoded]:
        """Free-running: greedy decoding of `steps` tokens (end-of-sequence ignored), with the
        next-token view at every step (the decode path: KV cache, decode kernels)."""
        raise EngineError(f"the {self.backend} backend cannot decode")

    @classmethod
    def capture_options(cls, options: dict[str, Any]) -> dict[str, Any] | None:
        """Constructor options of an engine like one built with `options` whose layers can
        be captured, or None where this backend cannot capture (a served candidate)."""
        return None

    def capture(self, token_ids: Sequence[int], positions: Sequence[int]) -> dict[str, Any]:
        """Every layer's output (engines/capture.py names the points) at the given positions
        of one sequence, as float32 arrays (positions x hidden): what localization compares."""
        raise EngineError(f"the {self.backend} backend cannot capture layer outputs")

    @classmethod
    def benchmark_options(cls, mode: str) -> dict[str, Any] | None:
        """Constructor options for an execution mode ("eager" or "compiled") in a benchmark,
        or None when this backend has no such mode."""
        return {} if mode == "eager" else None

    def generate_timed(self, prompts: Sequence[Sequence[int]], output_len: int) -> list[Timing]:
        """Greedy generation of exactly `output_len` tokens per prompt (end-of-sequence
        ignored), all prompts in one call, timed."""
        raise EngineError(f"the {self.backend} backend cannot time generation")

    def check_tokenization(self, prompts: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """(prompt id, text, reference ids): an engine with a tokenizer of its own (a server)
        confirms it turns each text into the same ids. Engines fed ids only have nothing to do."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """backend, device, dtype and anything else worth recording about this engine."""

    def close(self) -> None:
        """Release memory and any processes; the engine is unusable afterwards."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Backends are found through this entry-point group: a new backend is one module with an
# Engine subclass plus one entry point (name = "package.module:Class"), as in
# lm-evaluation-harness; nothing here is edited. The built-in ones are also listed here, for
# a source tree used without installing it.
ENTRY_POINT_GROUP = "llm_parity.engines"
_BUILTIN: dict[str, str] = {
    "hf": "llm_parity.engines.hf:HfEngine",
    "vllm": "llm_parity.engines.vllm:VllmEngine",
    "openai": "llm_parity.engines.openai:OpenAIEngine",
}
_REGISTERED: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Add a backend at run time: `target` is "package.module:Class" of an Engine subclass."""
    _REGISTERED[name] = target


def _registry() -> dict[str, str]:
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**_BUILTIN, **found, **_REGISTERED}


def backends() -> tuple[str, ...]:
    return tuple(_registry())


def engine_class(name: str) -> type[Engine]:
    registry = _registry()
    try:
        target = registry[name]
    except KeyError:
        raise EngineError(
            f"unknown candidate backend {name!r}; expected one of: {', '.join(registry)}, auto"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve_candidate_backend(name: str) -> str:
    """`auto` is vllm where it imports, else hf; any other name is itself."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def build_engine(backend: str, spec: EngineSpec) -> Engine:
    from llm_parity.engines.progress import announce

    announce(f"{spec.role}: starting")
    return engine_class(backend)(spec)


