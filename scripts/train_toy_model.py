#!/usr/bin/env python
"""Train the embedded toy model shipped in ``src/llm_parity/data/toy_model/``.

The toy model stands in for PleIAs/Pleias-RAG-350M when no checkpoint is named: same
architecture family (Llama, GQA with two query heads per KV head, RoPE, SiLU, RMSNorm,
tied embeddings), a byte-level BPE tokenizer with Pleias-RAG's special tokens, bf16
weights in one safetensors file, and enough training that its next-token distributions
are peaked in some places and broad in others.

`--family` trains a stand-in for another architecture family on the same corpus and
tokenizer (the packaged toy model's, read rather than trained again), written to
``src/llm_parity/data/families/<family>/``: Qwen3 (qk-norm), Qwen3-MoE (eight routed
experts, top-2, renormalised) and DeepSeek-V2 (multi-head latent attention, one shared and
eight routed experts after a dense first layer). Each is the Llama toy's size or close to
it, so the suite's runs on them cost what the toy's do.

Everything comes from text already on the machine (docstrings of the Python standard
library, read with ``ast`` without importing anything, and the licence texts under
/usr/share/common-licenses), so the script runs offline. It is seeded; rerunning it with
the same Python, torch and tokenizers versions reproduces the checkpoint.

    python scripts/train_toy_model.py [--family F] [--out DIR] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import platform
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "llm_parity" / "data" / "toy_model"
FAMILIES_OUT = REPO / "src" / "llm_parity" / "data" / "families"

# Pleias-style special tokens. Ids 0-3 follow the Pleias layout (bos 1, eos 2); the RAG
# markers are the ones Pleias-RAG models and their Pico predecessors use in prompts.
UNK, BOS, EOS, PAD = "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "[PAD]"
RAG_MARKERS = [
    "<|query_start|>",
    "<|query_end|>",
    "<|source_start|>",
    "<|source_end|>",
    "<|source_id_start|>",
    "<|source_id_end|>",
    "<|source_id|>",
    "<|language_start|>",
    "<|language_end|>",
    "<|query_analysis_start|>",
    "<|query_analysis_end|>",
    "<|query_report_start|>",
    "<|query_report_end|>",
    "<|source_analysis_start|>",
    "<|source_analysis_end|>",
    "<|draft_start|>",
    "<|draft_end|>",
    "<|answer_start|>",
    "<|answer_end|>",
]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *RAG_MARKERS]

VOCAB_SIZE = 4096
SEQ_LEN = 256
LICENSE_DIR = Path("/usr/share/common-licenses")
# Parts of the standard library that are code generators, tests or GUI demos, not prose.
SKIP_TOP = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"}

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # two query heads per KV head, as in Pleias-RAG-350M (16/8)
    head_dim=64,  # a head size vLLM's CPU attention supports
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)

# The stand-ins: the toy's width, depth, heads and tokenizer ids, in each family's layout.
_SHARED = {k: MODEL_CONFIG[k] for k in (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id")}
FAMILY_CONFIGS = {
    "llama": ("LlamaForCausalLM", "llama", MODEL_CONFIG),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(
        _SHARED, intermediate_size=768, num_key_value_heads=2, head_dim=64, hidden_act="silu",
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(
        _SHARED, intermediate_size=768, moe_intermediate_size=128, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_key_value_heads=2, head_dim=64, hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, attention_bias=False, router_aux_loss_coef=0.001,
        output_router_logits=False)),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2", dict(
        _SHARED, intermediate_size=768, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        # vLLM's CPU MLA kernels take a latent plus rotary head of 576 (DeepSeek's own
        # 512 + 64) and no other size.
        norm_topk_prob=False, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=64,
        qk_rope_head_dim=64, v_head_dim=64, num_key_value_heads=4, hidden_act="silu",
        rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, moe_layer_freq=1)),
}


# --------------------------------------------------------------------------- corpus


def _clean(text: str) -> str:
    """Collapse hard-wrapped lines into paragraphs separated by one blank line."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    out = []
    for para in paragraphs:
        para = re.sub(r"\s+", " ", para).strip()
        if para:
            out.append(para)
    return "\n\n".join(out)


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) for documented stdlib modules, classes, functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP_TOP or "tests" in rel.parts or rel.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if child.name.startswith("_"):
                        continue
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and len(doc) >= 60:
                        found.append((name, _clean(doc)))
                    if isinstance(child, ast.ClassDef):
                        visit(child, name)

        doc = ast.get_docstring(tree)
        if doc and len(doc) >= 60:
            found.append((module, _clean(doc)))
        visit(tree, module)
    return found


def license_texts() -> list[tuple[str, str]]:
    if not LICENSE_DIR.is_dir():
        return []
    texts = []
    for path in sorted(LICENSE_DIR.iterdir()):
        if path.is_file() and not path.is_symlink():
            texts.append((path.name, _clean(path.read_text(encoding="utf-8", errors="replace"))))
    return texts


def first_sentence(text: str) -> str:
    para = text.split("\n\n", 1)[0]
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = match.group(1) if match else para
    return sentence[:300]


QUESTIONS = [
    "What does {name} do?",
    "What is {name}?",
    "Explain {name}.",
    "How is {name} used?",
    "Describe {name} briefly.",
]


def rag_example(rng: random.Random, docs: list[tuple[str, str]]) -> str:
    """One document in Pleias-RAG's prompt layout with a short answer drawn from a source.

    The answering source repeats the queried name, so the model can learn to find it and
    copy its first sentence: that gives sharply peaked positions among broad ones.
    """
    n_sources = rng.choice([1, 2, 2, 3, 3, 4])
    picked = rng.sample(docs, n_sources)
    target = rng.randrange(n_sources)
    name, _ = picked[target]
    parts = [f"<|query_start|>{rng.choice(QUESTIONS).format(name=name)}<|query_end|>\n"]
    for i, (src_name, text) in enumerate(picked, 1):
        body = text.split("\n\n", 1)[0][:500]
        parts.append(
            f"<|source_start|><|source_id_start|>{i}<|source_id_end|>"
            f"{src_name}: {body}<|source_end|>\n"
        )
    tid = target + 1
    parts.append(
        f"<|source_analysis_start|>Source {tid} documents {name}.<|source_analysis_end|>\n"
    )
    answer = first_sentence(picked[target][1])
    parts.append(
        f'<|answer_start|>{answer} <ref name="<|source_id|>{tid}">{name}</ref><|answer_end|>'
    )
    return "".join(parts)


def build_corpus(seed: int) -> tuple[list[str], dict]:
    """Return training documents (without BOS/EOS) and a description for training.json."""
    rng = random.Random(seed)
    docs = stdlib_docstrings()
    licenses = license_texts()
    texts = [f"{name}\n\n{text}" for name, text in docs]
    texts += [text for _, text in licenses]
    # Long docs are short enough to sit in a sample; RAG docs use the first paragraph only.
    rag_docs = [(n, t) for n, t in docs if len(first_sentence(t)) >= 20]
    n_rag = len(texts)
    rag = [rag_example(rng, rag_docs) for _ in range(n_rag)]
    corpus = texts + rag
    rng.shuffle(corpus)
    info = {
        "sources": [
            f"docstrings of the Python {platform.python_version()} standard library "
            f"(modules, public classes and functions; read with ast, nothing imported)",
            f"licence texts under {LICENSE_DIR}",
            "synthetic Pleias-RAG-layout documents built from those docstrings: a query, "
            "1-4 numbered sources, a source analysis and an answer copying the right source",
        ],
        "docstrings": len(docs),
        "licences": len(licenses),
        "rag_documents": n_rag,
        "characters": sum(len(t) for t in corpus),
    }
    return corpus, info


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The RAG markers are added tokens, so strip them out of the text BPE learns from.
    marker = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator((marker.sub(" ", t) for t in corpus), trainer=trainer)
    # Prepend BOS the way Llama 3 style tokenizers do, so every prompt starts with it.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=RAG_MARKERS,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    # Spell the BOS behaviour out for readers and for older transformers releases.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, tokenizer_class="PreTrainedTokenizerFast")
    # transformers 5 writes the markers as a list under a key that 4.x reads as a mapping.
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", RAG_MARKERS)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": RAG_MARKERS,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------- model


def make_batches(ids, seq_len: int, batch: int, steps: int, seed: int):
    """Random windows of the packed token stream, from a seeded generator.

    The model shifts labels itself, so a window serves as both input and target.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    stream = torch.tensor(ids, dtype=torch.long)
    hi = len(stream) - seq_len
    for _ in range(steps):
        starts = torch.randint(0, hi, (batch,), generator=gen)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def _warm_start(model) -> int:
    """Start a stand-in from the trained Llama toy where the two agree: every tensor of the
    same name and shape (the embedding, the norms, attention projections of the same
    layout, a dense MLP) is copied, the rest (qk-norm, experts, routers, latent
    projections) starts from its initialisation. A few hundred steps then give peaked
    distributions that training from nothing needs the toy's whole run for."""
    import torch
    from safetensors.torch import load_file

    toy = load_file(str(DEFAULT_OUT / "model.safetensors"))
    copied = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            source = toy.get(name)
            if source is not None and tuple(source.shape) == tuple(parameter.shape):
                parameter.copy_(source.float())
                copied += parameter.numel()
    print(f"warm start: {copied:,} parameters from the toy model", flush=True)
    return copied


def train_model(ids: list[int], args) -> tuple[object, dict]:
    import torch
    import transformers

    torch.manual_seed(args.seed)
    architecture, model_type, settings = FAMILY_CONFIGS[args.family]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config)
    warm = _warm_start(model) if args.family != "llama" else 0
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    # Hold out the last 2% of the stream to report a loss on text the model has not seen.
    split = int(len(ids) * 0.98)
    train_ids, val_ids = ids[:split], ids[split:]
    losses: list[float] = []
    t0 = time.time()
    for step, batch in enumerate(
        make_batches(train_ids, SEQ_LEN, args.batch, args.steps, args.seed)
    ):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # bf16 autocast: the CPU here has AMX; the master weights stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch, labels=batch)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            recent = sum(losses[-25:]) / len(losses[-25:])
            print(
                f"step {step:5d}  loss {recent:.3f}  lr {lr_at(step):.2e}  "
                f"{time.time() - t0:6.0f}s",
                flush=True,
            )
    wall = time.time() - t0

    model.eval()
    with torch.no_grad():
        val = [b for b in make_batches(val_ids, SEQ_LEN, 8, 8, args.seed + 1)]
        val_loss = sum(model(input_ids=b, labels=b).loss.item() for b in val) / len(val)
    stats = {
        "parameters": n_params,
        "warm_started_parameters": warm,
        "steps": args.steps,
        "batch_size": args.batch,
        "sequence_length": SEQ_LEN,
        "tokens_seen": args.steps * args.batch * SEQ_LEN,
        "learning_rate": args.lr,
        "schedule": "AdamW betas (0.9, 0.95), weight decay 0.1, 5% warmup, cosine to 10%",
        "precision": "bf16 autocast, float32 master weights; saved as bf16",
        "final_train_loss": round(sum(losses[-25:]) / len(losses[-25:]), 4),  # last 25 steps
        # last 2% of the packed stream, float32 weights (before the bf16 cast)
        "heldout_loss_fp32": round(val_loss, 4),
        "train_wall_seconds": round(wall, 1),
    }
    return model, stats


def save_model(model, out: Path) -> None:
    import torch

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config.bos_token_id = MODEL_CONFIG["bos_token_id"]
    model.generation_config.eos_token_id = MODEL_CONFIG["eos_token_id"]
    model.generation_config.pad_token_id = MODEL_CONFIG["pad_token_id"]
    model.save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    # Legacy keys as well, so transformers 4.51 (the founding environment) reads the same
    # dtype and RoPE base that transformers 5 keeps under new names.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta",
                                                                MODEL_CONFIG["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default="llama")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.family == "llama" else FAMILIES_OUT / args.family

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)

    t_start = time.time()
    corpus, corpus_info = build_corpus(args.seed)
    print(f"corpus: {len(corpus)} documents, {corpus_info['characters']:,} characters", flush=True)
    if args.family == "llama":
        tok = train_tokenizer(corpus)
    else:  # the stand-ins share the toy model's tokenizer
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(DEFAULT_OUT / "tokenizer.json"))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(corpus, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    corpus_info["tokens"] = len(ids)
    print(f"tokens: {len(ids):,}", flush=True)

    model, stats = train_model(ids, args)

    # Overwrite our own files only: --out may point at a directory holding other things.
    args.out.mkdir(parents=True, exist_ok=True)
    if args.family == "llama":
        save_tokenizer(tok, args.out)
    save_model(model, args.out)
    provenance = {
        "script": "scripts/train_toy_model.py",
        "family": args.family,
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "corpus": corpus_info,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": SPECIAL_TOKENS,
        },
        "training": stats,
        "total_wall_seconds": round(time.time() - t_start, 1),
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (args.out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
