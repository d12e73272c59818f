"""`protege serve` with a causal LM student, through the official openai SDK: chat completions with sampling
settings, max_tokens, stop, streaming, logprobs and usage; the answers equal the model's own decoding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import make_llama, make_tokenizer, save_student  # noqa: E402
from test_serve import running  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lm_student(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a trained LM student; its output layer scaled so its distributions are
    peaked (a random model's are nearly uniform, and sampled text would then say nothing)."""
    import torch

    tok = make_tokenizer()
    model = make_llama(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return save_student(tmp_path_factory.mktemp("lm") / "lm-student", model, tok, distill="sequence")


@pytest.fixture(scope="module")
def reference(lm_student):
    """Greedy decoding with transformers' own generate, the answer the server must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.students.chat import prompt_ids

    model = AutoModelForCausalLM.from_pretrained(lm_student).eval()
    tok = AutoTokenizer.from_pretrained(lm_student)

    def greedy(messages, max_new_tokens):
        ids = prompt_ids(tok, messages)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return tok.decode(new, skip_special_tokens=True), len(ids), len(new)

    return greedy


@pytest.fixture(scope="module")
def server(lm_student):
    with running(lm_student, model_name="lm-student") as r:
        yield r


def test_greedy_answer_equals_the_models_own_decoding(server, reference):
    text, prompt_tokens, n = reference(QUESTION, 12)
    with server.client() as c:
        r = c.chat.completions.create(model="anything", messages=QUESTION, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == text and r.model == "lm-student"
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == n
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")


def test_stop_strings_end_the_answer_before_them(server, reference):
    text, _, _ = reference(QUESTION, 12)
    stop = text[4:6]
    assert stop and text.find(stop) >= 0
    with server.client() as c:
        r = c.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_own(server, lm_student):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.students.chat import prompt_ids

    with server.client() as c:
        r = c.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=4, logprobs=True,
                                      top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    model = AutoModelForCausalLM.from_pretrained(lm_student).eval()
    tok = AutoTokenizer.from_pretrained(lm_student)
    ids = prompt_ids(tok, QUESTION)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    first = content[0]
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-4)  # greedy: the top token
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-4)
    assert first.top_logprobs[0].token == first.token


def test_streaming_spells_the_same_answer_with_usage(server, reference):
    text, prompt_tokens, n = reference(QUESTION, 12)
    with server.client() as c:
        stream = c.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
    deltas = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert deltas == text and len(finish) == 1
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.completion_tokens == n


def test_sampling_is_reproducible_with_a_seed_and_honours_max_tokens(server):
    with server.client() as c:
        a = c.chat.completions.create(model="m", messages=QUESTION, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)
        b = c.chat.completions.create(model="m", messages=QUESTION, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 6


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ],
)
def test_bad_settings_are_400_in_openai_format(server, kw, param):
    with server.client() as c, pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=QUESTION, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_classify_is_refused_for_a_language_model(server):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{server.base_url}/classify", data=json.dumps({"input": "hello"}).encode(),
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=20)
    assert e.value.code == 400 and "classifier" in json.loads(e.value.read())["error"]["message"]


def test_the_generation_thread_ends_with_the_server(lm_student):
    """The generator owns its worker thread; the server's shutdown stops it (no pool outlives the app)."""
    import threading

    from test_serve import Running

    from protege.serve import create_app

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("protege-generate")}

    before = workers()  # other servers of this module have their own
    r = Running(create_app(lm_student))
    try:
        with r.client() as c:
            c.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=2)
        gen = r.app.state.generator
        ours = workers() - before
        assert len(ours) == 1  # one thread, started by this server's first answer
    finally:
        r.close()
    assert not any(t.is_alive() for t in ours)
    with pytest.raises(RuntimeError, match="shutdown"):
        gen.executor.submit(print)
