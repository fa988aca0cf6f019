"""Localization: after a precision run, the worst prompt(s) run once more through the
reference, the bf16 floor and the candidate with every layer's output captured, on the same
token ids, and compare/localize.py names the first point that leaves its floor.

Which configuration: the first that failed (with --localize always and nothing failed, the
base). Layer capture needs the modules to be called, so a vLLM configuration is localized
in eager mode (its own arguments plus enforce_eager=True); when that engine is the one the
precision run just used, it is reused rather than built again.

The same capture feeds the layer gates ([layer_gates], compare/layer_gates.py): where the
file has them, a passing run is captured too, once, and that capture is both the gates'
evidence and localization's answer. A passing run captures only an engine the precision
run already judged (the eager configuration, the Transformers candidate): a graph-only run
that passes is not given a new engine start for the gates, which are then not judged,
saying why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from llm_parity.compare.layer_gates import (
    LayerGateResult,
    LayerGates,
    LayerNotJudged,
    judge_layer_gates,
)
from llm_parity.compare.localize import Localization, earliest, localize
from llm_parity.config.options import Settings
from llm_parity.engines.base import Engine, EngineSpec, build_engine, engine_class, same_engine
from llm_parity.errors import AnswerError, EngineError
from llm_parity.runner.precision import ConfigurationRun, Run


@dataclass
class LocalizationRun:
    """What localization did: the configuration it localized, one result per prompt, or
    why it did not run."""

    mode: str
    configuration: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    results: tuple[Localization, ...] = ()
    skipped: str | None = None  # why localization did not run (it was not asked, or cannot)
    error: str | None = None  # it was asked and could not finish
    note: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    reused_engine: bool = False
    failed: bool = False  # the localized configuration failed its gates
    # Where the failure lies when it is on a path the capture did not take (the decode path,
    # a compiled graph), said instead of naming the output head.
    unseen: str = ""
    # Captured only for the layer gates: a passing run under --localize on-failure, whose
    # localization was not asked for (test_localization skips, the summary shows the gates).
    for_gates: bool = False
    layer_gates: tuple[LayerGateResult, ...] = ()
    layer_not_judged: tuple[LayerNotJudged, ...] = ()

    def judge(self, gates: LayerGates, strict: bool = False) -> None:
        """Judge the layer gates on this capture; without one, each is not judged, with
        the reason the capture did not run."""
        if self.results:
            self.layer_gates, self.layer_not_judged = judge_layer_gates(
                gates, self.results, configuration=self.configuration, strict=strict)
            return
        reason = (f"no layer capture: {self.skipped}" if self.skipped else
                  f"the layer capture could not finish: {self.error}" if self.error else
                  "no layer capture was made")
        self.layer_not_judged = tuple(LayerNotJudged(g, reason, strict) for g in gates.gates)

    @property
    def headline(self) -> Localization | None:
        """The result that names the earliest point (or the first, if none diverges)."""
        return earliest(self.results)

    def as_dict(self) -> dict[str, Any]:
        head = self.headline
        return {
            "mode": self.mode, "configuration": self.configuration,
            "engine_args": {k: v for k, v in self.engine_args.items()
                            if isinstance(v, (str, int, float, bool))},
            "ran": bool(self.results), "skipped": self.skipped, "error": self.error,
            "note": self.note, "failed": self.failed,
            "diverged": bool(head and head.diverged),
            "where": head.where if head else "", "layer": head.layer if head else None,
            "module": head.module if head else None,
            "results": [r.as_dict() for r in self.results],
            "timings": dict(self.timings), "reused_engine": self.reused_engine,
            "unseen": self.unseen, "for_gates": self.for_gates,
        }


def wanted(settings: Settings, run: Run) -> str | None:
    """None when the capture should run for this run (localization, or the layer gates on
    a passing run), else why not."""
    mode = settings.localize.mode
    if mode == "off":
        return "localization is off (--localize off)"
    gates = settings.thresholds_file.layer_gates.gates
    if mode == "on-failure" and not _failed(run) and not gates:
        return "the candidate passed (--localize always localizes a passing run too)"
    return None


def _failed(run: Run) -> list[ConfigurationRun]:
    return [c for c in run.configurations if c.precision is not None and not c.passed]


def _target(run: Run) -> ConfigurationRun:
    judged = [c for c in run.configurations if c.precision is not None]
    return next((c for c in judged if not c.passed), judged[0])


def worst_sequences(run: Run, target: ConfigurationRun, count: int,
                    first_ids: dict[str, list[int]], first_positions: int = 1,
                    ) -> list[tuple[str, str, list[int], list[int]]]:
    """(prompt id, view, token ids, positions) of the `count` worst prompts: failing ones
    first, then by mean KL over their compared positions. The teacher-forced view (the
    reference's continuation) and the first-token view; free-running decodes follow the
    candidate's own tokens and are left out. A first-token prompt is captured at its last
    `first_positions` positions, which the same prefill computes: the layer comparison
    averages over them where the output compared one."""
    assert target.precision is not None
    ranked = []
    for view in ("sequence", "first_token"):
        for result in target.precision.view(view):
            ids = run.sequences.get(result.prompt.id) if view == "sequence" else \
                first_ids.get(result.prompt.id)
            if ids is None or not result.positions:
                continue
            kl = [float(v) for v in result.values("kl")]
            positions = [p.position for p in result.positions]
            if view == "first_token":
                last = max(positions)
                positions = list(range(max(0, last + 1 - first_positions), last + 1))
            ranked.append((result.passed, -sum(kl) / len(kl), view, result.prompt.id, ids,
                           positions))
    ranked.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    return [(prompt_id, view, list(ids), positions)
            for _, _, view, prompt_id, ids, positions in ranked[:count]]


def localize_run(settings: Settings, run: Run, kept: dict[str, Any] | None = None,
                 spare: dict[str, Any] | None = None) -> LocalizationRun:
    """Localize the run's first failing configuration. `kept` holds engines the precision
    run left open for the fixtures, `spare` its last candidate engine: either is used when it
    is the engine localization would build. Neither is closed here."""
    mode = settings.localize.mode
    skipped = wanted(settings, run)
    if skipped is not None:
        return LocalizationRun(mode, skipped=skipped)
    target = _target(run)
    out = LocalizationRun(mode, configuration=target.name,
                          failed=target.precision is not None and not target.precision.passed,
                          for_gates=mode == "on-failure" and not _failed(run))
    backend = run.backend
    cls = engine_class(backend)
    options = cls.capture_options({**run.candidate_spec.options, **target.configuration.args})
    if options is None:
        out.skipped = (f"the {backend} candidate cannot be localized: its layers run in "
                       "another process (a server) that the suite cannot hook; localize the "
                       "same checkpoint with --candidate vllm or --candidate hf")
        return out
    out.engine_args = options
    # The configuration already judged that is the engine localization builds (the eager
    # one, when a compiled configuration failed).
    twin = next((c for c in run.configurations if c is not target and c.precision is not None
                 and {**run.candidate_spec.options, **c.configuration.args} == options), None)
    if twin is not None and twin.passed and out.failed:
        out.skipped = (f"configuration {target.name} fails and {twin.name}, the same engine "
                       "run eagerly, passes: the error is in the compiled path, which layer "
                       "capture cannot see (hooks need eager mode)")
        return out
    judged = [{**run.candidate_spec.options, **c.configuration.args} for c in run.configurations
              if c.precision is not None]
    if out.for_gates and options not in judged:
        out.skipped = (f"the run passed and no configuration it judged is the engine the "
                       f"capture needs ({target.name} run eagerly): a passing run builds no "
                       "engine for the layer gates; judge --configurations eager as well, or "
                       "--localize always")
        return out
    spec = replace(run.candidate_spec, options=options,
                   role=f"candidate ({backend}, localizing {target.name})")
    sequences = worst_sequences(run, target, settings.localize.prompts,
                                dict(zip(settings.prompts.ids, run.token_ids)),
                                settings.localize.positions)
    started = time.perf_counter()
    try:
        captures = _capture_all(settings, run, spec, sequences, kept, spare, out)
    except (EngineError, AnswerError) as exc:
        out.error = str(exc)
        out.timings["total_s"] = time.perf_counter() - started
        return out
    compiled = bool(options.get("enforce_eager")
                    and not target.configuration.args.get("enforce_eager"))
    unseen = unseen_path(target, compiled)
    results = []
    for (prompt_id, view, _ids, positions), (reference, floor, candidate) in zip(
            sequences, captures):
        results.append(localize(
            reference, candidate, floor, dtype=settings.candidate_dtype,
            limit=settings.localize.ratio, prompt_id=prompt_id, view=view,
            positions=positions, output_failed=out.failed and not unseen))
    out.results = tuple(results)
    if out.failed and unseen and not any(r.diverged for r in results):
        out.unseen = unseen
    out.timings["total_s"] = time.perf_counter() - started
    if options.get("enforce_eager") and not target.configuration.args.get("enforce_eager"):
        out.note = (f"localized in eager mode (configuration {target.name} with "
                    "enforce_eager=true): hooks do not fire inside a compiled graph")
    return out


def unseen_path(target: ConfigurationRun, compiled: bool) -> str:
    """The path a failing configuration fails on that one eager prefill (the capture) does
    not take, or "" when the capture takes the failing path. Said when nothing diverges
    in the capture, instead of blaming the output head."""
    precision = target.precision
    if precision is None or precision.passed:
        return ""
    failing = {r.gate.over for r in precision.gate_results if not r.passed}
    failing |= {p.view for p in precision.all_prompt_results if not p.passed}
    if failing and failing <= {"decode"}:
        return ("the decode path: only free-running decoding fails (the KV cache, decode "
                "kernels, the sampler's step), and the capture is one prefill pass")
    if compiled:
        return (f"the compiled path: configuration {target.name} runs a compiled graph and "
                "the capture runs the same engine eagerly (hooks need eager mode); or after "
                "the final norm (the output head): judge --configurations eager as well to "
                "tell them apart")
    return ""


def _capture_all(settings: Settings, run: Run, spec: EngineSpec, sequences, kept, spare,
                 out: LocalizationRun) -> list[tuple[dict, dict | None, dict]]:
    """Reference, floor and candidate captures of each sequence; one engine at a time."""
    def capture(engine: Engine, role: str) -> list[dict]:
        from llm_parity.engines.progress import phase

        started = time.perf_counter()
        found = []
        with phase(f"localization: {engine.spec.role}: capturing layers", len(sequences),
                   "sequences") as done:
            for _, _, ids, positions in sequences:
                found.append(engine.capture(ids, positions))
                done(1)
        out.timings[f"{role}_capture_s"] = time.perf_counter() - started
        return found

    def with_engine(backend: str, engine_spec: EngineSpec, role: str, ready: Engine | None):
        if ready is not None:
            return capture(ready, role)
        started = time.perf_counter()
        engine = build_engine(backend, engine_spec)
        out.timings[f"{role}_load_s"] = time.perf_counter() - started
        try:
            return capture(engine, role)
        finally:
            engine.close()

    assert run.reference_spec is not None
    reference = with_engine("hf", run.reference_spec, "reference",
                            (kept or {}).get("reference"))
    floor: list[dict | None] = [None] * len(sequences)
    if settings.candidate_dtype != settings.reference_dtype:
        floor_spec = replace(run.reference_spec, dtype=settings.candidate_dtype,
                             role=f"noise floor (hf {settings.candidate_dtype})")
        floor = with_engine("hf", floor_spec, "floor", None)
    ready = next((e for e in ((spare or {}).get("engine"), (kept or {}).get("candidate"))
                  if e is not None and same_engine(e.spec, spec)), None)
    out.reused_engine = ready is not None
    if ready is None and spare:  # never two candidate engines alive at once
        spare.pop("engine").close()
        spare.clear()
    candidate = with_engine(run.backend, spec, "candidate", ready)
    return list(zip(reference, floor, candidate))
