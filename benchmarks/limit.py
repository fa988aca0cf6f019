"""How close the reference and the noise floor run to this machine's limit.

The suite's own Transformers engine (engines/hf.py, batched as a run batches it) does a
run's reference work twice in each dtype: once counted, once timed. Counted: the matmul
FLOPs (torch's FlopCounterMode) and the forward passes (a hook), so the weights streamed
from memory are at least the weight bytes once per pass. Timed: the first-token pass over
the 25 default prompts, then the greedy continuation of those and the 8 long ones. Set
against what the same cores do on plain work in the same dtype: a square matmul for the
arithmetic rate and a streaming copy for the memory bandwidth.

    taskset -c 0,1 .venv/bin/python benchmarks/limit.py --model=DIR [--continuation 32]
        [--batch 8] [--dtypes float32,bfloat16] [--json out.json]

A phase far under both limits spends its time elsewhere (Python, small kernels, padding);
one near either is as fast as this machine allows for the work it does.
"""

from __future__ import annotations

import argparse
import json
import time


def _timed(work, least: float = 1.0) -> float:
    """Seconds per call of work(), repeated for at least `least` seconds after a warm-up."""
    work()
    calls, started = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        spent = time.perf_counter() - started
        if spent >= least:
            return spent / calls


def machine(torch, dtype) -> dict[str, float]:
    """A square matmul's rate in this dtype and a streaming copy's bandwidth."""
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    matmul = 2 * n**3 / _timed(lambda: torch.mm(a, b)) / 1e9
    src = torch.ones(1 << 27, dtype=torch.float32)  # 512 MiB, far past any cache
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / _timed(lambda: dst.copy_(src)) / 1e9
    return {"matmul_gflops": matmul, "copy_gbs": copy}


def streamed_bytes(model) -> int:
    """Weight bytes one forward pass reads: every parameter, less an input embedding the
    output head does not share (a lookup reads a few rows of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embed.weight.data_ptr() != head.weight.data_ptr():
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


def measure(model_dir: str, dtype: str, first, depth, continuation: int, batch: int):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llm_parity.engines.base import EngineSpec
    from llm_parity.engines.hf import HfEngine

    engine = HfEngine(EngineSpec(model=model_dir, dtype=dtype, device="cpu", batch=batch,
                                 role=f"{dtype} run"))
    forwards = [0]
    engine.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    phases = {"first token": lambda: engine.next_token(first, 20),
              "depth": lambda: engine.greedy(depth, continuation, 20)}
    rows = {}
    for phase, work in phases.items():
        forwards[0] = 0
        with FlopCounterMode(display=False) as counter:
            work()
        flops, passes = counter.get_total_flops(), forwards[0]
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        rows[phase] = {"seconds": seconds, "gflop": flops / 1e9, "forwards": passes,
                       "gflops": flops / seconds / 1e9,
                       "weights_gbs": streamed_bytes(engine.model) * passes / seconds / 1e9}
    engine.close()
    return rows, machine(torch, getattr(torch, dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch

    from llm_parity.config.prompts import load_prompts, packaged_prompts_path
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts

    tokenizer = load_tokenizer(args.model, False)
    first = tokenize_prompts(tokenizer, load_prompts())
    depth = first + tokenize_prompts(tokenizer, load_prompts(packaged_prompts_path("rag_long")))
    out = {"threads": torch.get_num_threads(), "dtypes": {}}
    print(f"{torch.get_num_threads()} threads; {len(first)} first-token prompts, "
          f"{len(depth)} continued for {args.continuation} tokens, batch {args.batch}")
    print(f"{'dtype':9} {'phase':12} {'seconds':>8} {'GFLOP':>8} {'GFLOP/s':>8} "
          f"{'of matmul':>9} {'passes':>7} {'weights GB/s':>12} {'of copy':>8}")
    for dtype in args.dtypes.split(","):
        rows, limit = measure(args.model, dtype, first, depth, args.continuation, args.batch)
        out["dtypes"][dtype] = {"machine": limit, "phases": rows}
        for phase, r in rows.items():
            print(f"{dtype:9} {phase:12} {r['seconds']:8.1f} {r['gflop']:8.1f} "
                  f"{r['gflops']:8.1f} {r['gflops'] / limit['matmul_gflops']:8.0%} "
                  f"{r['forwards']:7d} {r['weights_gbs']:12.2f} "
                  f"{r['weights_gbs'] / limit['copy_gbs']:7.0%}")
        print(f"{dtype:9} {'the machine':12} square matmul {limit['matmul_gflops']:.1f} GFLOP/s, "
              f"streaming copy {limit['copy_gbs']:.2f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
