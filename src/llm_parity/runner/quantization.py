"""A quantized candidate's two questions (docs/quantized-ports.md).

1. The port: the candidate against the float32 run of its *own* quantized weights
   (engines/quantized.py), with the bf16 run of the same weights as its floor. This is
   the ordinary precision run, with the quantized checkpoint as the reference's model: a
   correct quantized port sits near 1x that floor, whatever the quantization costs.
2. The quantization: the float32 run of the quantized weights against the float32 run of
   the unquantized original (`--model`), on the first token and on greedy decoding, with
   the `[quantization]` gates of thresholds.toml: what the quantization costs.

A quantized checkpoint with no unquantized original (`--model` itself quantized) judges the
port alone and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from llm_parity.compare.precision import PrecisionResult, compare_decodes, compare_prompts, judge
from llm_parity.engines.quantized import Scheme, read_scheme
from llm_parity.runner.models import ResolvedModel


@dataclass
class QuantizationRun:
    """What a quantized candidate's run found besides the port's own verdict."""

    scheme: Scheme
    checkpoint: str  # the quantized checkpoint both questions read
    original: ResolvedModel | None  # the unquantized --model, when there is one
    result: PrecisionResult | None = None  # the quantization question, judged
    reason: str = ""  # why the quantization question was not asked
    timings: dict[str, float] = field(default_factory=dict)
    # The port's gates with an absolute bound, left out (see port_thresholds).
    left_out: tuple[str, ...] = ()
    # The floor-relative gates whose bound [quantization.port_bounds] replaced: {name: bound}.
    bounds: dict[str, float] = field(default_factory=dict)

    def port_thresholds(self, thresholds: Any) -> Any:
        """The port's gates for a quantized candidate: those read against the noise floor.
        An absolute bound was set for bf16 rounding; rounding the activations to int8 in
        bf16 moves them more than that (SmolLM2 W8A8: mean first-token KL 0.045 between
        the float32 and bf16 runs of the same quantized weights, 4x the bf16 bound), so
        only the ratio to that floor tells a port bug from the quantization's own noise."""
        bounds = dict(thresholds.quantized_port_bounds)
        kept = replace(thresholds,
                       gates=tuple(replace(g, threshold=bounds.get(g.name, g.threshold))
                                   for g in thresholds.gates if g.relative_to),
                       prompt_gates=tuple(g for g in thresholds.prompt_gates if g.relative_to))
        self.left_out = tuple(dict.fromkeys(
            g.name for g in (*thresholds.gates, *thresholds.prompt_gates) if not g.relative_to))
        self.bounds = {g.name: g.threshold for g in kept.gates if g.name in bounds}
        return kept

    @property
    def passed(self) -> bool:
        return self.result is None or self.result.passed

    def as_dict(self) -> dict[str, Any]:
        """The quantization question's block of the verdict."""
        out: dict[str, Any] = {
            "judged": self.result is not None, "reason": self.reason or None,
            "checkpoint": self.checkpoint,
            "original": str(self.original.path) if self.original else None,
        }
        if self.result is not None:
            out["verdict"] = "pass" if self.result.passed else "fail"
            out["gates"] = [{**r.as_dict(), "over": r.gate.over}
                            for r in self.result.gate_results]
            out["failed_gates"] = [r.gate.name for r in self.result.gate_results
                                   if not r.passed]
            out["not_judged"] = [n.as_dict() for n in self.result.not_judged]
            out["aggregate"] = self.result.aggregate()
        return out


def plan(reference: ResolvedModel, candidate: ResolvedModel
         ) -> tuple[ResolvedModel, QuantizationRun | None]:
    """(the reference's model, the quantization run or None). A quantized candidate
    beside an unquantized --model makes the candidate's checkpoint the reference's (the
    port question) and the --model the original (the quantization question)."""
    scheme = read_scheme(candidate.path)
    if scheme is None:
        return reference, None
    if read_scheme(reference.path) is not None:
        return reference, QuantizationRun(
            scheme, str(candidate.path), None,
            reason=f"--model {reference.name} is quantized too: no unquantized original to "
                   "measure the quantization against; the port is judged alone")
    return candidate, QuantizationRun(scheme, str(candidate.path), reference)


def ask(quant: QuantizationRun, settings: Any, run_engine: Any, reference_spec: Any,
        tokenizer: Any, token_ids: list[list[int]], depth: Any, k: int,
        quantized: dict[str, Any], thresholds: Any, store_for: Any) -> None:
    """The quantization question: the original's float32 answers against `quantized` (the
    port reference's, first token and greedy continuation), judged by the quantization
    gates. `run_engine` is the precision run's own engine runner; `store_for(spec)` gives
    the (store, key) the original's answers are kept in, (None, None) without a store."""
    if quant.original is None:
        return
    if not thresholds.quantization_gates:
        quant.reason = "the thresholds file has no [quantization.gates]"
        return
    spec = replace(reference_spec, model=str(quant.original.path),
                   role="original (hf, unquantized)")
    store, key = store_for(spec)
    if store is not None and store.exists() and not settings.reference_store_update:
        started = time.perf_counter()
        original, _ = store.load(key, k)
        quant.timings["original_store_load_s"] = time.perf_counter() - started
    else:
        original, info = run_engine("hf", spec, token_ids, depth, k, settings, quant.timings,
                                    "original")
        if store is not None:
            store.save(key, original, info)
    from llm_parity.runner.tokenization import token_text

    def decode(token: int) -> str:
        return token_text(tokenizer, token)

    def text(tokens) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=False)

    started = time.perf_counter()
    margin = thresholds.near_tie_margin
    views = {"first_token": compare_prompts(
        settings.prompts.prompts, token_ids, original["first"], quantized["first"],
        near_tie_margin=margin, k=k, decode=decode)}
    if depth:
        views["decode"] = compare_decodes(
            depth[0], depth[1], original["decoded"], quantized["decoded"],
            near_tie_margin=margin, k=k, decode=decode, text=text)
    gates = replace(thresholds, gates=thresholds.quantization_gates, prompt_gates=())
    quant.result = judge(views, gates, k=k, noise_floor=None,
                         floor_missing="the quantization is judged against its original alone",
                         depth_missing=None if depth else
                         "the depth views did not run (--continuation 0)",
                         strict=settings.strict_gates)
    quant.timings["quantization_compare_s"] = time.perf_counter() - started
