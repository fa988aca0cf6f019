"""A team's own precision checks, written with llm-parity's public fixtures."""

import pytest


@pytest.mark.precision
def test_a_domain_prompt_stays_within_bf16_noise(parity_compare):
    # One prompt of your own, compared on the engines the suite loaded: the first generated
    # token, then 8 positions of the reference's continuation, teacher-forced.
    result = parity_compare("Which passage answers the question about retrieval?",
                            prompt_id="domain-1", continuation=8)
    first = result["first_token"].positions[0].comparison
    assert first.kl < 0.01
    assert max(p.comparison.kl for p in result["sequence"].positions) < 0.05


@pytest.mark.precision
def test_the_worst_prompt_of_the_run_is_named(parity_run):
    worst = max(parity_run.precision.prompts, key=lambda p: p.first.comparison.kl)
    assert worst.first.comparison.kl < 0.01, f"{worst.prompt.id} drifts"


@pytest.mark.precision
def test_the_candidate_answers_token_ids_directly(parity_candidate, parity_reference):
    ids = [1, 20, 300, 40]
    (cand,) = parity_candidate.next_token([ids], 5)
    (ref,) = parity_reference.next_token([ids], 5)
    assert int(cand.token_ids[0]) == int(ref.token_ids[0])
