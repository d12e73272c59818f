"""Reading labels out of answers and token log-probabilities: exact values, and refusals with reasons."""

from __future__ import annotations

import math

import pytest

from protege.teachers.parse import ParseError, TokenStep, distribution_from_logprobs, parse_label, split_rationale

LABELS = ("billing", "shipping", "account")
ln = math.log


@pytest.mark.parametrize(
    "answer, label",
    [
        ("billing", "billing"),
        ("  Billing.\n", "billing"),
        ('"SHIPPING"', "shipping"),
        ("**account**", "account"),
        ("The label is shipping.", "shipping"),
    ],
)
def test_parse_label_accepts_one_label(answer, label):
    assert parse_label(answer, LABELS) == label


def test_parse_label_refuses_none_or_several_with_the_reason():
    with pytest.raises(ParseError, match="names none of the labels") as e:
        parse_label("I am not sure.", LABELS)
    assert e.value.raw == "I am not sure."
    with pytest.raises(ParseError, match="several labels"):
        parse_label("billing or shipping", LABELS)
    # a label inside another word is not a mention
    with pytest.raises(ParseError):
        parse_label("accounting", LABELS)


def test_parse_label_prefers_whole_words_for_nested_labels():
    assert parse_label("pos", ("pos", "positive")) == "pos"
    assert parse_label("It is positive", ("pos", "positive")) == "positive"


def test_split_rationale_takes_the_last_answer_line():
    text = "The customer mentions an answer: refunds.\nSo it is about money.\nAnswer: billing"
    why, answer, offset = split_rationale(text)
    assert answer == "billing" and text[offset:] == "billing"
    assert why == "The customer mentions an answer: refunds.\nSo it is about money."
    assert split_rationale("Because.\n**Final answer:** shipping")[1] == "shipping"
    with pytest.raises(ParseError, match="no final line"):
        split_rationale("billing, I think")


def _steps(*positions):
    """positions: (generated token, {alternative: probability})."""
    return [TokenStep(tok, ln(top[tok]), {a: ln(p) for a, p in top.items()}) for tok, top in positions]


def test_variants_of_a_label_are_summed_and_uncovered_mass_is_reported():
    steps = _steps(("billing", {"billing": 0.5, " Billing": 0.1, "Shipping": 0.2, "The": 0.15, "I": 0.05}))
    d = distribution_from_logprobs(steps, LABELS)
    assert d.method == "label_logprobs"
    assert d.covered_mass == pytest.approx(0.8)
    assert d.probs == pytest.approx((0.6 / 0.8, 0.2 / 0.8, 0.0))
    assert d.top == "billing"


def test_short_prefix_off_the_path_is_not_counted_but_a_long_one_is():
    steps = _steps(("Ship", {"Ship": 0.6, "A": 0.2, "Bill": 0.1, "x": 0.1}), ("ping", {"ping": 0.9, "ment": 0.1}))
    d = distribution_from_logprobs(steps, LABELS)
    # 'Ship' is on the generated path; 'Bill' spells 4 characters of billing; 'A' is probably the article.
    assert d.covered_mass == pytest.approx(0.7)
    assert d.probs == pytest.approx((0.1 / 0.7, 0.6 / 0.7, 0.0))


def test_shared_prefix_is_followed_down_the_generated_path():
    labels = ("cancel order", "cancel subscription", "other")
    steps = _steps(
        ("cancel", {"cancel": 0.8, "other": 0.2}),
        (" subscription", {" subscription": 0.75, " order": 0.25}),
    )
    d = distribution_from_logprobs(steps, labels)
    assert d.covered_mass == pytest.approx(1.0)
    assert d.probs == pytest.approx((0.8 * 0.25, 0.8 * 0.75, 0.2))


def test_answer_position_after_a_rationale_and_leading_decoration():
    text_tokens = [("Because", {"Because": 1.0}), (" money", {" money": 1.0}), (".\n", {".\n": 1.0}),
                   ("Answer", {"Answer": 1.0}), (":", {":": 1.0}), (" **", {" **": 0.9, " billing": 0.1}),
                   ("billing", {"billing": 0.7, "account": 0.3})]
    steps = _steps(*text_tokens)
    text = "".join(s.token for s in steps)
    _, answer, offset = split_rationale(text)
    assert answer == "billing"
    d = distribution_from_logprobs(steps, LABELS, offset)
    assert d.probs == pytest.approx((0.7, 0.0, 0.3))


def test_no_label_at_the_answer_position_is_a_parse_error():
    steps = _steps(("The", {"The": 0.9, "It": 0.1}))
    with pytest.raises(ParseError, match="no label among the top alternatives") as e:
        distribution_from_logprobs(steps, LABELS)
    assert e.value.raw == "The"
