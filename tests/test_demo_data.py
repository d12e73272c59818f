"""The demo's synthetic tickets: deterministic, balanced, distinct, a held-out file from templates the training file
never uses, and the shares of short, long, two-topic and mistyped tickets the generator promises."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from protege.demo_data import (
    CORES,
    HELD_OUT_SHARE,
    LABELS,
    SHARES,
    demo_tickets,
    make_examples,
    make_tickets,
    sentence_count,
    split_pools,
    write_demo_data,
)
from protege.errors import ProtegeError


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo():
    return demo_tickets(500, 120, seed=0)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    paths = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        paths[run] = (tmp_path / run / "train.jsonl", tmp_path / run / "held.jsonl")
        write_demo_data(*paths[run], n_train=60, n_eval=25, seed=seed)
    for i in range(2):
        assert paths["a"][i].read_bytes() == paths["b"][i].read_bytes()
        assert paths["a"][i].read_bytes() != paths["c"][i].read_bytes()
    assert make_examples(40, seed=3) == make_examples(40, seed=3) != make_examples(40, seed=4)


def test_files_have_distinct_ids_and_texts_every_label_balanced(tmp_path):
    train_p, held_p = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    write_demo_data(train_p, held_p, n_train=500, n_eval=120, seed=0)
    train, held = _read(train_p), _read(held_p)
    assert len(train) == 500 and len(held) == 120
    assert all(set(r) == {"id", "text", "label"} for r in train + held)
    ids = [r["id"] for r in train + held]
    assert len(set(ids)) == len(ids)  # also across the files: the loader refuses a held-out id it trains on
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert Counter(r["label"] for r in train) == dict.fromkeys(LABELS, 100)
    assert Counter(r["label"] for r in held) == dict.fromkeys(LABELS, 24)
    rows = make_examples(123, seed=2)  # not a multiple of 5: labels differ by at most one row
    assert len({r["id"] for r in rows}) == len({r["text"] for r in rows}) == 123
    assert sorted(Counter(r["label"] for r in rows).values()) == [24, 24, 25, 25, 25]


def test_held_out_shares_no_template_with_training(demo):
    train, held = demo
    train_parts = {p for t in train for p in t.parts}
    held_parts = {p for t in held for p in t.parts}
    assert train_parts and held_parts and not train_parts & held_parts
    assert not {t.template for t in train} & {t.template for t in held}
    train_pools, held_pools = split_pools(0)
    for label in LABELS:
        n_train, n_held = len(train_pools.ids[label]), len(held_pools.ids[label])
        assert not train_pools.ids[label] & held_pools.ids[label]
        assert abs(n_held / (n_train + n_held) - HELD_OUT_SHARE) < 0.03
    # every label-specific fragment in a ticket comes from its own file's pool
    assert all(p in train_pools.ids[p.split("/")[0]] for p in train_parts)
    assert all(p in held_pools.ids[p.split("/")[0]] for p in held_parts)
    # the held-out file still covers many templates per label, so its score is not a few templates' luck
    per_label = Counter(t.template.split("/")[0] for t in {t.template: t for t in held}.values())
    assert min(per_label.values()) >= 8


@pytest.mark.parametrize("n", [100, 500])
def test_shares_are_what_the_generator_promises(n):
    tickets = make_tickets(n, seed=0)
    for label in LABELS:
        mine = [t for t in tickets if t.label == label]
        count = len(mine)
        shapes = Counter(t.shape for t in mine)
        assert shapes["short"] == round(count * SHARES["short"])
        assert shapes["long"] == round(count * SHARES["long"])
        not_short = count - shapes["short"]
        assert sum(t.secondary is not None for t in mine) == round(not_short * SHARES["two_topic"])
        assert sum(t.typo for t in mine) == round(count * SHARES["typo"])
    for t in tickets:
        assert (t.text != t.clean) == t.typo  # a mistyped ticket really differs from its clean form
        words = len(t.clean.split())
        if t.shape == "short":
            assert words <= 8 and t.secondary is None
        if t.shape == "long":
            assert sentence_count(t.clean) >= 3 and words >= 15
        # a second topic is either written into the core ("technical>The app crashed ... two charges") or a
        # mention of another label's topic; a one-topic ticket has neither
        core = CORES[t.label][int(t.template.split("/c")[1])] if "/c" in t.template else ""
        mentions = [p for p in t.parts if "/m" in p]
        if t.secondary is None:
            assert ">" not in core and not mentions
        else:
            assert t.secondary in LABELS and t.secondary != t.label
            assert core.startswith(f"{t.secondary}>") != bool(mentions)  # exactly one of the two
            assert all(p.startswith(f"{t.secondary}/") for p in mentions)


KEYWORDS = {  # each label's obvious words
    label: re.compile(words, re.IGNORECASE)
    for label, words in {
        "billing": r"charg|refund|invoice|\bbill|payment|\bpa(y|id)\b|price|fee\b|receipt",
        "shipping": r"deliver|parcel|package|ship|tracking|courier|arriv",
        "technical": r"\bapp\b|error|crash|website|\bsite\b|\bpage\b|bug|load",
        "account": r"account|password|e-?mail|username|profile|log ?in|sign.?in|two-factor|2fa",
        "cancellation": r"cancel|subscri|renew|\bclose|membership",
    }.items()
}


def test_tickets_are_not_one_keyword_each():
    """A good share of tickets has none of its label's obvious words, and many carry another label's."""
    tickets = make_tickets(500, seed=0)
    without = sum(not KEYWORDS[t.label].search(t.text) for t in tickets) / len(tickets)
    foreign = sum(any(KEYWORDS[x].search(t.text) for x in LABELS if x != t.label) for t in tickets)
    assert without > 0.2 and foreign / len(tickets) > 0.2
    assert len({t.text.split(" ")[0].lower() for t in tickets}) > 40  # tickets do not all start alike


def test_write_creates_missing_folders_replaces_old_files_and_leaves_no_temporary(tmp_path):
    train_p, held_p = tmp_path / "a" / "b" / "train.jsonl", tmp_path / "c" / "held.jsonl"
    held_p.parent.mkdir()
    held_p.write_text("stale\n" * 1000)
    write_demo_data(train_p, held_p, n_train=30, n_eval=10, seed=0)
    assert len(_read(train_p)) == 30 and len(_read(held_p)) == 10
    assert sorted(p.name for p in held_p.parent.iterdir()) == ["held.jsonl"]

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "held.jsonl").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_demo_data(blocked / "train.jsonl", blocked / "held.jsonl", n_train=30, n_eval=10, seed=0)
    assert not any(p.name.endswith(".tmp") for p in blocked.iterdir())


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ProtegeError, match="n_eval=3 cannot cover the 5 labels"):
        demo_tickets(50, 3, seed=0)
    with pytest.raises(ProtegeError, match="ask for 0 or more"):
        make_examples(-1)
    assert make_examples(0) == []
