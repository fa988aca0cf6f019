"""The float32 reference's work done by bare Transformers calls, to set against the suite's
`reference_first_token` and `reference_depth` timings: one forward per first-token prompt,
then greedy decoding with the KV cache of every depth prompt, each step's logits row taken
to the host. Same prompts, same lengths, same threads.

    .venv/bin/python benchmarks/reference_bare.py MODEL_DIR [--continuation 32]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_parity.config.prompts import load_prompts, packaged_prompts_path

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    first = [tokenizer(p.text)["input_ids"] for p in load_prompts().prompts]
    long = [tokenizer(p.text)["input_ids"]
            for p in load_prompts(packaged_prompts_path("rag_long")).prompts]
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype)).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in first:
            model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float().numpy()
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in first + long:
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            for _ in range(args.continuation - 1):
                token = int(out.logits[0, -1].float().numpy().argmax())
                out = model(input_ids=torch.tensor([[token]]),
                            past_key_values=out.past_key_values, use_cache=True)
            out.logits[0, -1].float().numpy()
    depth_s = time.perf_counter() - started
    print(json.dumps({"first_token_s": round(first_s, 2), "depth_s": round(depth_s, 2),
                      "threads": torch.get_num_threads(), "dtype": args.dtype}))


if __name__ == "__main__":
    main()
