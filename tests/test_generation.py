"""Generation tasks: requests, local-teacher answers with top-k token logprobs, and the signal dataset."""

from __future__ import annotations

import math

import pytest
from servers import llama_server  # noqa: F401  (fixture)

from protege.labeling.prompts import render_generation
from protege.recipe import TaskConfig, TeacherConfig
from protege.teachers import make_teacher

TASK = TaskConfig(kind="generation", instruction="Reply to the customer in one sentence.")
TEXTS = ["my parcel is late again", "how do I reset my password", "I was charged twice this month"]


def test_generation_request_carries_what_determines_the_answer():
    a = render_generation(TASK, "hi", None, 5)
    assert a.labels == () and a.generate.max_tokens == 256 and a.generate.top_logprobs == 5
    assert a.to_json()["generate"] == {"max_tokens": 256, "top_logprobs": 5, "rationale": False}
    # every setting that changes the answer changes the request (and so the cache key)
    assert a.to_json() != render_generation(TASK, "hi", 32, 5).to_json()
    assert a.to_json() != render_generation(TASK, "hi", None, 0).to_json()
    why = render_generation(TaskConfig(kind="generation", answer_format="rationale"), "hi", None, 5)
    assert why.generate.rationale and why.generate.max_tokens == 512 and "Answer:" in why.messages[0]["content"]


def test_local_teacher_generates_text_with_topk_logprobs_per_token(tiny_lm_dir):
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", batch_size=3))
    reqs = [render_generation(TASK, t, 12, 4) for t in TEXTS]
    sigs = teacher.signals(reqs)
    tok = teacher._tokenizer
    assert len(sigs) == 3
    for s in sigs:
        tl = s.token_logprobs
        assert s.distribution is None and s.answer == s.text.strip()
        assert 1 <= len(tl.ids) <= 12 and len(tl.tokens) == len(tl.top) == len(tl.tail_mass) == len(tl.ids)
        assert tok.decode(list(tl.ids), skip_special_tokens=True) == s.text
        assert tl.temperature == 1.0 and tl.tokenizer == f"hf:{tiny_lm_dir}"
        for i, (chosen, ids, lps, tail) in enumerate(zip(tl.ids, tl.top_ids, tl.top_logprobs, tl.tail_mass)):
            assert len(ids) == len(lps) == 4
            assert ids[0] == chosen  # greedy: the answer token is the most likely one
            assert list(lps) == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
            assert tail == pytest.approx(max(0.0, 1 - sum(math.exp(v) for v in lps)), abs=1e-9)
            assert tl.top[i][tl.tokens[i]] == pytest.approx(lps[0])
        assert s.usage["output_tokens"] == len(tl.ids)
        assert s.truncated == (len(tl.ids) == 12)  # cut at the limit, not ended by the model


def test_local_generation_does_not_depend_on_the_batch(tiny_lm_dir):
    """Left padding must not change an answer: one at a time equals all at once."""
    batched = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", batch_size=3)).signals(
        [render_generation(TASK, t, 8, 3) for t in TEXTS]
    )
    single = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", batch_size=1)).signals(
        [render_generation(TASK, t, 8, 3) for t in TEXTS]
    )
    for a, b in zip(batched, single):
        assert a.token_logprobs.ids == b.token_logprobs.ids
        for x, y in zip(a.token_logprobs.top_logprobs, b.token_logprobs.top_logprobs):
            assert x == pytest.approx(y, abs=1e-4)


def test_label_writes_a_generation_signal_dataset(tmp_path, tiny_lm_dir):
    """`protege label` on a generation task: prompts, replies, per-token top-k and references, from the store
    on a rerun (no second call)."""
    import json

    from protege.labeling.labeler import label
    from protege.recipe import Recipe
    from protege.signals import TokenLogprobs

    rows = [{"id": f"r{i}", "text": t, "label": f"reference {i}"} for i, t in enumerate(TEXTS * 3)]
    rows = [{**r, "text": f"{r['text']} ({r['id']})"} for r in rows]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(
        task={"kind": "generation", "instruction": "Reply to the customer."},
        data={"path": tmp_path / "data.jsonl", "eval_fraction": 0.34},
        teacher={"model": f"hf:{tiny_lm_dir}", "max_tokens": 6, "top_logprobs": 3, "batch_size": 4},
        output_dir=tmp_path / "out",
    )
    stats = label(recipe, quiet=True)
    assert stats.called == 9 and stats.cached == 0
    train = [json.loads(x) for x in (tmp_path / "out/signals/train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "out/signals/eval.jsonl").read_text().splitlines()]
    assert len(train) + len(held) == 9 and len(held) == 3
    for r in train + held:
        assert r["gold"] == f"reference {r['id'][1:]}"
        assert r["messages"][0]["content"].startswith("Reply to the customer.\n\n")
        tl = TokenLogprobs(**r["token_logprobs"])
        assert 1 <= len(tl.ids) <= 6 and len(tl.top_ids[0]) == 3
        assert r["answer"] == r["teacher_text"].strip()
    again = label(recipe, quiet=True)
    assert again.called == 0 and again.cached == 9


def test_api_teacher_generates_with_token_logprobs(tmp_path, llama_server):  # noqa: F811
    """An 'openai:' teacher (llama.cpp's server on loopback) on a generation task: the whole reply, the top-k of
    every token it generated (spelling the reply out), and the usage recorded in the store."""
    import json

    from protege.labeling.labeler import label
    from protege.recipe import Recipe
    from protege.store import Store

    rows = [{"id": f"q{i}", "text": t} for i, t in enumerate(["What is 2 + 2?", "Name a colour.", "Say hello."])]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(
        task={"kind": "generation", "instruction": "Answer briefly."},
        data={"path": tmp_path / "data.jsonl", "eval_fraction": 0.34},
        teacher={"model": "openai:smol", "provider": "llamacpp", "base_url": llama_server.base_url,
                 "max_tokens": 8, "top_logprobs": 5, "timeout_s": 60},
        student={"model": "unused-here"},
        output_dir=tmp_path / "out",
    )
    stats = label(recipe, quiet=True)
    assert stats.called == 3 and stats.failed == 0
    out = [json.loads(x) for split in ("train", "eval") for x in (tmp_path / f"out/signals/{split}.jsonl").read_text().splitlines()]
    assert len(out) == 3
    for r in out:
        tl = r["token_logprobs"]
        assert r["teacher_text"] and "".join(tl["tokens"]) == r["teacher_text"]
        assert 1 <= len(tl["tokens"]) <= 8 and all(len(t) == 5 for t in tl["top"])
        assert tl["temperature"] == 1.0 and tl["ids"] is None  # an API gives token strings only
    with Store(tmp_path / "out/protege.db") as store:
        totals = store.teacher_totals("openai:smol")
    assert totals["calls"] == 3 and 0 < totals["output_tokens"] <= 3 * 8


def test_api_teacher_generation_in_process_keeps_every_token_its_alternatives_and_the_cut(
    tmp_path, openai_fake, monkeypatch
):
    """The same path against the in-process OpenAI fake, where the answers are known: the reply spelled token
    by token, the top-5 of each at its exact probabilities, a reply cut at the limit marked truncated, OpenAI's
    own output-cap parameter, and the cost of every call from its usage."""
    import json

    from openai_fake import prompt_tokens, split_tokens

    from protege.labeling.labeler import label
    from protege.recipe import Recipe
    from protege.store import Store
    from protege.teachers.presets import PRESETS

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-generation")
    texts = ["What is 2 + 2?", "Name a colour.", "Tell me everything you know about the sea and its tides."]
    rows = [{"id": f"q{i}", "text": t} for i, t in enumerate(texts)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(
        task={"kind": "generation", "instruction": "Answer briefly."},
        data={"path": tmp_path / "data.jsonl", "eval_fraction": 0.34},
        teacher={"model": "openai:gpt-4o-mini", "max_tokens": 8, "top_logprobs": 5, "concurrency": 1},
        student={"model": "unused-here"},
        output_dir=tmp_path / "out",
    )
    stats = label(recipe, quiet=True)
    assert stats.called == 3 and stats.failed == 0 and openai_fake.received == 3
    out = {r["text"]: r for split in ("train", "eval")
           for r in map(json.loads, (tmp_path / f"out/signals/{split}.jsonl").read_text().splitlines())}  # fmt: skip
    for text in texts:
        r, reply = out[text], split_tokens(f"You wrote: {text}")
        tl = r["token_logprobs"]
        assert tl["tokens"] == reply[:8] and r["teacher_text"] == "".join(reply[:8])
        assert r["truncated"] == (len(reply) > 8) and r["answer"] == r["teacher_text"].strip()
        assert tl["ids"] is None and tl["temperature"] == 1.0 and tl["tokenizer"] == "openai:gpt-4o-mini"
        for token, top, tail in zip(tl["tokens"], tl["top"], tl["tail_mass"]):
            # as the store keeps them: float16 log-probabilities, within half a float16 step (protege._compact)
            probs = sorted((math.exp(v) for v in top.values()), reverse=True)
            assert top[token] == pytest.approx(math.log(0.6), abs=2**-12) and len(top) == 5
            assert probs == pytest.approx([0.6, 0.2, 0.1, 0.05, 0.025], rel=2**-9)
            assert tail == pytest.approx(0.025)
    assert [out[t]["truncated"] for t in texts] == [False, False, True]
    price = PRESETS["openai"].prices["gpt-4o-mini"]
    for b in openai_fake.bodies:
        assert b["max_completion_tokens"] == 8 and "max_tokens" not in b
        assert (b["temperature"], b["seed"], b["logprobs"], b["top_logprobs"]) == (0.0, 0, True, 5)
    with Store(tmp_path / "out/protege.db") as store:
        totals = store.teacher_totals("openai:gpt-4o-mini")
    completion = sum(min(8, len(split_tokens(f"You wrote: {t}"))) for t in texts)
    assert totals["output_tokens"] == completion == openai_fake.completion_tokens
    assert totals["cost_usd"] == pytest.approx(
        sum(price.cost(prompt_tokens(b), 0) for b in openai_fake.bodies) + price.cost(0, completion), rel=1e-12
    )


def _generation_recipe(tmp_path, teacher_dir, **task):
    import json

    from protege.recipe import Recipe

    rows = [{"id": f"r{i}", "text": f"{t} ({i})", "label": "sure thing"} for i, t in enumerate(TEXTS * 3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Recipe(
        task={"kind": "generation", "instruction": "Reply to the customer.", **task},
        data={"path": tmp_path / "data.jsonl", "eval_fraction": 0.34},
        teacher={"model": f"hf:{teacher_dir}", "max_tokens": 6, "top_logprobs": 4, "batch_size": 4},
        eval={"latency_samples": 2},
        output_dir=tmp_path / "out",
    )


def _as_student(src, dst, recipe):
    """A saved causal LM made into a 'trained student' directory of ``recipe`` (weights, tokenizer, its card)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.students.card import StudentCard

    shutil.copytree(src, dst)
    model, tok = AutoModelForCausalLM.from_pretrained(dst), AutoTokenizer.from_pretrained(dst)
    StudentCard.for_lm(recipe, tok, model, {"distill": "sequence", "train_seconds": 0.0}).write(dst)


def test_a_student_identical_to_its_teacher_agrees_fully(tmp_path, tiny_lm_dir):
    """The LM report's figures on the one case with known answers: the teacher itself as the student agrees on
    every next token, is at KL 0 from it, and writes the same answers."""
    from protege.evaluation.lm import evaluate_lm
    from protege.labeling.labeler import label

    recipe = _generation_recipe(tmp_path, tiny_lm_dir, metric="exact_match")
    label(recipe, quiet=True)
    _as_student(tiny_lm_dir, recipe.output_dir / "student", recipe)
    report = evaluate_lm(recipe, quiet=True)
    s, t = report["models"]["student"], report["models"]["teacher"]
    assert report["kind"] == "generation" and report["eval_examples"] == 3
    assert s["top1_agreement"] == pytest.approx(1.0)
    assert s["kl_support"] == "full vocabulary" and s["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert s["answer_agreement"] == 1.0
    assert s["task_metric"] == t["task_metric"] == 0.0  # a random model never says "sure thing"
    assert s["perplexity_on_teacher"] > 1 and s["tokens_per_s"] > 0 and s["latency_ms_p50"] > 0
    md = (recipe.output_dir / "report.md").read_text()
    assert "top-1 agreement" in md and "100.0%" in md


def test_a_different_student_disagrees_measurably(tmp_path, tiny_lm_dir):
    """Another random LM with the same tokenizer: agreement below 1, KL above 0 (full vocabulary, since the
    local teacher is run here), and the report says so."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from protege.evaluation.lm import evaluate_lm
    from protege.labeling.labeler import label

    recipe = _generation_recipe(tmp_path, tiny_lm_dir)
    label(recipe, quiet=True)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(7)
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_lm_dir)).save_pretrained(other)
    tok.save_pretrained(other)
    _as_student(other, recipe.output_dir / "student", recipe)
    s = evaluate_lm(recipe, quiet=True)["models"]["student"]
    assert 0 <= s["top1_agreement"] < 1 and s["kl_to_teacher"] > 0.01
    assert s["task_metric"] is None  # no metric set in the recipe
