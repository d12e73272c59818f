"""Transfer-set augmentation (Tang et al. 2019): new texts made from the training rows are distinct, seeded, do
what each setting says, and are labelled through the same store, cache, budget cap and dry-run estimate as any
row; the evaluation split is never augmented. Paraphrases come from an API teacher as cached, costed calls."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import asks, n_calls, sql, stored_calls, write_jsonl

from protege.demo_data import LABELS, make_examples
from protege.errors import BudgetReached, ProtegeError
from protege.labeling.augment import (
    _WORDS,
    augment_texts,
    paraphrase_request,
    student_mask_token,
    student_neighbours,
    word_neighbours,
)
from protege.labeling.data import Example, load_splits
from protege.labeling.labeler import estimate, label
from protege.recipe import AugmentConfig, load_recipe
from protege.teachers.base import Price

ROWS = [Example(f"r{i}", r["text"], r["label"], f"data.jsonl:{i + 1}") for i, r in enumerate(make_examples(30, seed=3))]


def _cfg(**kw) -> AugmentConfig:
    return AugmentConfig(**{"per_text": 3, "mask_p": 0.0, "replace_p": 0.0, "ngram_p": 0.0, **kw})


def _runs(text: str) -> list[str]:
    return re.findall(rf"{_WORDS}|\W+", text)


def _is_word(run: str) -> bool:
    return re.match(r"\w", run) is not None


# -- the texts ---------------------------------------------------------------------------------------------
def test_new_texts_are_distinct_seeded_by_row_and_never_an_original():
    cfg = AugmentConfig(per_text=4)  # the defaults: mask 0.1, replace 0.1, n-gram 0.25
    made = augment_texts(ROWS, cfg, seed=0, mask_token="[MASK]")
    assert len(made) == 4 * len(ROWS)
    assert [e.id for e in made] == [f"r{i}~aug{j}" for i in range(len(ROWS)) for j in range(4)]
    assert [e.source for e in made] == [f"r{i}" for i in range(len(ROWS)) for _ in range(4)]
    assert all(e.gold is None and e.where == ROWS[int(e.source[1:])].where for e in made)
    texts = [e.text for e in made]
    assert len(set(texts)) == len(texts) and set(texts).isdisjoint(e.text for e in ROWS)
    assert augment_texts(ROWS, cfg, seed=0, mask_token="[MASK]") == made  # a rerun makes the same texts
    other = augment_texts(ROWS, cfg, seed=1, mask_token="[MASK]")
    assert sum(a.text != b.text for a, b in zip(made, other)) > len(made) // 2
    # a row's draws depend on its id and the seed, not on which rows come before it (swaps aside: they draw from
    # the words of all the rows given)
    cfg = _cfg(mask_p=0.2, ngram_p=0.3)
    assert augment_texts(ROWS[5:], cfg, seed=0, mask_token="[MASK]")[:3] == augment_texts(ROWS, cfg, 0, "[MASK]")[15:18]


def test_mask_p_1_masks_every_word_and_keeps_the_rest():
    made = augment_texts(ROWS, _cfg(mask_p=1.0), seed=0, mask_token="<mask>")
    # one text per row is all there is to make: every word masked
    assert [e.source for e in made] == [e.id for e in ROWS]
    for src, e in zip(ROWS, made):
        assert e.text == "".join("<mask>" if _is_word(r) else r for r in _runs(src.text)).strip()


def test_replace_p_1_swaps_every_word_for_a_corpus_word_of_the_same_shape():
    from protege.labeling.augment import _shape

    corpus = {w for e in ROWS for w in re.findall(_WORDS, e.text)}
    made = augment_texts(ROWS, _cfg(replace_p=1.0), seed=0, mask_token="[MASK]")
    assert len(made) == 3 * len(ROWS)
    changed = total = 0
    for e in made:
        src, new = _runs(ROWS[int(e.source[1:])].text), _runs(e.text)
        src_words = [r for r in src if _is_word(r)]
        new_words = [r for r in new if _is_word(r)]
        assert [r for r in new if not _is_word(r)] == [r for r in src if not _is_word(r)][: len(new) - len(new_words)]
        assert len(new_words) == len(src_words) and set(new_words) <= corpus
        assert [_shape(w) for w in new_words] == [_shape(w) for w in src_words]
        for a, b in zip(src_words, new_words):
            changed += a != b
            total += 1
            if _shape(a) is None:
                assert a == b  # a mixed word ("I'm", "A1") has no shape to match and is kept
    assert changed > 0.8 * total


def test_ngram_p_1_cuts_each_text_to_one_to_five_consecutive_words():
    made = augment_texts(ROWS, _cfg(ngram_p=1.0), seed=0, mask_token="[MASK]")
    assert len(made) == 3 * len(ROWS)
    for e in made:
        src = ROWS[int(e.source[1:])]
        n = len(re.findall(_WORDS, e.text))
        assert 1 <= n <= 5 and e.text in src.text and n < len(re.findall(_WORDS, src.text))


def test_ngram_max_makes_longer_spans_of_consecutive_words_up_to_it():
    long_rows = [Example(f"l{i}", " ".join(f"w{i}x{j}" for j in range(30)), None, "x") for i in range(20)]
    made = augment_texts(long_rows, _cfg(ngram_p=1.0, ngram_max=12), seed=0, mask_token="[MASK]")
    lengths = [len(re.findall(_WORDS, e.text)) for e in made]
    assert len(made) == 3 * len(long_rows) and max(lengths) <= 12
    assert sum(n > 5 for n in lengths) > len(made) // 3  # 1 to 12 words, uniform: 7 in 12 are past Tang's 5
    assert all(e.text in long_rows[int(e.source[1:])].text for e in made)
    # the default stays Tang et al.'s 5
    assert made != augment_texts(long_rows, _cfg(ngram_p=1.0), seed=0, mask_token="[MASK]")
    assert max(len(re.findall(_WORDS, e.text))
               for e in augment_texts(long_rows, _cfg(ngram_p=1.0, ngram_max=5), 0, "[MASK]")) == 5


def test_fewer_texts_only_when_no_new_one_can_be_made():
    one = [Example("a", "refund", None, "x"), Example("b", "please refund my order", None, "x")]
    assert augment_texts(one[:1], _cfg(ngram_p=1.0), 0, "[MASK]") == []  # a one-word text has no shorter n-gram
    assert [e.text for e in augment_texts(one[:1], _cfg(mask_p=1.0), 0, "[MASK]")] == ["[MASK]"]
    swapped = augment_texts(one, _cfg(replace_p=1.0), 0, "[MASK]")
    assert sorted(e.text for e in swapped if e.source == "a") == ["my", "order", "please"]  # the other lowercase words
    # a text the caller says to avoid (a held-out text) is never made
    avoided = augment_texts(one, _cfg(replace_p=1.0), 0, "[MASK]", avoid=["please", "order"])
    assert [e.text for e in avoided if e.source == "a"] == ["my"]
    with pytest.raises(ProtegeError, match="mask_p, replace_p and ngram_p are all 0"):
        augment_texts(one, _cfg(), 0, "[MASK]")
    assert augment_texts(one, _cfg(per_text=0, mask_p=1.0), 0, "[MASK]") == []


def test_the_mask_token_is_the_student_tokenizers(tmp_path, tiny_tokenizer, tiny_recipe):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.add_special_tokens({"mask_token": "<mask>"})
    tok.save_pretrained(tmp_path / "masked")
    recipe = load_recipe(tiny_recipe)
    assert student_mask_token(recipe.model_copy(update={"student": recipe.student.model_copy(
        update={"model": str(tmp_path / "masked")})})) == "<mask>"  # fmt: skip
    assert student_mask_token(recipe) == "[MASK]"  # the tiny student's tokenizer has none
    with pytest.raises(ProtegeError, match="data.augment.mask_p: 0"):
        student_mask_token(recipe.model_copy(update={"student": recipe.student.model_copy(
            update={"model": str(tmp_path)})}))  # fmt: skip


def _table_with(tokenizer, near: dict[str, list[str]]):
    """A word-embedding table (vocab x 8) in which each key's row is close to its listed words, nearest first, and
    every other row points its own way."""
    import torch

    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(tokenizer), 8, generator=g)
    vocab = tokenizer.get_vocab()
    for word, others in near.items():
        w = table[vocab[word]]
        d = torch.randn(8, generator=g)
        d -= (d @ w) / (w @ w) * w  # across w: the further along d, the lower the cosine to w
        for rank, other in enumerate(others):
            table[vocab[other]] = w + 0.1 * (rank + 1) * d
    return table


def test_word_neighbours_are_the_nearest_whole_words_in_the_table_never_the_word(tiny_tokenizer):
    table = _table_with(tiny_tokenizer, {"refund": ["charge", "invoice", "payment"]})
    assert "xyzzy" not in tiny_tokenizer.get_vocab() and "268" in tiny_tokenizer.get_vocab()
    near = word_neighbours(["refund", "refund", "xyzzy", "268", "refund?"], tiny_tokenizer, table, k=3)
    assert near == {"refund": ("charge", "invoice", "payment")}  # none for an unknown word, digits, punctuation
    special = set(tiny_tokenizer.all_special_tokens)
    assert not special & set(word_neighbours(["refund"], tiny_tokenizer, table, k=len(tiny_tokenizer))["refund"])
    assert word_neighbours([], tiny_tokenizer, table, k=3) == {}


def test_replace_with_neighbours_swaps_in_the_words_neighbours_in_its_shape():
    rows = [Example("a", "Refund my order", None, "x"), Example("b", "cancel the ORDER", None, "x")]
    near = {"Refund": ("charge", "invoice"), "order": ("purchase",), "ORDER": ("purchase",)}
    cfg = _cfg(replace_p=1.0, replace_with="neighbours", per_text=2)
    made: dict[str, list[list[str]]] = {e.id: [] for e in rows}
    for e in augment_texts(rows, cfg, 0, "[MASK]", neighbours=near):
        made[e.source].append(e.text.split())
    for a, my, b in made["a"]:
        assert a in ("Charge", "Invoice") and b == "purchase" and my in ("my", "cancel", "the")  # my: no neighbours
    assert all(w[2] == "PURCHASE" for w in made["b"])
    with pytest.raises(ValueError, match="student_neighbours"):
        augment_texts(rows, cfg, 0, "[MASK]")


def test_student_neighbours_come_from_the_student_models_table_and_a_bad_model_is_refused(tiny_recipe, tmp_path):
    recipe = _augmented_recipe(tiny_recipe, per_text=2, replace_with="neighbours")
    near = student_neighbours(recipe, ["refund my order please"])
    assert set(near) == {"refund", "my", "order", "please"} and all(len(v) == 10 for v in near.values())
    broken = recipe.model_copy(update={"student": recipe.student.model_copy(update={"model": str(tmp_path)})})
    with pytest.raises(ProtegeError, match="replace_with: corpus"):
        student_neighbours(broken, ["refund"])


# -- labeling ----------------------------------------------------------------------------------------------
def _augmented_recipe(path, **augment):
    data = yaml.safe_load(path.read_text())
    data["data"]["augment"] = augment
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_label_adds_augmented_rows_to_training_only_estimated_first_and_cached_on_rerun(tiny_recipe):
    recipe = _augmented_recipe(tiny_recipe, per_text=2, mask_p=0.2, replace_p=0.2)
    db = recipe.store_path
    train, held = load_splits(recipe.data, recipe.task.label_names, recipe.training.seed)

    est = estimate(recipe)  # before any call: the 90 augmented rows are counted
    assert (est.rows, est.cached, est.to_call, est.calls) == (60 + 90, 0, 150, 150)
    assert any("90 of the rows are augmented texts" in n for n in est.notes)
    assert not db.exists() or n_calls(db) == 0

    stats = label(recipe, quiet=True)
    assert stats.called == 150 and stats.cached == 0 and n_calls(db) == 150
    assert stats.by_split["augment"] == {"examples": 90, "cached": 0, "called": 90, "failed": 0}
    assert stats.by_split["train"]["examples"] == 45 and stats.by_split["eval"]["examples"] == 15
    rows = _rows(recipe.output_dir / "signals/train.jsonl")
    originals, augmented = rows[:45], rows[45:]
    assert [r["id"] for r in originals] == [e.id for e in train] and all("augmented_from" not in r for r in originals)
    assert len(augmented) == 90 and all(r["id"] == f"{r['augmented_from']}~aug{r['id'][-1]}" for r in augmented)
    assert {r["augmented_from"] for r in augmented} == {e.id for e in train}
    assert all(r["gold"] is None and abs(sum(r["teacher_probs"]) - 1) < 1e-6 for r in augmented)
    assert sum("[MASK]" in r["text"] for r in augmented) > 10  # the tiny student has no mask token of its own
    texts = {r["text"] for r in rows}
    assert len(texts) == 135 and texts.isdisjoint(e.text for e in held)
    evals = _rows(recipe.output_dir / "signals/eval.jsonl")
    assert [r["id"] for r in evals] == [e.id for e in held] and all("augmented_from" not in r for r in evals)

    again = label(recipe, quiet=True)  # the same texts again, every answer from the store
    assert again.called == 0 and again.cached == 150 and n_calls(db) == 150
    assert _rows(recipe.output_dir / "signals/train.jsonl") == rows
    est = estimate(recipe)
    assert (est.rows, est.cached, est.to_call) == (150, 150, 0)


def _api_recipe(tmp_path, rows: int = 24, **teacher):
    write_jsonl(tmp_path / "data.jsonl", make_examples(rows, seed=4))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "openai:gpt-4o-mini", "concurrency": 1, "max_tokens": 4, **teacher},
        "student": {"model": "all-minilm-l6-v2"},
        "output_dir": "out",
    }, sort_keys=False))  # fmt: skip
    return path


PRICE = Price(0.15, 0.075, 0.60)  # gpt-4o-mini, USD per million tokens


def test_budget_cap_holds_over_augmented_rows(tmp_path, openai_fake, monkeypatch):
    """Originals first, then augmented rows, until the next call's worst case would pass the cap: nothing is
    spent past it, no signal file is left, and a rerun with a higher cap buys only what is missing."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-augment")
    recipe = _augmented_recipe(_api_recipe(tmp_path), per_text=3, ngram_p=0.5)
    est = estimate(recipe)
    assert est.rows == 24 + 54 and est.to_call == 78 and est.worst_usd > est.usd > 0
    cap = est.usd / 2
    capped = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"budget_usd": cap})})
    with pytest.raises(BudgetReached, match="budget reached"):
        label(capped, quiet=True)
    spent = sql(recipe.store_path, "SELECT COALESCE(SUM(cost_usd), 0) FROM calls")[0][0]
    answered = openai_fake.answered
    assert 24 < answered < 78  # every original, some augmented rows, not all
    assert 0 < spent <= cap and n_calls(recipe.store_path) == answered
    assert spent == pytest.approx(PRICE.cost(openai_fake.prompt_tokens, openai_fake.completion_tokens), rel=1e-9)
    assert not (recipe.output_dir / "signals/train.jsonl").exists()

    stats = label(recipe, quiet=True)  # no cap: the rest
    assert stats.called == 78 - answered and stats.cached == answered and openai_fake.received == 78
    assert len(_rows(recipe.output_dir / "signals/train.jsonl")) == 18 + 54


def test_paraphrases_from_an_api_teacher_are_cached_costed_and_labelled(tmp_path, openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-augment")
    recipe = _augmented_recipe(_api_recipe(tmp_path), paraphrase=True)
    train, held = load_splits(recipe.data, recipe.task.label_names, recipe.training.seed)
    # the fake answers the generation request, in OpenAI's format, with a rewrite of the text
    req = paraphrase_request(train[0].text)
    body = openai_fake.completion({"model": "gpt-4o-mini", "messages": list(req.messages), "max_tokens": 64})
    assert body["choices"][0]["message"]["content"] == f"You wrote: {train[0].text}"

    est = estimate(recipe)  # 24 labels, 18 paraphrases, 18 labels of paraphrases not written yet
    assert (est.rows, est.to_call, est.calls) == (24 + 18 + 18, 60, 60)
    assert any("18 paraphrase requests" in n and "18 not yet written" in n for n in est.notes)

    stats = label(recipe, quiet=True)
    assert openai_fake.received == 60 and stats.called == 60
    assert stats.by_split["paraphrase"] == {"examples": 18, "cached": 0, "called": 18, "failed": 0}
    assert stats.by_split["augment"] == {"examples": 18, "cached": 0, "called": 18, "failed": 0}
    paraphrase_bodies = [b for b in openai_fake.bodies if "Rewrite the following" in b["messages"][-1]["content"]]
    assert len(paraphrase_bodies) == 18 and all(b["temperature"] == 0.0 and "logprobs" not in b
                                                for b in paraphrase_bodies)  # fmt: skip
    # every call is costed, paraphrases included, and the run's cost is the store's
    total = PRICE.cost(openai_fake.prompt_tokens, openai_fake.completion_tokens)
    assert stats.cost_usd == pytest.approx(total, rel=1e-9)
    assert sql(recipe.store_path, "SELECT SUM(cost_usd) FROM calls")[0][0] == pytest.approx(total, rel=1e-9)
    paras_asked = [k for k, c in stored_calls(recipe.store_path).items() if asks(c, "Rewrite the following")]
    para_cost = [sql(recipe.store_path, "SELECT cost_usd FROM calls WHERE key = ?", k)[0][0] for k in paras_asked]
    assert len(para_cost) == 18 and min(para_cost) > 0

    rows = _rows(recipe.output_dir / "signals/train.jsonl")
    paras = rows[18:]
    assert [r["id"] for r in paras] == [f"{e.id}~para" for e in train]
    assert [(r["augmented_from"], r["text"]) for r in paras] == [(e.id, f"You wrote: {e.text}") for e in train]
    assert all(r["teacher_label"] in LABELS for r in paras)
    assert len(_rows(recipe.output_dir / "signals/eval.jsonl")) == len(held) == 6

    again = label(recipe, quiet=True)
    assert again.called == 0 and openai_fake.received == 60 and again.cost_usd == 0
    est = estimate(recipe)
    assert (est.rows, est.cached, est.to_call, est.usd) == (60, 60, 0, 0.0)


def test_paraphrase_with_a_local_teacher_is_refused_with_the_fix(tiny_recipe):
    recipe = _augmented_recipe(tiny_recipe, paraphrase=True)
    for run in (label, estimate):
        with pytest.raises(ProtegeError, match="is not an API teacher.*paraphrase: false, or use an API teacher"):
            run(recipe, quiet=True) if run is label else run(recipe)
    assert not recipe.store_path.exists() or n_calls(recipe.store_path) == 0


def test_the_whole_loop_trains_on_the_augmented_rows_and_a_rerun_buys_nothing(tiny_recipe):
    from click.testing import CliRunner

    from protege.cli import cli

    runner = CliRunner()
    flags = ["-q", "--data.augment.per_text", "1"]
    res = runner.invoke(cli, ["label", str(tiny_recipe), "--dry-run", *flags])
    assert res.exit_code == 0, res.output
    assert "rows: 105, 0 already answered in the store, 105 to call" in res.output
    assert "note: 45 of the rows are augmented texts" in res.output
    res = runner.invoke(cli, ["run", str(tiny_recipe), *flags])
    assert res.exit_code == 0, res.output
    assert "label: 105 teacher calls, 0 answers from the store" in res.output
    out = tiny_recipe.parent / "out"
    card = json.loads((out / "student/protege.json").read_text())
    assert card["examples"] == 90  # 45 originals and their 45 new texts
    report = json.loads((out / "report.json").read_text())
    assert report["eval_examples"] == 15
    res = runner.invoke(cli, ["run", str(tiny_recipe), *flags])
    assert res.exit_code == 0 and "label: 0 teacher calls, 105 answers from the store" in res.output, res.output
