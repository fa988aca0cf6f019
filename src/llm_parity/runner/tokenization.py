"""Tokenizing the prompt set once, and proving the candidate would see the same ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_parity.config.prompts import PromptSet


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def tokenize_prompts(tokenizer: Any, prompts: PromptSet) -> list[list[int]]:
    """The ids both engines score: the tokenizer's own special tokens (BOS) included."""
    return [list(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts.prompts]


def check_same_tokenization(
    reference: Any, candidate: Any, prompts: PromptSet, reference_ids: list[list[int]]
) -> None:
    """Refuse a candidate checkpoint whose tokenizer would turn the prompts into other ids."""
    from llm_parity.errors import ParityInputError

    if len(reference) != len(candidate):
        raise ParityInputError(
            f"the candidate's tokenizer has {len(candidate)} tokens, the reference's "
            f"{len(reference)}: the two checkpoints do not share a tokenizer"
        )
    for prompt, ids in zip(prompts.prompts, reference_ids):
        other = list(candidate(prompt.text, add_special_tokens=True)["input_ids"])
        if other != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
            raise ParityInputError(
                f"prompt {prompt.id}: the candidate's tokenizer gives other token ids than the "
                f"reference's, first at index {at} (reference {ids[at:at + 3]}, candidate "
                f"{other[at:at + 3]}): the two checkpoints do not share a tokenizer"
            )


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as a reader should see it: quoted, with control characters escaped."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if "\ufffd" in text:  # a lone byte of a multi-byte character: show the token itself
        text = tokenizer.convert_ids_to_tokens(int(token_id))
    return repr(text)
