"""Path-valued options and pytest's own reading of the command line.

pytest decides its rootdir and configuration file before any plugin's options are known:
an existing path given as an option's value with a space (`--model /abs/dir`) is then read
as a test path, and the configuration is looked for above it. The user's ini settings
(thresholds, markers, llm-parity keys) would be silently dropped; such a run stops at once
with the spelling that works. Only pytest's public findpaths function is used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_parity.config.options import OPTIONS

# The options whose value is a path (the ones pytest can mistake for a test path).
PATH_OPTIONS = ("--model", "--candidate-model", "--thresholds", "--prompts", "--long-prompts",
                "--reference-store", "--parity-json", "--parity-report")


def spaced_paths(args: list[str], invocation_dir: Path) -> list[tuple[str, str]]:
    """(option, value) for each path option written with a space before an existing path."""
    found = []
    flags = {o.flag for o in OPTIONS if o.flag in PATH_OPTIONS}
    for flag, value in zip(args, args[1:]):
        if flag in flags and not value.startswith("-"):
            path = Path(value).expanduser()
            if (path if path.is_absolute() else invocation_dir / path).exists():
                found.append((flag, value))
    return found


def check_setup(config: pytest.Config, args: list[str]) -> None:
    """Refuse a run whose rootdir or configuration file pytest chose from one of our
    option values; a run where the choice is the same either way goes on."""
    spaced = spaced_paths(args, config.invocation_params.dir)
    if not spaced:
        return
    try:
        from _pytest.config.findpaths import determine_setup

        ns = config.known_args_namespace  # parsed again once our options were registered
        rootpath, inipath, *_ = determine_setup(
            inifile=ns.inifilename, override_ini=ns.override_ini, args=ns.file_or_dir,
            rootdir_cmd_arg=ns.rootdir or None, invocation_dir=config.invocation_params.dir)
        if (rootpath, inipath) == (config.rootpath, config.inipath):
            return
        wanted = f"{inipath or rootpath}"
    except Exception:  # noqa: BLE001 - another pytest: say so whether or not it would differ
        wanted = "the configuration the run would otherwise have used"
    flag, value = spaced[0]
    raise pytest.UsageError(
        f"llm-parity: {flag} {value}: pytest takes an existing path written after a space for "
        f"a test path before plugins' options are known, and so read its configuration from "
        f"{config.inipath or config.rootpath} instead of {wanted}. Write {flag}={value} "
        "(with '=')" + (f"; the same for {', '.join(f for f, _ in spaced[1:])}"
                        if len(spaced) > 1 else ""))


def drop_inactive_thresholds(config: pytest.Config, active: Path) -> None:
    """`testpaths` naming a thresholds file that --thresholds replaced: pytest would stop on
    it as "not found" (only the active file is collected), so it is left out."""
    source = getattr(config, "args_source", None)
    if source is None or source.name != "TESTPATHS":
        return
    root = Path(config.rootpath)
    kept = []
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = (path if path.is_absolute() else root / path).resolve()
        if path.suffix == ".toml" and path.is_file() and path != active:
            continue
        kept.append(arg)
    config.args[:] = kept
