"""The Transformers engines batch their prompts (left-padded, masked, each row numbered as
it would be alone): the answers stay those of one prompt at a time, within a bound written
in docs/notes/batching.md, with the same greedy tokens; and a list cut on the batch grid
(shards, xdist workers) is computed in the very batches the whole list is, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from llm_parity.engines.base import EngineSpec, build_engine
from llm_parity.runner.golden import shard_range

# The largest float32 logit a batch may move from the one-prompt path (measured: 1.5e-5
# on the stand-ins, see docs/notes/batching.md), with room for other CPUs' kernels.
BOUND = 1e-4
STEPS = 12


@pytest.mark.parametrize("grain", [1, 3, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 25, 33])
def test_shards_on_the_batch_grid_cover_every_prompt_once(count, grain):
    for shards in (1, 2, 3, 4):
        ranges = [shard_range(count, i, shards, grain) for i in range(shards)]
        assert [i for r in ranges for i in r] == list(range(count))
        assert all(r.start % grain == 0 for r in ranges if len(r))


def answers(model: str, prompts: list[list[int]], batch: int, dtype: str = "float32"):
    with build_engine("hf", EngineSpec(model=model, dtype=dtype, device="cpu",
                                       batch=batch)) as engine:
        first = engine.next_token(prompts, 20)
        decoded = engine.greedy(prompts[:9], STEPS, 20)
        sequences = [ids + d.token_ids for ids, d in zip(prompts, decoded)]
        scored = engine.score(sequences, [len(ids) - 1 for ids in prompts[:9]], 20)
    return first, decoded, scored


def largest_move(one, batched) -> float:
    (f1, d1, s1), (fb, db, sb) = one, batched
    rows = [(a, b) for a, b in zip(f1, fb, strict=True)]
    rows += [(x, y) for a, b in zip(d1, db, strict=True)
             for x, y in zip(a.steps, b.steps, strict=True)]
    rows += [(x, y) for a, b in zip(s1, sb, strict=True) for x, y in zip(a, b, strict=True)]
    return max(float(np.abs(a.logits - b.logits).max()) for a, b in rows)


def family_param(family: str):
    # Transformers 4.51 has no DeepSeek-V2, and reads the MoE stand-in's experts otherwise.
    marks = [pytest.mark.transformers5] if family in ("deepseek_v2", "qwen3_moe") else []
    return pytest.param(family, marks=marks)


@pytest.fixture(scope="module")
def rag_prompts():
    from llm_parity.config.prompts import load_prompts
    from llm_parity.runner.tokenization import load_tokenizer, tokenize_prompts
    from llm_parity.runner.toymodel import toy_model_dir

    return tokenize_prompts(load_tokenizer(toy_model_dir(), False), load_prompts())


@pytest.mark.engine
@pytest.mark.parametrize("family", [family_param(f) for f in
                                    ("llama", "qwen3", "qwen3_moe", "deepseek_v2")])
def test_a_batched_stand_in_answers_as_each_prompt_alone(family, rag_prompts, tmp_path):
    from llm_parity.runner.toymodel import toy_model_dir, write_toy_model

    model = str(toy_model_dir() if family == "llama"
                else write_toy_model(tmp_path / family, family))
    one = answers(model, rag_prompts, 1)
    batched = answers(model, rag_prompts, 8)
    assert [d.token_ids for d in one[1]] == [d.token_ids for d in batched[1]]
    assert 0 < largest_move(one, batched) <= BOUND  # batched, not the same path again
    # The rows are each prompt's own: a batch of lengths that differ was padded.
    assert len({len(ids) for ids in rag_prompts[:8]}) > 1


@pytest.mark.engine
@pytest.mark.transformers5  # before 5 such a model decodes one prompt at a time (hf._pads)
def test_padding_keeps_a_sliding_window_each_rows_own(tmp_path):
    # Gemma 3's local layers see the last `sliding_window` tokens: a left-padded row must
    # count them from its own tokens, not the padded batch's columns.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, size=n).tolist() for n in (5, 31, 12, 40, 9, 23, 17, 6)]
    one = answers(str(tmp_path / "gemma"), prompts, 1)
    batched = answers(str(tmp_path / "gemma"), prompts, 8)
    assert [d.token_ids for d in one[1]] == [d.token_ids for d in batched[1]]
    assert largest_move(one, batched) <= BOUND


@pytest.mark.engine
def test_a_batch_cut_by_memory_stays_on_the_grid(rag_prompts):
    # A batch whose logits or padded tokens would pass their budgets is cut into runs of a
    # divisor of the batch size, cell by cell, so shards on the grid see the same groups.
    from llm_parity.engines import hf
    from llm_parity.runner.toymodel import toy_model_dir

    with build_engine("hf", EngineSpec(model=str(toy_model_dir()), dtype="float32",
                                       device="cpu", batch=8)) as engine:
        row = engine.vocab_size * 4
        budget = hf.LOGIT_BUDGET
        try:
            hf.LOGIT_BUDGET = 3 * 10 * row  # three prompts of ten rows each
            by_logits = engine._groups([10] * 25, rows=10)
        finally:
            hf.LOGIT_BUDGET = budget
        by_tokens = engine._groups([10] * 9 + [1500] * 7 + [3000] * 8 + [10])
        shard = engine._groups(([10] * 9 + [1500] * 7 + [3000] * 8 + [10])[8:16])
    assert [len(g) for g in by_logits] == [2] * 12 + [1]
    assert all(g.start % 2 == 0 for g in by_logits)
    # 8 x 10 tokens fit; a cell as wide as 1,500 runs in pairs, 3,000 alone; each cell
    # is cut by its own widest prompt.
    assert [(g.start, len(g)) for g in by_tokens] == (
        [(0, 8), (8, 2), (10, 2), (12, 2), (14, 2)] + [(i, 1) for i in range(16, 25)])
    assert [(g.start + 8, len(g)) for g in shard] == [(8, 2), (10, 2), (12, 2), (14, 2)]
