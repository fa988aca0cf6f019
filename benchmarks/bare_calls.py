"""The bare calls a precision run needs, and nothing else: the baseline of the overhead
benchmark. Load the fp32 reference, run its forward passes, load vLLM, one batched call.

    python benchmarks/bare_calls.py MODEL_DIR [--candidate vllm|hf]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--candidate", default="vllm", choices=("vllm", "hf"))
    parser.add_argument("--logprobs", type=int, default=20)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_parity.config.prompts import load_prompts

    texts = [p.text for p in load_prompts().prompts]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    t0 = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        rows = [reference(input_ids=torch.tensor([i])).logits[0, -1].double().log_softmax(-1)
                for i in ids]
    t1 = time.perf_counter()
    del reference
    if args.candidate == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        # The same engine arguments the suite uses on CPU (see engines/vllm.py).
        llm = LLM(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=1 << 30, seed=0,
                  max_logprobs=20)
        llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                     SamplingParams(max_tokens=1, temperature=0.0, logprobs=args.logprobs),
                     use_tqdm=False)
        llm.llm_engine.engine_core.shutdown()
    else:
        candidate = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        with torch.inference_mode():
            for i in ids:
                candidate(input_ids=torch.tensor([i])).logits[0, -1].float().log_softmax(-1)
    t2 = time.perf_counter()
    print(json.dumps({"reference_s": t1 - t0, "candidate_s": t2 - t1, "rows": len(rows)}))


if __name__ == "__main__":
    main()
