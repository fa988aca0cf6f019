#!/usr/bin/env python
"""Build the packaged long-context RAG prompt set ``src/llm_parity/data/prompts/rag_long.json``.

Each prompt follows the layout the toy model was trained on (``scripts/train_toy_model.py``):
a query, several numbered sources, and the source-analysis marker, where the model starts
writing. Lengths spread from about 300 to about 1900 tokens of the toy tokenizer (BOS
included), leaving room for a 64-token continuation inside the 2048 positions.

The sources are sections of the Python Language Reference and Library Reference that ship
offline with the interpreter as ``pydoc_data/topics.py`` (read with ``ast``, nothing
imported). The toy model was trained on docstrings and licence texts only, so this text is
held out. The script is seeded; rerunning it with the same Python and tokenizer reproduces
the file byte for byte.

    python scripts/make_rag_long.py [--out PATH] [--seed S]
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "llm_parity" / "data" / "prompts" / "rag_long.json"
TOKENIZER_DIR = REPO / "src" / "llm_parity" / "data" / "toy_model"

# Prompt lengths in tokens (BOS included): the filler stays at or a little under each,
# and the last leaves 148 of 2048 positions free for the continuation.
TARGET_TOKENS = (340, 530, 760, 990, 1220, 1450, 1680, 1900)
# A prompt may end this far under its target; further below, one more section is retrieved.
SLACK_TOKENS = 40
# More sources as the context grows, as a retriever with a larger budget would return.
SOURCES_PER_PROMPT = (2, 3, 3, 4, 4, 5, 6, 6)

# The question templates of the training script, so the query reads as the model expects.
QUESTIONS = [
    "What does {name} do?",
    "What is {name}?",
    "Explain {name}.",
    "How is {name} used?",
    "Describe {name} briefly.",
]

_UNDERLINE = re.compile(r"^[*=\-^~\"]{3,}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def topics_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"


def read_topics(path: Path) -> dict[str, str]:
    """The ``topics`` dict of pydoc_data, as literals from the syntax tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}: no 'topics' assignment found")


def paragraphs(text: str) -> tuple[str, list[str]]:
    """(heading, paragraphs) of one topic: headings and grammar rules dropped, lines joined.

    Whitespace inside a paragraph is collapsed the way the training corpus was cleaned.
    """
    heading = text.strip().splitlines()[0].strip()
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        # A heading is a line followed by its underline; both go.
        if len(lines) == 2 and _UNDERLINE.match(lines[1].strip()):
            continue
        if any(_UNDERLINE.match(ln.strip()) for ln in lines) or "::=" in block:
            continue
        para = re.sub(r"\s+", " ", block).strip()
        if len(para) >= 10:
            out.append(para)
    return heading, out


def question_name(heading: str) -> str:
    """'The "assert" statement' reads better mid-sentence as 'the "assert" statement'."""
    return "the" + heading[3:] if heading.startswith("The ") else heading


def render(query: str, sources: list[tuple[str, list[str]]]) -> str:
    """The training layout up to and including the marker after which the model writes."""
    parts = [f"<|query_start|>{query}<|query_end|>\n"]
    for i, (name, paras) in enumerate(sources, 1):
        body = "\n\n".join(paras)
        parts.append(
            f"<|source_start|><|source_id_start|>{i}<|source_id_end|>{name}: {body}<|source_end|>\n"
        )
    parts.append("<|source_analysis_start|>")
    return "".join(parts)


def build_prompt(rng, tokenizer, pool: list, n_sources: int, target: int) -> tuple[str, int, int]:
    """Fill sources paragraph by paragraph, round robin, up to ``target`` tokens.

    Takes ``n_sources`` sections off the front of ``pool``, and more when short sections run
    out of paragraphs before the target is reached.
    """

    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    picked = [pool.pop(0) for _ in range(n_sources)]
    answer = rng.randrange(n_sources)
    name, _ = picked[answer]
    query = rng.choice(QUESTIONS).format(name=question_name(name))
    chosen: list[tuple[str, list[str]]] = [(heading, []) for heading, _ in picked]
    pending = [list(paras) for _, paras in picked]
    open_sources = list(range(n_sources))
    while open_sources or length(render(query, chosen)) < target - SLACK_TOKENS:
        if not open_sources:
            # Every open section ran out of paragraphs well below the target: retrieve one more.
            heading, paras = pool.pop(0)
            chosen.append((heading, []))
            pending.append(list(paras))
            open_sources.append(len(chosen) - 1)
        for i in list(open_sources):
            if not pending[i]:
                open_sources.remove(i)
                continue
            para = pending[i].pop(0)
            chosen[i][1].append(para)
            if length(render(query, chosen)) <= target:
                continue
            # Too long: keep the longest run of whole sentences that still fits, then close.
            chosen[i][1].pop()
            sentences = _SENTENCE_END.split(para)[:-1]
            while sentences:
                chosen[i][1].append(" ".join(sentences))
                if length(render(query, chosen)) <= target:
                    break
                chosen[i][1].pop()
                sentences.pop()
            open_sources.remove(i)
    if not chosen[answer][1]:
        raise SystemExit(f"target {target}: no room for the answering source; change the seed")
    # A section that got no text in before the target was reached was not retrieved after all.
    chosen = [source for source in chosen if source[1]]
    prompt = render(query, chosen)
    return prompt, len(chosen), length(prompt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=2048)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    path = topics_path()
    by_heading: dict[str, list[str]] = {}
    topic_texts = read_topics(path)
    for key in sorted(topic_texts):
        heading, paras = paragraphs(topic_texts[key])
        # Two keys share a section ("if" and "else"); one copy is enough.
        if len(paras) >= 2 and heading not in by_heading:
            by_heading[heading] = paras
    topics = sorted(by_heading.items())

    rng = random.Random(args.seed)
    # Each section serves one prompt only, so the set covers as much text as it can.
    rng.shuffle(topics)
    prompts, counts, lengths = [], [], []
    for number, (target, n_sources) in enumerate(zip(TARGET_TOKENS, SOURCES_PER_PROMPT), 1):
        prompt, sources, tokens = build_prompt(rng, tokenizer, topics, n_sources, target)
        prompts.append({"id": f"long-{number:02d}", "prompt": prompt})
        counts.append(sources)
        lengths.append(tokens)
        print(f"long-{number:02d}: {sources} sources, {tokens} tokens", flush=True)

    data = {
        "name": "rag_long",
        "description": (
            f"{len(prompts)} long-context prompts in the toy model's Pleias-RAG layout (query, "
            f"{min(counts)}-{max(counts)} numbered sources, then <|source_analysis_start|>, "
            f"where the model writes), {min(lengths)} to {max(lengths)} tokens of the toy "
            "tokenizer, BOS included. Sources: sections of the "
            f"Python Language and Library Reference shipped offline as pydoc_data/topics.py "
            f"of Python {platform.python_version()}, text the toy model was not trained on. "
            f"Built by scripts/make_rag_long.py --seed {args.seed}."
        ),
        "prompts": prompts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
