"""The package's shape: one-way layers, no import cycles, a pure comparison layer, light
plugin import, and each shared helper defined once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_vllm

import llm_parity
from llm_parity.testing.layout import cycles, import_graph, upward_imports

PACKAGE = Path(llm_parity.__file__).resolve().parent


def test_the_package_has_no_import_cycles_and_no_upward_import():
    graph = import_graph(PACKAGE, "llm_parity")
    assert "llm_parity.compare.metrics" in graph and len(graph) > 30
    assert cycles(graph) == []
    assert upward_imports(graph, "llm_parity") == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_finds_a_cycle_even_through_a_lazy_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "compare/__init__.py": "",
        "compare/a.py": "from pkg.compare import b\n",
        "compare/b.py": "def f():\n    from pkg.compare.c import g\n",
        "compare/c.py": "from .a import x\n",
        "report/__init__.py": "",
        "report/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from pkg.compare.a import x\n",
    })
    graph = import_graph(root, "pkg")
    assert cycles(graph) == [["pkg.compare.a", "pkg.compare.b", "pkg.compare.c"]]
    assert graph["pkg.report.d"] == set()  # type-checking imports are not run


def test_the_check_finds_a_layer_reaching_up(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "compare/__init__.py": "",
        "compare/a.py": "import pkg.report.d\n",
        "report/__init__.py": "",
        "report/d.py": "from pkg.compare import a\n",
    })
    graph = import_graph(root, "pkg")
    assert upward_imports(graph, "pkg") == [("pkg.compare.a", "pkg.report.d")]


def _loaded_after(code: str) -> set[str]:
    heavy = ("torch", "transformers", "vllm", "pytest", "scipy")
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(m for m in "
         f"{heavy!r} if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_comparison_layer_imports_no_engine_and_no_pytest():
    modules = sorted(p.stem for p in (PACKAGE / "compare").glob("*.py") if p.stem != "__init__")
    assert {"metrics", "stats", "gates", "precision", "noise_floor", "performance",
            "answers"} <= set(modules)
    code = "\n".join(f"import llm_parity.compare.{m}" for m in modules)
    assert _loaded_after(code) == set()


def test_the_plugin_imports_no_engine():
    loaded = _loaded_after("import llm_parity.pytest_plugin")
    assert loaded & {"torch", "transformers", "vllm"} == set()


@pytest.mark.parametrize("pattern", [
    r"^def fmt\(", r"^def text_table\(", r"^def positive_int\(", r"^HIGHER_IS_BETTER\b",
    r"^VIEWS\b", r"^TOKENIZER_FILES\b", r"^def speedup_pairs\(", r"^def kl_by_step\(",
    r"^def kl_by_bucket\(", r"^SCHEMA_VERSION\b", r"^RUN_ERRORS\b",
])
def test_each_shared_helper_is_defined_once(pattern):
    found = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if re.search(pattern, p.read_text(encoding="utf-8"), re.M)]
    assert len(found) == 1, found


def test_every_error_type_lives_in_errors():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for name in re.findall(r"^class (\w+)\((?:\w+Error|\w*Exception|UserWarning|"
                               r"ValueError|RuntimeError|LookupError)[,)]",
                               path.read_text(encoding="utf-8"), re.M):
            found[name] = str(path.relative_to(PACKAGE))
    assert found and set(found.values()) == {"errors.py"}, found


@needs_vllm  # where vLLM (and the project's test-only vLLM plugin beside it) is installed
def test_the_built_wheel_carries_no_fault_injector(tmp_path):
    # Before, the wheel registered llm_parity.testing.vllm_faults under vllm.general_plugins:
    # every vLLM process of an environment with the suite installed loaded it, and one
    # environment variable then corrupted the model's outputs.
    import zipfile

    root = PACKAGE.parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("pytest_llm_parity-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    groups = {}
    group = None
    for line in entry_points.decode().splitlines():
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            groups.setdefault(group, []).append(line.split("=", 1)[1].strip())
    assert groups["vllm.general_plugins"] == ["llm_parity.engines.vllm_cpu_plugin:register"]
    assert not [n for n in names if "fault" in n]
    # The project's own test set-up installs the injector, from its own distribution.
    from importlib.metadata import entry_points as installed

    values = {e.value for e in installed(group="vllm.general_plugins")}
    assert "llm_parity_test_faults:register" in values
    assert not any(v.startswith("llm_parity.") and "fault" in v for v in values)
