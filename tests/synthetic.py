"""Made-up runs for the report, schema and compare tests: a ParitySession whose Run holds
comparisons of small random distributions, built through the real comparison code and
no engine, so tests of the outputs take milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.compare.precision import (
    compare_decodes,
    compare_prompts,
    compare_sequences,
    judge,
)
from llm_parity.config.options import Settings
from llm_parity.config.prompts import Prompt, PromptSet
from llm_parity.config.thresholds import load_thresholds, packaged_thresholds_path
from llm_parity.runner.models import ResolvedModel
from llm_parity.runner.precision import Run
from llm_parity.runner.session import ParitySession

VOCAB = 64
K = 8


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _views(rng: np.random.Generator, noise: float, swap: float | None = None):
    """(reference, candidate) NextTokens; ``swap`` lifts the candidate's rank-2 token above
    its rank-1 by that much (a top-1 flip), with the reference's own margin left as drawn."""
    logits = rng.normal(0.0, 3.0, VOCAB)
    reference = _log_softmax(logits)
    cand_logits = logits + rng.normal(0.0, noise, VOCAB)
    if swap is not None:
        first, second = np.argsort(-cand_logits)[:2]
        cand_logits[second] = cand_logits[first] + swap
    candidate = _log_softmax(cand_logits)
    top = np.argsort(-candidate)[:K]
    ref_top = np.argsort(-reference)[:K]
    return (NextToken(ref_top, reference[ref_top], reference),
            NextToken(top, candidate[top], candidate))


def _near_tie_views(rng: np.random.Generator):
    """A reference whose rank-1 and rank-2 are 0.01 apart, and a candidate that swaps them."""
    logits = rng.normal(0.0, 3.0, VOCAB)
    order = np.argsort(-logits)
    logits[order[1]] = logits[order[0]] - 0.01
    reference = _log_softmax(logits)
    cand_logits = logits.copy()
    cand_logits[order[1]] = logits[order[0]] + 0.01
    candidate = _log_softmax(cand_logits)
    top = np.argsort(-candidate)[:K]
    ref_top = np.argsort(-reference)[:K]
    return (NextToken(ref_top, reference[ref_top], reference),
            NextToken(top, candidate[top], candidate))


def make_session(
    *,
    prompts: int = 6,
    noise: float = 0.02,
    defect_prompts: tuple[int, ...] = (),
    near_tie_prompts: tuple[int, ...] = (),
    steps: int = 0,
    diverge: dict[int, int] | None = None,
    seed: int = 0,
    thresholds: Path | None = None,
    model: str = "made-up/model",
) -> ParitySession:
    """A finished session. ``defect_prompts`` flip top-1 where the reference was sure;
    ``steps`` > 0 adds teacher-forced and free-running views of that many steps, and
    ``diverge`` {prompt index: step} makes free-running decoding diverge there."""
    rng = np.random.default_rng(seed)
    prompt_list = tuple(Prompt(f"p-{i:02d}", f"Q{i}: *retrieval* | `RAG`?")
                        for i in range(prompts))
    prompt_set = PromptSet("made-up", "<test>", prompt_list)
    path = thresholds or packaged_thresholds_path()
    gates = load_thresholds(path, platform="cpu", model=model)
    settings = Settings(
        model=model, candidate="hf", candidate_model=None, candidate_dtype="bfloat16",
        reference_dtype="float32", candidate_device="cpu", reference_device="cpu",
        thresholds_path=Path(path), prompts=prompt_set, logprobs=K, parity_json=None,
        parity_reports=(), continuation=steps,
    )
    token_ids = [list(range(1, 5 + i)) for i in range(prompts)]
    reference, candidate = [], []
    for i in range(prompts):
        if i in near_tie_prompts:
            ref, cand = _near_tie_views(rng)
        else:
            ref, cand = _views(rng, noise, swap=2.0 if i in defect_prompts else None)
        reference.append(ref)
        candidate.append(cand)
    decode = lambda token: repr(f"t{token}")  # noqa: E731
    margin = gates.near_tie_margin
    views = {"first_token": compare_prompts(prompt_list, token_ids, reference, candidate,
                                            near_tie_margin=margin, k=K, decode=decode)}
    if steps:
        ref_decoded, cand_scored, cand_decoded = [], [], []
        for i in range(prompts):
            pairs = [_views(rng, noise) for _ in range(steps)]
            ref_steps = [r for r, _ in pairs]
            cand_steps = [c for _, c in pairs]
            ref_tokens = [int(r.token_ids[0]) for r in ref_steps]
            cand_tokens = list(ref_tokens)
            at = (diverge or {}).get(i)
            if at is not None:
                cand_tokens[at] = int(cand_steps[at].token_ids[1])
            ref_decoded.append(Decoded(ref_tokens, ref_steps))
            cand_scored.append(cand_steps)
            cand_decoded.append(Decoded(cand_tokens, cand_steps))
        views["sequence"] = compare_sequences(prompt_list, token_ids, ref_decoded, cand_scored,
                                              near_tie_margin=margin, k=K, decode=decode)
        views["decode"] = compare_decodes(prompt_list, token_ids, ref_decoded, cand_decoded,
                                          near_tie_margin=margin, k=K, decode=decode,
                                          text=lambda ids: " ".join(map(str, ids)))
    precision = judge(views, gates, k=K, floor_missing="no floor in made-up runs",
                      depth_missing=None if steps else "no depth in made-up runs")
    resolved = ResolvedModel(model, Path("/nonexistent/checkpoint"), "local")
    session = ParitySession(settings)
    session.run = Run(
        reference_model=resolved, candidate_model=resolved,
        candidate={"backend": "hf", "device": "cpu", "dtype": "bfloat16"},
        reference={"backend": "hf", "device": "cpu", "dtype": "float32"},
        thresholds=gates, precision=precision, token_ids=token_ids,
        timings={"prepare_s": 0.5, "compare_s": 0.1},
        card={"architecture": "LlamaForCausalLM", "model_type": "llama", "layers": 2,
              "hidden_size": 32, "attention_heads": 4, "kv_heads": 2, "vocab_size": VOCAB,
              "max_position_embeddings": 128, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "weight_dtype": "bfloat16",
              "weight_files": ["model.safetensors"], "weight_bytes": 123456,
              "parameters": 61728, "tensors": 20},
    )
    session.environment.update({
        "python": "3.11.7", "platform": "Linux", "llm_parity": "0.1.0", "torch": "2.5.0",
        "transformers": "4.51.0", "vllm": None, "vllm_ascend": None, "torch_npu": None,
        "cann": None, "device": "cpu", "device_name": "Made-up CPU", "model": model,
        "model_path": "/nonexistent/checkpoint", "model_source": "local", "parameters": 61728,
        "checkpoint_sha256": "0" * 64,
    })
    session.attempted = True
    return session


def failed_session(message: str = "the candidate engine died") -> ParitySession:
    """A session whose run raised before anything was compared."""
    session = make_session()
    session.run = None
    session.error = RuntimeError(message)
    session.environment.clear()
    return session


def performance_block(*, compiled_tpot: float = 14.0, gate_passes: bool = True) -> dict:
    """The documented shape of a verdict's "performance" block."""
    cases = []
    for mode, input_len, output_len, tpot in (
        ("eager", 16, 100, 26.0), ("eager", 32, 100, 26.5), ("compiled", 16, 50, compiled_tpot),
        ("compiled", 32, 50, compiled_tpot + 0.4), ("reference", 16, 100, 80.0),
    ):
        cases.append({
            "key": f"{mode}-in{input_len}-out{output_len}", "mode": mode,
            "input_len": input_len, "output_len": output_len, "rounds": 3,
            "ttft_ms": 20.0 + input_len / 4, "tpot_ms": tpot, "tpot_ms_min": tpot * 0.97,
            "tpot_ms_max": tpot * 1.04, "tpot_ms_cv": 0.02,
            "latency_ms": 20.0 + tpot * output_len,
            "throughput_tok_s": output_len / ((20.0 + tpot * output_len) / 1000),
        })
    speedup = 26.0 / compiled_tpot
    gates = [{"name": "compiled_speedup", "metric": "speedup", "aggregate": "min",
              "bound": "min", "threshold": 1.5, "value": speedup,
              "passed": gate_passes and speedup >= 1.5, "scope": "performance"}]
    return {"cases": cases, "gates": gates}


def views_of(precision) -> dict:
    return {"first_token": precision.prompts, "sequence": precision.sequences,
            "decode": precision.decodes}


def rejudge(session: ParitySession, thresholds=None, noise_floor=None):
    """Judge a made-up run again, as the runner does once: new thresholds or a floor."""
    run = session.run
    run.thresholds = thresholds or run.thresholds
    run.precision = judge(
        views_of(run.precision), run.thresholds, k=run.precision.k, noise_floor=noise_floor,
        floor_missing="no floor was given",
        depth_missing=None if run.precision.sequences else "no depth in made-up runs")
    return run.precision


def floor_of(session: ParitySession):
    """A noise floor made from another made-up run's compared views."""
    from llm_parity.compare.noise_floor import NoiseFloor

    return NoiseFloor.from_views(views_of(session.run.precision), k=session.run.precision.k,
                                 dtype="bfloat16", device="cpu")


def render_report(session: ParitySession, suffix: str) -> str:
    from llm_parity.report.document import render_verdict
    from llm_parity.report.verdict import full_verdict

    return render_verdict(full_verdict(session), suffix, generated="2026-01-01 00:00 UTC")


def write_session_outputs(session: ParitySession, perf_run=None) -> dict:
    from llm_parity.report.outputs import write_outputs
    from llm_parity.report.verdict import full_verdict

    data = full_verdict(session, perf_run)
    write_outputs(data, session.settings.parity_json, session.settings.parity_reports)
    return data


def configured_session(others: dict | None = None, errors: dict | None = None,
                       steps: int = 4, **base) -> ParitySession:
    """A made-up run judged in several candidate configurations: the base ("eager") is
    `make_session(**base)`; `others` maps a configuration name to make_session keywords
    (its own made-up candidate), `errors` a name to why it could not run."""
    from llm_parity.config.configurations import Configuration
    from llm_parity.runner.precision import ConfigurationRun

    session = make_session(steps=steps, **base)
    run = session.run

    def entry(name, args, precision, error=None):
        configuration = Configuration(name, "vllm", args, runs=2 if name == "prefix" else 1)
        candidate = {} if precision is None else {**run.candidate,
                                                  "engine_args": dict(args)}
        return ConfigurationRun(configuration, candidate, precision, error)

    entries = [entry("eager", {"enforce_eager": True}, run.precision)]
    for name, kwargs in (others or {}).items():
        other = make_session(steps=steps, **{**base, **kwargs}).run.precision
        entries.append(entry(name, {"enforce_eager": name == "eager"}, other))
    for name, why in (errors or {}).items():
        entries.append(entry(name, {"enforce_eager": True, "block_size": 16}, None, why))
    run.configurations = tuple(entries)
    return session
