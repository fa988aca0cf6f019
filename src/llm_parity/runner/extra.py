"""One more prompt through the engines the suite already loaded: the public fixtures'
`parity_compare` helper. No model is loaded a second time; a reference read from a golden
store is built here once, on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llm_parity.compare.answers import check_next_token
from llm_parity.compare.precision import PromptResult, compare_prompts, compare_sequences
from llm_parity.config.prompts import Prompt, PromptSet
from llm_parity.engines.base import build_engine
from llm_parity.errors import ParityInputError

if TYPE_CHECKING:
    from llm_parity.runner.session import ParitySession


def reference_engine(session: ParitySession) -> Any:
    run = session.precision()
    if "reference" not in session.engines:  # the reference came from a golden store
        session.engines["reference"] = build_engine("hf", run.reference_spec)
    return session.engines["reference"]


def candidate_engine(session: ParitySession) -> Any:
    session.precision()
    if "candidate" not in session.engines:
        raise ParityInputError("the candidate engine was not kept open for this run")
    return session.engines["candidate"]


def compare_prompt(session: ParitySession, text: str, *, prompt_id: str = "extra",
                   continuation: int = 0) -> dict[str, PromptResult]:
    """Compare the candidate with the reference on one more prompt: its first generated
    token ("first_token") and, with `continuation` > 0, every position of the reference's
    greedy continuation, teacher-forced ("sequence"). Plain per-position metrics come back;
    no gate is judged."""
    from llm_parity.runner.tokenization import token_text, tokenize_prompts

    run = session.precision()
    prompt = Prompt(prompt_id, text)
    (ids,) = tokenize_prompts(run.tokenizer, PromptSet("extra", "<parity_compare>", (prompt,)))
    reference, candidate = reference_engine(session), candidate_engine(session)
    k, margin = run.precision.k, run.precision.near_tie_margin
    vocab = len(run.tokenizer)
    ref_first = reference.next_token([ids], k)
    cand_first = candidate.next_token([ids], k)
    for role, answer in (("reference", ref_first[0]), ("candidate", cand_first[0])):
        check_next_token(answer, k=k, vocab_size=vocab, where=f"{role}, prompt {prompt_id}")
    decode = lambda token: token_text(run.tokenizer, token)  # noqa: E731
    out = {"first_token": compare_prompts([prompt], [ids], ref_first, cand_first,
                                          near_tie_margin=margin, k=k, decode=decode)[0]}
    if continuation:
        decoded = reference.greedy([ids], continuation, k)
        scored = candidate.score([ids + decoded[0].token_ids], [len(ids) - 1], k)
        out["sequence"] = compare_sequences([prompt], [ids], decoded, scored,
                                            near_tie_margin=margin, k=k, decode=decode)[0]
    return out
