"""One state object per session: settings, the precision run (done once, on first need),
the performance run, and the environment they ran in.
"""

from __future__ import annotations

from typing import Any

from llm_parity.config.options import Settings
from llm_parity.engines.base import EngineSpec, same_engine
from llm_parity.runner.precision import Run, run_precision


class ParitySession:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run: Run | None = None
        self.error: BaseException | None = None
        self.environment: dict[str, Any] = {}
        self.attempted = False
        self.verdict: dict[str, Any] | None = None  # built once, at the end of the session
        # Set at the end of a session a signal (or pytest.exit) cut short: the signal's name
        # and the engine step under way ("signal", "during"); the verdict is then
        # "interrupted".
        self.interrupted: dict[str, Any] | None = None
        # Set when a test asks for the loaded engines (the public fixtures): the run then
        # leaves them open here, and close_engines() releases them at the end.
        self.keep_engines = False
        self.engines: dict[str, Any] = {}
        # Set when the session runs the performance benchmarks too: the precision run's last
        # candidate engine is then left here, and the performance run adopts it if it would
        # build the same engine (else it is closed first: never two engines alive).
        self.hand_over = False
        self.spare: dict[str, Any] = {}
        # Under pytest-xdist: the prompt shares of the workers (runner/exchange.py).
        self.exchange: Any = None
        self.live = False  # the pytest plugin shows a live progress line (pytest_plugin/live.py)

    def gate_names(self) -> list[str]:
        """Every gate name the file can produce, on any platform, for this model."""
        return self.settings.thresholds_file.gate_names(self.settings.model)

    def quantization_gate_names(self) -> list[str]:
        """The quantization gates, when the candidate is a quantized checkpoint beside an
        unquantized --model (read from the config files, nothing loaded); else none."""
        from pathlib import Path

        from llm_parity.engines.quantized import read_scheme
        from llm_parity.runner.toymodel import toy_model_dir

        settings = self.settings
        candidate = Path(settings.candidate_model) if settings.candidate_model else None
        if candidate is None or not candidate.is_dir() or read_scheme(candidate) is None:
            return []
        model = Path(settings.model) if settings.model else toy_model_dir()
        if model.is_dir() and read_scheme(model) is not None:
            return []
        return settings.thresholds_file.quantization_gate_names(settings.model)

    def depth_prompt_ids(self) -> list[str]:
        return [p.id for p in self.settings.depth_prompts()]

    def precision(self) -> Run:
        """Run the comparison once; later calls return it, or raise the same error."""
        if not self.attempted:
            self.attempted = True
            try:
                # The last candidate engine is left over for the performance run, and for
                # localization, which reuses it when it is the engine it needs.
                leave = self.hand_over or self.settings.localize.mode != "off"
                self.run = run_precision(
                    self.settings, self.environment,
                    self.engines if self.keep_engines else None,
                    spare=self.spare if leave and not self.keep_engines else None,
                    exchange=self.exchange)
                self.run.localization = self._localize(self.run)
                if not self.hand_over:
                    self.close_spare()
            except BaseException as exc:
                self.error = exc
                raise
        if self.error is not None:
            raise self.error
        assert self.run is not None
        return self.run

    def _localize(self, run: Run) -> Any:
        """Localization after the precision run (runner/localize.py), and the layer gates
        judged on its capture; its own failure is recorded, never the run's (the layer
        gates are then not judged, saying why)."""
        from llm_parity.runner.localize import LocalizationRun, localize_run

        mode = self.settings.localize.mode
        if self.exchange is not None and mode != "off":
            out = LocalizationRun(mode, skipped=(
                "not under pytest-xdist: localize with one process, from the same "
                "--reference-store"))
        else:
            try:
                out = localize_run(self.settings, run,
                                   self.engines if self.keep_engines else None, self.spare)
            except Exception as exc:  # a diagnosis that breaks must not break the verdict
                out = LocalizationRun(mode, error=f"{type(exc).__name__}: {exc}")
        out.judge(self.settings.thresholds_file.layer_gates,
                  strict=run.thresholds.strict or self.settings.strict_gates)
        return out

    def take_spare(self, spec: EngineSpec) -> tuple[Any, str] | None:
        """The precision run's left-over engine and its configuration, if `spec` would build
        the same engine; it is then the caller's to close."""
        if self.spare and same_engine(self.spare["spec"], spec):
            spare, self.spare = self.spare, {}
            return spare["engine"], spare["configuration"]
        return None

    def close_spare(self) -> None:
        spare, self.spare = self.spare, {}
        if spare:
            spare["engine"].close()

    def close_engines(self) -> None:
        """Release the engines kept for the public fixtures, the candidate first, and a
        left-over engine nobody adopted."""
        self.close_spare()
        for role in ("candidate", "reference"):
            engine = self.engines.pop(role, None)
            if engine is not None:
                engine.close()
