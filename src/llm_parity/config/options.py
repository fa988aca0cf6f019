"""The run's settings: every option validated up front, before any model is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm_parity.compare.localize import MODES as LOCALIZE_MODES
from llm_parity.compare.localize import LocalizeSettings
from llm_parity.config.checkpoint import check_checkpoint_dir, is_local_reference
from llm_parity.config.configurations import Configuration, select_configurations
from llm_parity.config.prompts import Prompt, PromptSet, load_prompts, packaged_prompts_path
from llm_parity.config.thresholds import Thresholds, ThresholdsFile, packaged_thresholds_path
from llm_parity.engines.base import DTYPES, backends, resolve_candidate_backend
from llm_parity.errors import ModelError, PromptsError, SettingsError, ThresholdsError


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    default: Any = None
    kind: str = "str"  # str, int, bool, list

    @property
    def dest(self) -> str:
        return "parity_" + self.flag.lstrip("-").replace("-", "_")

    @property
    def ini(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Help-text rules: say what the value is, then the default in parentheses.
OPTIONS = (
    Option("--model", "checkpoint under test: a local directory or a hub id resolved through "
           "ModelScope, then the HuggingFace cache (default: the embedded toy model)"),
    Option("--candidate", "candidate backend: vllm, hf, openai or auto (default: auto = vllm "
           "if importable, else hf)", "auto"),
    Option("--candidate-url", "base URL of an OpenAI-compatible server to test with "
           "--candidate openai, e.g. http://127.0.0.1:8000 (default: none)"),
    Option("--candidate-api-key-env", "environment variable holding that server's API key; "
           "the key itself is never printed or written (default: OPENAI_API_KEY)",
           "OPENAI_API_KEY"),
    Option("--candidate-model", "a different checkpoint for the candidate, e.g. a converted "
           "or quantized copy (default: same as --model)"),
    Option("--candidate-dtype", "candidate dtype: bfloat16, float16 or float32 (default: "
           "bfloat16)", "bfloat16"),
    Option("--reference-dtype", "reference dtype (default: float32)", "float32"),
    Option("--candidate-device", "candidate device: auto, cpu, cuda, npu, xpu (default: auto)",
           "auto"),
    Option("--reference-device", "reference device (default: cpu)", "cpu"),
    Option("--thresholds", "gates file (default: ./thresholds.toml if present, else the "
           "packaged one)"),
    Option("--prompts", "prompt set file: .json, .jsonl or .txt (default: the packaged 25 RAG "
           "prompts)"),
    Option("--logprobs", "top-k log-probs asked of the candidate (default: 20)", 20, "int"),
    Option("--continuation", "tokens the reference continues each prompt for the "
           "teacher-forced and free-running comparisons; 0 keeps to the first token "
           "(default: 32)", 32, "int"),
    Option("--long-prompts", "long-context prompt set for those comparisons, or 'none' "
           "(default: the packaged RAG contexts of 300-1900 tokens)"),
    Option("--noise-floor", "measure the bf16 noise floor (Transformers in the candidate's "
           "dtype against the float32 reference) for gates relative to it: auto, on or off "
           "(default: auto = when the thresholds file has such a gate)", "auto"),
    Option("--reference-store", "directory of a golden reference: reused when it matches this "
           "run (checkpoint, tokenizer, prompts, positions, versions), written when absent, "
           "refused when stale (default: off)"),
    Option("--reference-store-update", "recompute and rewrite the --reference-store even if "
           "it is stale (default: off)", False, "bool"),
    Option("--parity-json", "write the machine-readable verdict to this path (default: off)"),
    Option("--parity-report", "write the acceptance report: Markdown (.md) or HTML (.html); "
           "repeatable, e.g. both (default: off)", None, "list"),
    Option("--candidate-option", "KEY=VALUE passed to the candidate engine's constructor, "
           "repeatable, e.g. enforce_eager=true (default: none)", None, "list"),
    Option("--reference-option", "KEY=VALUE passed to the reference's from_pretrained, "
           "repeatable; placement across devices and memory tiers: device_map=auto, "
           "max_memory={\"cpu\": \"8GiB\"}, offload_folder=DIR (JSON for tables; "
           "default: [reference] options of the thresholds file, else none)", None, "list"),
    Option("--batch", "prompts the Transformers engines (the float32 reference, the noise "
           "floor, an hf candidate) compute at once, left-padded; 1 computes each alone "
           "(default: 8)", 8, "int"),
    Option("--memory-limit", "the memory this run may take in its own process, e.g. 8GiB: "
           "a run estimated above it is refused before any model loads (default: this "
           "machine's available memory, or its cgroup's limit)"),
    Option("--progress-interval", "seconds between the plain progress lines written while "
           "the suite works when output is not a terminal (a CI log); 0 writes one at each "
           "update (default: 30)", 30, "int"),
    Option("--devices-per-worker", "under pytest-xdist (-n N), give worker i the devices "
           "i*K to i*K+K-1 through CUDA_VISIBLE_DEVICES and ASCEND_RT_VISIBLE_DEVICES; 0 "
           "leaves them as they are (default: 0)", 0, "int"),
    Option("--configurations", "candidate configurations to judge, comma-separated names "
           "from [configurations] of the thresholds file, or 'all' (default: those marked "
           "default = true there for the candidate's backend; for vllm: compiled,eager)"),
    Option("--localize", "when a failing port is localized to its first diverging layer and "
           "module: on-failure, always or off (default: mode under [localize] of the "
           "thresholds file, else on-failure)"),
    Option("--tensor-parallel-size", "tensor-parallel size of the vllm candidate (default: 1)",
           1, "int"),
    Option("--trust-remote-code", "allow the checkpoint's own Python code (default: off)",
           False, "bool"),
    Option("--strict-gates", "a gate this run cannot judge (no noise floor, no depth, a "
           "full-vocabulary metric on a top-k candidate) fails instead of being listed as "
           "not judged; also strict = true under [precision] (default: off)", False, "bool"),
)


@dataclass(frozen=True)
class Settings:
    model: str | None
    candidate: str
    candidate_model: str | None
    candidate_dtype: str
    reference_dtype: str
    candidate_device: str
    reference_device: str
    thresholds_path: Path
    prompts: PromptSet
    logprobs: int
    parity_json: Path | None
    parity_reports: tuple[Path, ...]
    candidate_options: dict[str, Any] = field(default_factory=dict)
    reference_options: dict[str, Any] = field(default_factory=dict)
    devices_per_worker: int = 0
    batch: int = 8  # prompts an hf engine computes at once (engines/hf.py)
    progress_interval: int = 30  # seconds between plain progress lines (pytest_plugin/live.py)
    memory_limit: str | None = None  # what the run may take (runner/budget.py); None: found
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    thresholds_explicit: bool = False
    continuation: int = 32
    long_prompts: PromptSet | None = None
    candidate_url: str | None = None
    candidate_api_key_env: str = "OPENAI_API_KEY"
    noise_floor: str = "auto"  # auto, on, off
    reference_store: Path | None = None
    reference_store_update: bool = False
    strict_gates: bool = False
    # The candidate configurations judged, the base first (see config/configurations.py).
    configurations: tuple[Configuration, ...] = ()
    # When and how a failing port is localized ([localize], --localize over its mode).
    localize: LocalizeSettings = None  # type: ignore[assignment]  # None: the file's
    # The thresholds file parsed and validated once (read from thresholds_path when not given).
    thresholds_file: ThresholdsFile = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.thresholds_file is None:
            object.__setattr__(self, "thresholds_file", ThresholdsFile.read(self.thresholds_path))
        if self.localize is None:
            object.__setattr__(self, "localize", self.thresholds_file.localize)
        if not self.configurations:
            object.__setattr__(self, "configurations", select_configurations(
                self.thresholds_file.configurations, resolve_candidate_backend(self.candidate),
                None, str(self.thresholds_path)))

    def thresholds(self, platform: str | None = None, model: str | None = None) -> Thresholds:
        """The effective gates for a platform and model, from the file parsed once."""
        return self.thresholds_file.resolve(platform, model)

    def depth_prompts(self) -> list[Prompt]:
        """The prompts the depth views continue: the first-token set, then the long set."""
        if self.continuation == 0:
            return []
        sets = [self.prompts] + ([self.long_prompts] if self.long_prompts else [])
        return [p for prompt_set in sets for p in prompt_set.prompts]


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SettingsError(f"{flag}: expected KEY=VALUE with KEY a Python identifier, "
                                f"got {item!r}")
        try:
            options[key.strip()] = parse_value(value.strip())
        except ValueError as exc:
            raise SettingsError(f"{flag}: {key.strip()}: {exc}") from None
    return options


def parse_value(text: str) -> Any:
    """KEY=VALUE values: true/false, ints and floats become themselves, a JSON table or
    array (starting with { or [) is parsed, the rest stays text."""
    if text[:1] in ("{", "["):
        import json

        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc}): {text!r}") from None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_settings(raw: dict[str, Any], rootdir: Path) -> Settings:
    """Validate the raw option values (flag name without dashes -> value)."""
    candidate = raw["candidate"]
    known = (*backends(), "auto")
    if candidate not in known:
        raise SettingsError(f"--candidate: unknown backend {candidate!r}; expected one of: "
                            f"{', '.join(known)}")
    for flag in ("candidate-dtype", "reference-dtype"):
        if raw[flag] not in DTYPES:
            raise SettingsError(f"--{flag}: unknown dtype {raw[flag]!r}; expected one of: "
                                f"{', '.join(DTYPES)}")
    for flag in ("candidate-device", "reference-device"):
        if raw[flag].split(":")[0] not in ("auto", "cpu", "cuda", "npu", "xpu"):
            raise SettingsError(f"--{flag}: unknown device {raw[flag]!r}; expected auto, cpu, "
                                "cuda, npu or xpu (optionally with :index)")
    candidate_url = _candidate_url(raw, candidate)
    logprobs = positive_int(raw["logprobs"], "--logprobs")
    tp = positive_int(raw["tensor-parallel-size"], "--tensor-parallel-size")
    continuation = positive_int(raw["continuation"], "--continuation", minimum=0)
    batch = positive_int(raw.get("batch", 8), "--batch", minimum=1)
    memory_limit = raw.get("memory-limit") or None
    if memory_limit is not None:
        from llm_parity.config.sizes import parse_size

        parse_size(memory_limit)  # refused with the flag's name before anything loads
    progress_interval = positive_int(raw.get("progress-interval", 30), "--progress-interval",
                                     minimum=0)
    for flag in ("model", "candidate-model"):
        name = raw[flag]
        if name and is_local_reference(name):
            try:
                check_checkpoint_dir(Path(name).expanduser(), f"--{flag}")
            except ModelError as exc:
                raise SettingsError(str(exc)) from None
    thresholds_explicit = bool(raw["thresholds"])
    if raw["thresholds"]:
        thresholds_path = Path(raw["thresholds"]).expanduser()
        if not thresholds_path.is_absolute():
            thresholds_path = Path.cwd() / thresholds_path
    elif (Path.cwd() / "thresholds.toml").is_file():
        thresholds_path = Path.cwd() / "thresholds.toml"
    elif (rootdir / "thresholds.toml").is_file():
        thresholds_path = rootdir / "thresholds.toml"
    else:
        thresholds_path = packaged_thresholds_path()
    try:
        # The whole file, every override and every merged gate, checked now; parsed once.
        thresholds_file = ThresholdsFile.read(thresholds_path)
        prompts = load_prompts(raw["prompts"] or None)
        long_prompts = _long_prompts(raw["long-prompts"], continuation)
    except (ThresholdsError, PromptsError) as exc:
        raise SettingsError(str(exc)) from None
    _check_distinct_ids(prompts, long_prompts)
    noise_floor = str(raw["noise-floor"]).lower()
    if noise_floor not in NOISE_FLOOR_CHOICES:
        raise SettingsError(f"--noise-floor: expected one of {', '.join(NOISE_FLOOR_CHOICES)}, "
                            f"got {raw['noise-floor']!r}")
    reference_store = _store_path(raw["reference-store"])
    if raw["reference-store-update"] and reference_store is None:
        raise SettingsError("--reference-store-update needs --reference-store DIR, the store "
                            "to rewrite")
    options = _key_values(raw["candidate-option"], "--candidate-option")
    # The file's [reference] options, then the command line's over them.
    reference_options = {**thresholds_file.reference_options,
                         **_key_values(raw.get("reference-option"), "--reference-option")}
    configurations = select_configurations(
        thresholds_file.configurations, resolve_candidate_backend(candidate),
        raw["configurations"], str(thresholds_path))
    _check_engine_options(candidate, options, reference_options, configurations,
                          str(thresholds_path))
    localize = thresholds_file.localize
    if raw.get("localize"):
        mode = str(raw["localize"]).lower()
        if mode not in LOCALIZE_MODES:
            raise SettingsError(f"--localize: expected one of {', '.join(LOCALIZE_MODES)}, "
                                f"got {raw['localize']!r}")
        localize = replace(localize, mode=mode)
    return Settings(
        model=raw["model"],
        candidate=candidate,
        candidate_model=raw["candidate-model"],
        candidate_dtype=raw["candidate-dtype"],
        reference_dtype=raw["reference-dtype"],
        candidate_device=raw["candidate-device"],
        reference_device=raw["reference-device"],
        thresholds_path=thresholds_path.resolve(),
        prompts=prompts,
        logprobs=logprobs,
        parity_json=_output_path(raw["parity-json"], "--parity-json", (".json",)),
        parity_reports=tuple(
            _output_path(value, "--parity-report", (".md", ".markdown", ".html", ".htm"))
            for value in raw["parity-report"] or []
        ),
        candidate_options=options,
        reference_options=reference_options,
        devices_per_worker=positive_int(raw.get("devices-per-worker", 0) or 0,
                                        "--devices-per-worker", minimum=0),
        tensor_parallel_size=tp,
        trust_remote_code=bool(raw["trust-remote-code"]),
        thresholds_explicit=thresholds_explicit,
        continuation=continuation,
        batch=batch,
        progress_interval=progress_interval,
        memory_limit=memory_limit,
        long_prompts=long_prompts,
        candidate_url=candidate_url,
        candidate_api_key_env=raw["candidate-api-key-env"],
        noise_floor=noise_floor,
        reference_store=reference_store,
        reference_store_update=bool(raw["reference-store-update"]),
        strict_gates=bool(raw["strict-gates"]),
        thresholds_file=thresholds_file,
        configurations=configurations,
        localize=localize,
    )


NOISE_FLOOR_CHOICES = ("auto", "on", "off")


def _check_engine_options(candidate: str, options: dict[str, Any],
                          reference_options: dict[str, Any],
                          configurations: tuple[Configuration, ...], source: str) -> None:
    """Engine options read before any model loads: none that the suite owns, none the
    backend does not read (vLLM's own names are checked against vLLM in preflight)."""
    from llm_parity.engines.base import engine_class
    from llm_parity.errors import EngineError

    backend = resolve_candidate_backend(candidate)
    checks = [(backend, options, "--candidate-option", "--candidate-dtype"),
              ("hf", reference_options, "--reference-option (or [reference] options of "
               f"{source})", "--reference-dtype")]
    checks += [(backend, dict(c.args), f"{source}: [configurations.{c.name}] args",
                "--candidate-dtype") for c in configurations if c.declared]
    try:
        for name, given, flag, dtype_flag in checks:
            engine_class(name).check_options(given, flag, dtype_flag)
    except EngineError as exc:
        raise SettingsError(str(exc)) from None


def _check_distinct_ids(prompts: PromptSet, long_prompts: PromptSet | None) -> None:
    """The depth views, their tests and the noise floor are keyed by prompt id: an id in
    both sets would pair one prompt's floor with the other's positions."""
    if long_prompts is None:
        return
    shared = [p.id for p in long_prompts.prompts if p.id in set(prompts.ids)]
    if shared:
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise SettingsError(
            f"--long-prompts: prompt id {shared[0]!r}{more} of {long_prompts.source} is also "
            f"an id of --prompts {prompts.source}; results are keyed by id, so each prompt "
            "needs its own (rename the ids, e.g. give a JSON or JSONL set an \"id\" per prompt)")


def _store_path(value: str | None) -> Path | None:
    """A store directory: absent (to be written) or a directory; its parent must exist."""
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"--reference-store: {value!r} exists and is not a directory")
    if not path.parent.is_dir():
        raise SettingsError(f"--reference-store: the directory {path.parent} does not exist")
    return path


def _candidate_url(raw: dict[str, Any], candidate: str) -> str | None:
    """A served candidate: --candidate openai and --candidate-url go together."""
    from llm_parity.engines.openai.client import DEFAULT_API_KEY_ENV, check_server_url

    url = raw["candidate-url"]
    if candidate == "openai" and not url:
        raise SettingsError("--candidate openai needs --candidate-url, the server's base URL "
                            "(e.g. --candidate-url http://127.0.0.1:8000)")
    if url and candidate != "openai":
        raise SettingsError(f"--candidate-url is set but --candidate is {candidate!r}; add "
                            "--candidate openai to test the server")
    key_env = raw["candidate-api-key-env"]
    if not key_env or not key_env.replace("_", "a").isalnum() or key_env[0].isdigit():
        raise SettingsError(f"--candidate-api-key-env: expected an environment variable name, "
                            f"got {key_env!r}")
    if key_env != DEFAULT_API_KEY_ENV and key_env not in os.environ:
        raise SettingsError(f"--candidate-api-key-env: ${key_env} is not set")
    if not url:
        return None
    try:
        return check_server_url(url)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _long_prompts(value: str | None, continuation: int) -> PromptSet | None:
    if continuation == 0 or (value or "").lower() == "none":
        return None
    if value:
        return load_prompts(value)
    packaged = packaged_prompts_path("rag_long")
    return load_prompts(packaged) if packaged.is_file() else None


def positive_int(value: Any, flag: str, minimum: int = 1) -> int:
    """An integer >= minimum, or a SettingsError naming the option."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{flag}: expected {what}, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{flag}: expected {what}, got {number}")
    return number


def _output_path(value: str | None, flag: str, suffixes: tuple[str, ...]) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if path.suffix.lower() not in suffixes:
        raise SettingsError(f"{flag}: {value!r} should end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise SettingsError(f"{flag}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise SettingsError(f"{flag}: the directory {path.parent} is not writable")
    return path
