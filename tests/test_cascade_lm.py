"""The cascade for a language-model student against a real teacher: llama.cpp's server (SmolLM2-135M on loopback,
priced by the recipe) behind a tiny LM student. The student's sequence-level confidence decides who answers; the
teacher's answers are labeling's (a conversation labeled before comes from the store), its failures are
OpenAI-format errors, and every conversation lands in the served ledger, which adds up with the calls table and
`protege cost`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx2
import openai
import pytest
import yaml
from click.testing import CliRunner
from conftest import asks, n_calls, served, sql, stored_calls, write_jsonl
from lm_fixtures import make_llama, make_tokenizer, save_student
from servers import FaultProxy, llama_server  # noqa: F401  (fixture)
from test_serve import running as serving

from protege.cli import cli
from protege.errors import ProtegeError
from protege.labeling.labeler import label
from protege.labeling.prompts import render_generation
from protege.recipe import load_recipe
from protege.serve import create_app
from protege.serve.lm import GenerationParams, LMGenerator

PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens: the local server is free, the ledger needs money
USD_PER_HOUR = 36.0
# money spent on calls, as the ledger counts it: charged, plus attempts that may have been billed (timeouts)
SPENT = "SELECT SUM(cost_usd + uncertain_usd) FROM calls"
INSTRUCTION = "Answer the question in one short sentence."
LABELED = ["What is the capital of France?", "Name a red fruit."]
NEW = ["What do cats say?", "Which animal barks?", "What colour is the sky?"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, llama_server) -> Path:  # noqa: F811
    """A run whose teacher (llama.cpp) labeled two prompts, and a tiny LM student saved beside its store."""
    import torch

    base = tmp_path_factory.mktemp("cascade_lm")
    write_jsonl(base / "data.jsonl", [{"id": f"q{i}", "text": t} for i, t in enumerate(LABELED)])
    recipe = {
        "task": {"kind": "generation", "instruction": INSTRUCTION},
        "data": {"path": "data.jsonl", "eval_fraction": 0.5},
        "teacher": {"model": "openai:smol", "provider": "llamacpp", "base_url": llama_server.base_url,
                    "max_tokens": 12, "top_logprobs": 3, "concurrency": 2, "timeout_s": 120,
                    "price_input": PRICE_IN, "price_output": PRICE_OUT},
        "student": {"model": "unused", "max_length": 64},
        "eval": {"compute_usd_per_hour": USD_PER_HOUR},
        "output_dir": "out",
    }
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    r = load_recipe(base / "recipe.yaml")
    stats = label(r, quiet=True)
    assert stats.called == len(LABELED) and stats.failed == 0

    tok = make_tokenizer()
    model = make_llama(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions: confident on some prompts, less on others
    student = save_student(base / "out" / "student", model, tok, r, distill="sequence")
    r.save(student / "recipe.yaml")
    return base / "out"


@pytest.fixture
def run(made, tmp_path) -> Path:
    """A fresh copy of the run, store included, so each test's ledger starts empty."""
    return Path(shutil.copytree(made, tmp_path / "out"))


def prompt(question: str) -> list[dict[str, str]]:
    """The conversation as labeling sent it to the teacher (what the student learned from)."""
    from protege.recipe import TaskConfig

    return list(render_generation(TaskConfig(kind="generation", instruction=INSTRUCTION), question, 12, 3).messages)


def stored_reply(db: Path, question: str) -> dict:
    """The teacher's stored signal for a labeled question."""
    rows = [c["signal"] for c in stored_calls(db).values() if c["signal"] and asks(c, question)]
    assert len(rows) == 1
    return rows[0]


def student_confidence(student: Path, question: str, max_tokens: int = 8) -> float:
    g = LMGenerator(student).generate(prompt(question), GenerationParams(max_tokens=max_tokens, temperature=0))
    return g.confidence


def ask(client: openai.OpenAI, question: str, **kw):
    return client.chat.completions.with_raw_response.create(model="x", messages=prompt(question), **kw)


# --------------------------------------------------------------------------------------------------------------
# routing by the student's confidence


def test_threshold_zero_the_student_answers_and_every_answer_is_recorded(run):
    db, student = run / "protege.db", run / "student"
    calls = n_calls(db)
    with serving(student, cascade_threshold=0) as srv, srv.client() as c:
        raw = ask(c, LABELED[0], temperature=0, max_tokens=8)
        chunks = list(c.chat.completions.create(model="x", messages=prompt(NEW[0]), temperature=0, max_tokens=8,
                                                stream=True, stream_options={"include_usage": True}))
    chat = raw.parse()
    assert raw.headers["x-protege-model"] == "student" and chat.model == "student"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert n_calls(db) == calls  # the teacher was never asked

    rows = served(db)
    assert [r["answered_by"] for r in rows] == ["student", "student"]
    assert [r["endpoint"] for r in rows] == ["chat.completions"] * 2
    assert rows[0]["input_tokens"] == chat.usage.prompt_tokens and rows[0]["output_tokens"] == chat.usage.completion_tokens
    assert rows[1]["output_tokens"] == chunks[-1].usage.completion_tokens
    # the sequence score is the model's own: exp(mean log-probability of the chosen tokens, the end token included)
    assert rows[0]["confidence"] == pytest.approx(student_confidence(student, LABELED[0]), rel=1e-5)
    assert rows[1]["confidence"] == pytest.approx(student_confidence(student, NEW[0]), rel=1e-5)
    assert streamed == LMGenerator(student).generate(prompt(NEW[0]), GenerationParams(8, temperature=0)).text
    for r in rows:
        assert 0 < r["confidence"] <= 1 and r["seconds"] > 0 and r["teacher_usd"] == 0 and r["call_key"] is None
        assert r["cost_usd"] == pytest.approx(r["seconds"] * USD_PER_HOUR / 3600)


def test_confidence_is_the_geometric_mean_of_the_chosen_tokens_probabilities(run):
    """Checked against transformers' own greedy generate and its transition scores (the end token included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.students.chat import prompt_ids

    student = run / "student"
    model, tok = AutoModelForCausalLM.from_pretrained(student).eval(), AutoTokenizer.from_pretrained(student)
    for question, n in ((NEW[1], 6), (LABELED[1], 40)):
        ids = torch.tensor([prompt_ids(tok, prompt(question))])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
        g = LMGenerator(student).generate(prompt(question), GenerationParams(n, temperature=0))
        assert len(scores) == g.completion_tokens + (g.finish_reason == "stop")
        assert g.confidence == pytest.approx(math.exp(scores.mean().item()), rel=1e-4)
        assert 0 < g.confidence <= 1


def test_threshold_above_one_the_teacher_answers_from_the_store_or_with_one_priced_call(run):
    db = run / "protege.db"
    calls, spent = n_calls(db), sql(db, SPENT)[0][0]
    stored = stored_reply(db, LABELED[0])
    with serving(run / "student", cascade_threshold=1.01) as srv, srv.client() as c:
        # a conversation labeling sent, without max_tokens: labeling's answer, from the store
        raw = ask(c, LABELED[0], logprobs=True, top_logprobs=2)
        chunks = list(c.chat.completions.create(model="x", messages=prompt(LABELED[0]), stream=True,
                                                stream_options={"include_usage": True}))
        assert n_calls(db) == calls
        # a new one with the client's max_tokens: one call, priced; asked again: from the store
        new = ask(c, NEW[1], max_tokens=6).parse()
        again = ask(c, NEW[1], max_tokens=6).parse()
    chat = raw.parse()
    assert raw.headers["x-protege-model"] == "teacher" and chat.model == "openai:smol"
    assert chat.choices[0].message.content == stored["text"]
    assert chat.choices[0].finish_reason == ("length" if stored.get("truncated") else "stop")
    content = chat.choices[0].logprobs.content  # the teacher's own token log-probabilities, as labeling kept them
    assert "".join(t.token for t in content) == stored["text"]
    assert [t.logprob for t in content] == pytest.approx([top[t] for t, top in zip(stored["token_logprobs"]["tokens"],
                                                                                   stored["token_logprobs"]["top"])])
    assert all(1 <= len(t.top_logprobs) <= 2 for t in content)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == stored["text"]
    (key,) = [k for k, c in stored_calls(db).items() if asks(c, LABELED[0])]
    (tin, tout), = sql(db, "SELECT input_tokens, output_tokens FROM calls WHERE key = ?", key)
    assert chat.usage.prompt_tokens == tin and chat.usage.completion_tokens == tout == chunks[-1].usage.completion_tokens

    assert n_calls(db) == calls + 1 and new.choices[0].message.content == again.choices[0].message.content
    assert 0 < new.usage.completion_tokens <= 6 and new.choices[0].message.content
    new_spend = sql(db, SPENT)[0][0] - spent
    assert new_spend == pytest.approx((new.usage.prompt_tokens * PRICE_IN + new.usage.completion_tokens * PRICE_OUT) / 1e6)

    rows = served(db)
    assert [r["answered_by"] for r in rows] == ["teacher"] * 4
    assert [r["cached"] for r in rows] == [1, 1, 0, 1] and rows[0]["call_key"] == rows[1]["call_key"] == key
    assert [r["teacher_usd"] for r in rows] == pytest.approx([0, 0, new_spend, 0])
    assert rows[2]["call_key"] == rows[3]["call_key"] != key
    assert all(0 < r["confidence"] < 1.01 for r in rows)  # the student's score is recorded even when it lost


def test_between_thresholds_each_conversation_goes_by_the_students_confidence(run):
    db, student = run / "protege.db", run / "student"
    questions = LABELED + NEW
    conf = [student_confidence(student, q) for q in questions]
    order = sorted(conf)
    _, i = max((order[i + 1] - order[i], i) for i in range(len(order) - 1))
    threshold = (order[i] + order[i + 1]) / 2  # the widest gap: both sides non-empty, no rounding can flip one
    want = ["student" if x >= threshold else "teacher" for x in conf]
    assert "student" in want and "teacher" in want
    with serving(student, cascade_threshold=threshold) as srv, srv.client() as c:
        got = [ask(c, q, temperature=0, max_tokens=8) for q in questions]
    assert [r.headers["x-protege-model"] for r in got] == want
    assert [r.parse().model for r in got] == ["student" if w == "student" else "openai:smol" for w in want]
    rows = served(db)
    assert [r["answered_by"] for r in rows] == want
    assert [r["confidence"] for r in rows] == pytest.approx(conf, rel=1e-5)

    res = CliRunner().invoke(cli, ["cost", str(run), "--json"])  # the same ledger, as `protege cost` reads it
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)["serving"]
    assert s["requests"] == len(questions) and s["student_answers"]["requests"] == want.count("student")
    assert s["teacher_answers"]["requests"] == want.count("teacher")
    assert s["total_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))


def test_the_clients_stop_strings_cut_the_teachers_answer(run):
    db = run / "protege.db"
    text = stored_reply(db, LABELED[1])["text"]
    stop = text[3:5]
    assert stop.strip() and text.find(stop) >= 0
    with serving(run / "student", cascade_threshold=1.01) as srv, srv.client() as c:
        chat = ask(c, LABELED[1], stop=[stop]).parse()
    assert chat.choices[0].message.content == text[: text.find(stop)] and chat.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------------------------------------------
# failures and refusals


def test_a_failing_teacher_is_a_502_and_is_recorded(run, llama_server):  # noqa: F811
    data = yaml.safe_load((run / "student" / "recipe.yaml").read_text())
    with FaultProxy(llama_server.base_url) as proxy:
        data["teacher"] |= {"base_url": proxy.base_url, "max_retries": 0}
        (run / "teacher.yaml").write_text(yaml.safe_dump(data))
        with serving(run / "student", cascade_threshold=1.01, teacher_recipe=run / "teacher.yaml") as srv:
            proxy.plan(["500"])
            with srv.client() as c, pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model="x", messages=prompt(NEW[2]), max_tokens=4)
    assert e.value.status_code == 502 and e.value.body["code"] == "teacher_failed"
    (row,) = served(run / "protege.db")
    assert row["answered_by"] == "none" and row["error"] and row["confidence"] > 0


def test_the_cascade_refuses_a_classification_recipe_for_a_language_model(run, tmp_path):
    data = yaml.safe_load((run / "student" / "recipe.yaml").read_text())
    data["task"] = {"instruction": "Sentiment?", "labels": ["positive", "negative"]}
    (tmp_path / "clf.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProtegeError, match="generation task it learned"):
        create_app(run / "student", cascade_threshold=0.5, teacher_recipe=tmp_path / "clf.yaml")


def test_without_a_cascade_a_language_model_student_is_still_on_the_ledger(run):
    with serving(run / "student") as srv:
        with httpx2.Client(base_url=srv.url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json={"messages": prompt(NEW[0]), "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and r.headers["x-protege-model"] == "student"
    (row,) = served(run / "protege.db")
    assert row["answered_by"] == "student" and 0 < row["output_tokens"] <= 3 and row["confidence"] > 0
