"""`protege serve`: a real uvicorn server on loopback serving a tiny classifier student, called with the official
OpenAI SDK (and plain HTTP for /v1/classify and raw error bodies)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest

from protege.demo_data import LABELS, make_examples
from protege.errors import ProtegeError

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from protege.serve import create_app, is_loopback, serve

MAX_LENGTH = 32
KEY = "sk-protege-test-key"
NAME = "ticket-student"


# --------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_classifier_dir) -> Path:
    """The tiny BERT classifier saved the way a trained student is (save_student: weights, tokenizer, and the card
    protege.json, which sets its max length)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from protege.recipe import build_recipe
    from protege.students.card import StudentCard
    from protege.students.classifier import save_student

    path = tmp_path_factory.mktemp("served") / NAME
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    recipe = build_recipe({"task": {"labels": list(LABELS)}, "student": {"max_length": MAX_LENGTH}})
    save_student(model, tok, path, StudentCard.for_classifier(recipe, LABELS, {"alpha": 0.9, "train_seconds": 0.0}))
    return path


@pytest.fixture(scope="module")
def direct(student_dir):
    """The student's own predictions, through load_student and evaluate's predictor."""
    from protege.evaluation.classifier import _student_predict
    from protege.students.classifier import load_student

    model, tok, _ = load_student(student_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def predict(texts: list[str]) -> np.ndarray:
        return _student_predict(model, tok, texts, MAX_LENGTH)

    def tokens(text: str) -> int:
        return len(tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"])

    predict.labels = labels
    predict.tokens = tokens
    return predict


class Running:
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=20, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def running(student_dir, **kw):
    r = Running(create_app(student_dir, **kw))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def server(student_dir):
    with running(student_dir, max_body_bytes=20_000) as r:
        yield r


@pytest.fixture(scope="module")
def keyed(student_dir):
    with running(student_dir, api_key=KEY) as r:
        yield r


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def http(server):
    with httpx2.Client(base_url=server.url, timeout=20) as c:
        yield c


TEXTS = [r["text"] for r in make_examples(8, seed=11)]
LONG = " ".join(["my invoice was charged twice and the refund never arrived"] * 80)


def user(text) -> list[dict]:
    return [{"role": "system", "content": "You sort support tickets."}, {"role": "user", "content": text}]


def assert_openai_error(resp, status: int, kind: str = "invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == kind
    return err


# --------------------------------------------------------------------------------------------------------------
# the OpenAI surface


def test_models_list(client):
    models = client.models.list().data
    assert [(m.id, m.owned_by, m.object) for m in models] == [(NAME, "protege", "model")]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion_is_the_students_argmax(client, direct):
    probs = direct(TEXTS + [LONG])
    for text, p in zip(TEXTS + [LONG], probs):
        raw = client.chat.completions.with_raw_response.create(model="anything", messages=user(text))
        assert raw.headers["x-protege-model"] == "student"
        r = raw.parse()
        label = r.choices[0].message.content
        assert label in LABELS and label == direct.labels[int(p.argmax())]
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
        assert r.id.startswith("chatcmpl-") and r.model == NAME and r.object == "chat.completion"
        assert abs(r.created - time.time()) < 60
        assert r.usage.prompt_tokens == direct.tokens(text) and r.usage.completion_tokens == 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + 1
        assert r.choices[0].logprobs is None
    assert direct.tokens(LONG) == MAX_LENGTH  # the long text was truncated, not refused


def test_content_parts_and_last_user_message(client, direct):
    p = direct([TEXTS[0]])[0]
    msgs = [
        {"role": "user", "content": "an earlier question about something else entirely"},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": [{"type": "text", "text": TEXTS[0]},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
    ]
    r = client.chat.completions.create(model=NAME, messages=msgs)
    assert r.choices[0].message.content == direct.labels[int(p.argmax())]
    assert r.usage.prompt_tokens == direct.tokens(TEXTS[0])


def test_logprobs_are_the_students_probabilities(client, direct):
    n = len(LABELS)
    for text, p in zip(TEXTS[:4], direct(TEXTS[:4])):
        r = client.chat.completions.create(model=NAME, messages=user(text), logprobs=True, top_logprobs=n)
        (tok,) = r.choices[0].logprobs.content
        assert tok.token == r.choices[0].message.content == direct.labels[int(p.argmax())]
        assert tok.bytes == list(tok.token.encode())
        assert math.exp(tok.logprob) == pytest.approx(p.max(), abs=1e-4)
        tops = tok.top_logprobs
        assert [t.token for t in tops] == [direct.labels[i] for i in np.argsort(-p)]
        assert sum(math.exp(t.logprob) for t in tops) == pytest.approx(1.0, abs=1e-4)
        for t in tops:
            assert math.exp(t.logprob) == pytest.approx(p[direct.labels.index(t.token)], abs=1e-4)
    r = client.chat.completions.create(model=NAME, messages=user(TEXTS[0]), logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    r = client.chat.completions.create(model=NAME, messages=user(TEXTS[0]), logprobs=True)
    assert r.choices[0].logprobs.content[0].top_logprobs == []


def test_streaming(client, http, direct):
    label = direct.labels[int(direct([TEXTS[1]])[0].argmax())]
    chunks = list(client.chat.completions.create(
        model=NAME, messages=user(TEXTS[1]), stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == label
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals == [None, "stop"]
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].usage.completion_tokens == 1 and chunks[-1].usage.prompt_tokens == direct.tokens(TEXTS[1])

    body = {"model": NAME, "messages": user(TEXTS[1]), "stream": True, "logprobs": True, "top_logprobs": 3}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-protege-model"] == "student"
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"]["content"] == label
    assert len(first["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    assert len(events) == 3  # the label, the stop, [DONE] (no usage chunk unless asked)


def test_classify_batch(http, direct):
    texts = TEXTS + [LONG]
    probs = direct(texts)
    resp = http.post("/v1/classify", json={"input": texts, "model": NAME})
    assert resp.status_code == 200 and resp.headers["x-protege-model"] == "student"
    out = resp.json()
    assert out["object"] == "list" and out["model"] == NAME
    assert [d["index"] for d in out["data"]] == list(range(len(texts)))
    for d, p in zip(out["data"], probs):
        assert d["label"] == direct.labels[int(p.argmax())] and d["answered_by"] == "student"
        assert list(d["probs"]) == direct.labels
        assert sum(d["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert [d["probs"][x] for x in direct.labels] == pytest.approx(list(p), abs=1e-4)
        assert d["confidence"] == pytest.approx(max(p), abs=1e-4)
    assert out["usage"]["prompt_tokens"] == sum(direct.tokens(t) for t in texts) == out["usage"]["total_tokens"]

    one = http.post("/v1/classify", json={"input": TEXTS[2]}).json()
    assert len(one["data"]) == 1 and one["data"][0]["label"] == out["data"][2]["label"]


# --------------------------------------------------------------------------------------------------------------
# safety


def test_api_key(keyed):
    with keyed.client(api_key="sk-wrong") as c, pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model=NAME, messages=user(TEXTS[0]))
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with keyed.client(api_key="sk-wrong") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with httpx2.Client(base_url=keyed.url, timeout=20) as h:
        assert_openai_error(h.get("/v1/models"), 401)
        assert_openai_error(h.post("/v1/classify", json={"input": "x"}), 401)
        assert_openai_error(h.get("/v1/models", headers={"authorization": f"Basic {KEY}"}), 401)
        ok = h.post("/v1/classify", json={"input": "x"}, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
    with keyed.client(api_key=KEY) as c:
        assert c.chat.completions.create(model=NAME, messages=user(TEXTS[0])).choices[0].message.content in LABELS
        assert c.models.list().data[0].id == NAME


def test_bad_requests_are_400_in_openai_format(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[])
    assert e.value.body["param"] == "messages" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=user(TEXTS[0]), n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=user(""))
    assert e.value.body["param"] == "messages[1].content"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "no user turn"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=user(TEXTS[0]), top_logprobs=2)

    err = assert_openai_error(http.post("/v1/classify", json={"input": ["fine", ""]}), 400)
    assert err["param"] == "input[1]"
    assert_openai_error(http.post("/v1/classify", json={"input": []}), 400)
    err = assert_openai_error(http.post("/v1/chat/completions", json={"messages": "hello"}), 400)
    assert err["param"] == "messages"
    err = assert_openai_error(http.post("/v1/classify", json={"input": ["fine", 3]}), 400)
    assert err["param"] == "input[1]"
    err = assert_openai_error(http.post("/v1/classify", json={"input": 3}), 400)
    assert err["param"] == "input" and "string" in err["message"] and "list" in err["message"]
    bad_part = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    err = assert_openai_error(http.post("/v1/chat/completions", json={"messages": bad_part}), 400)
    assert err["param"] == "messages[0].content[0].text"

    big = "refund " * 5000  # over the 20,000-byte limit of this server
    assert_openai_error(http.post("/v1/classify", json={"input": big}), 413)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=NAME, messages=user(big))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

    def chunked():  # no content-length: the limit is counted as the body arrives
        yield b'{"input": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    resp = http.post("/v1/classify", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(resp, 413)

    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.post("/v1/completions", json={"prompt": "x"}), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


_CHAT = "/v1/chat/completions"
_CLS = "/v1/classify"
_OK_MSGS = [{"role": "user", "content": "where is my parcel"}]
FUZZ = [
    (_CHAT, b""), (_CHAT, b"{"), (_CHAT, b"null"), (_CHAT, b"[]"), (_CHAT, b"123"), (_CHAT, b'"text"'),
    (_CHAT, b"[" * 5000 + b"]" * 5000), (_CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    (_CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), (_CHAT, b"\x00\x01\x02"),
    (_CHAT, {}), (_CHAT, {"messages": None}), (_CHAT, {"messages": "hi"}), (_CHAT, {"messages": [{}]}),
    (_CHAT, {"messages": [None]}), (_CHAT, {"messages": [{"role": "user"}]}),
    (_CHAT, {"messages": [{"role": "robot", "content": "x"}]}), (_CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (_CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    (_CHAT, {"messages": [{"role": "user", "content": [{"text": "no type"}]}]}),
    (_CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    (_CHAT, {"messages": [{"role": "user", "content": []}]}),
    (_CHAT, {"messages": [{"role": "user", "content": "   \n\t "}]}),
    (_CHAT, {"messages": [{"role": "assistant", "content": "billing"}]}),
    (_CHAT, {"messages": _OK_MSGS, "n": 0}), (_CHAT, {"messages": _OK_MSGS, "n": "two"}),
    (_CHAT, {"messages": _OK_MSGS, "n": 10**40}), (_CHAT, {"messages": _OK_MSGS, "stream": "maybe"}),
    (_CHAT, {"messages": _OK_MSGS, "logprobs": []}), (_CHAT, {"messages": _OK_MSGS, "top_logprobs": -1}),
    (_CHAT, {"messages": _OK_MSGS, "logprobs": True, "top_logprobs": "all"}),
    (_CHAT, {"messages": _OK_MSGS, "logprobs": True, "top_logprobs": 10**40}),
    (_CHAT, {"messages": _OK_MSGS, "stream": True, "stream_options": "yes"}),
    (_CHAT, {"messages": _OK_MSGS, "model": ["a"]}), (_CHAT, {"messages": _OK_MSGS, "temperature": "hot"}),
    (_CLS, b""), (_CLS, b"{"), (_CLS, b"[1, 2]"), (_CLS, b'{"input": "\\udfff"}'), (_CLS, {}),
    (_CLS, {"input": None}), (_CLS, {"input": 5}), (_CLS, {"input": {"text": "x"}}), (_CLS, {"input": [["x"]]}),
    (_CLS, {"input": ["ok", 3]}), (_CLS, {"input": [""]}), (_CLS, {"input": " "}), (_CLS, {"inputs": "x"}),
    (_CLS, {"input": "x", "model": 5}), (_CLS, {"input": ["x"] * 3000}), (_CLS, {"input": "\u0000"}),
    ("/v1/models", {}), ("/v1/models/" + NAME, {}), ("/v1/embeddings", {"input": "x"}), ("/", b""),
]


@pytest.mark.parametrize("path, body", FUZZ, ids=[f"{i}-{p.rsplit('/', 1)[-1]}" for i, (p, _) in enumerate(FUZZ)])
def test_malformed_input_is_never_a_5xx(http, path, body):
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert_openai_error(resp, resp.status_code)


def test_text_plain_body_is_400(http):
    assert_openai_error(http.post(_CLS, content=b"hello", headers={"content-type": "text/plain"}), 400)


# --------------------------------------------------------------------------------------------------------------
# batching, concurrency, shutdown (a hook in the batcher holds the model, so nothing depends on timing luck)


class Gate:
    """forward_hook: the first forward pass waits until released; later ones run at once."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, texts: list[str]) -> None:
        self.sizes.append(len(texts))
        self.entered.set()
        assert self.release.wait(20)


def test_concurrent_requests_share_forward_passes(student_dir, direct):
    gate = Gate()
    n = 16
    with running(student_dir, max_batch=64, forward_hook=gate) as srv, srv.client() as c:
        batcher = srv.app.state.batcher

        def ask(text):
            return c.chat.completions.create(model=NAME, messages=user(text)).choices[0].message.content

        texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(ask, t) for t in texts]
            assert gate.entered.wait(20)
            deadline = time.monotonic() + 20
            while gate.sizes[0] + batcher.queue.qsize() < n:  # everyone else is waiting for the model
                assert time.monotonic() < deadline
                time.sleep(0.01)
            gate.release.set()
            answers = [f.result() for f in futures]
        # the gated first pass, then one for everyone who queued behind it; or one alone, when all n had arrived
        # before the batcher formed its first batch (it happens on a loaded machine)
        assert batcher.forward_passes in (1, 2) and sum(gate.sizes) == n and max(gate.sizes) > 1
    expected = direct(texts).argmax(1)
    assert answers == [direct.labels[i] for i in expected]


def test_concurrency_limit_is_429(student_dir):
    gate = Gate()
    with running(student_dir, max_concurrency=1, forward_hook=gate) as srv, srv.client() as c:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.chat.completions.create, model=NAME, messages=user(TEXTS[0]))
            assert gate.entered.wait(20)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model=NAME, messages=user(TEXTS[1]))
            assert e.value.body["type"] == "rate_limit_error"
            with httpx2.Client(base_url=srv.url, timeout=20) as h:
                resp = h.post("/v1/classify", json={"input": "x"})
                assert_openai_error(resp, 429, "rate_limit_error")
                assert resp.headers["retry-after"] == "1"
            gate.release.set()
            assert first.result().choices[0].message.content in LABELS
        # the slot is free again
        assert c.chat.completions.create(model=NAME, messages=user(TEXTS[1])).choices[0].message.content in LABELS


def test_shutdown_lets_requests_in_flight_finish(student_dir):
    gate = Gate()
    srv = Running(create_app(student_dir, forward_hook=gate))
    try:
        with srv.client() as c, ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(c.chat.completions.create, model=NAME, messages=user(TEXTS[0]))
            assert gate.entered.wait(20)
            srv.server.should_exit = True  # what SIGINT/SIGTERM do
            time.sleep(0.3)
            assert srv.thread.is_alive()  # still waiting for the request
            gate.release.set()
            assert inflight.result().choices[0].message.content in LABELS
    finally:
        gate.release.set()
        srv.close()


# --------------------------------------------------------------------------------------------------------------
# serve(): refuses to expose an unkeyed model


def test_serve_refuses_public_host_without_key(student_dir, monkeypatch):
    monkeypatch.delenv("PROTEGE_TEST_SERVE_KEY", raising=False)
    with pytest.raises(ProtegeError, match="without an API key"):
        serve(student_dir, host="0.0.0.0")
    with pytest.raises(ProtegeError, match="PROTEGE_TEST_SERVE_KEY"):
        serve(student_dir, host="0.0.0.0", api_key_env="PROTEGE_TEST_SERVE_KEY")
    monkeypatch.setenv("PROTEGE_TEST_SERVE_KEY", "  ")
    with pytest.raises(ProtegeError, match="unset or empty"):
        serve(student_dir, host="127.0.0.1", api_key_env="PROTEGE_TEST_SERVE_KEY")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")
    assert not is_loopback("192.168.1.10")


def test_not_a_student(tmp_path):
    with pytest.raises(ProtegeError, match="not a trained protege student"):
        create_app(tmp_path)
    with pytest.raises(ProtegeError, match="not a directory"):
        create_app(tmp_path / "missing")


def test_serve_runs_uvicorn_and_stops_on_ctrl_c(student_dir, tmp_path):
    """serve() in its own process, as `protege serve` runs it: the key from the environment, Ctrl-C stops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from protege.serve import serve; "
        f"serve({str(student_dir)!r}, port={port}, api_key_env='PROTEGE_TEST_SERVE_KEY', model_name='served', "
        "log_level='warning')"
    )
    env = {**os.environ, "PROTEGE_TEST_SERVE_KEY": KEY}
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        auth = {"authorization": f"Bearer {KEY}"}
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as h:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                try:
                    if h.get("/v1/models", headers=auth).status_code == 200:
                        break
                except httpx2.TransportError:
                    time.sleep(0.1)
            assert h.get("/v1/models").status_code == 401
            out = h.post("/v1/classify", json={"input": TEXTS[0]}, headers=auth).json()
            assert out["model"] == "served" and out["data"][0]["label"] in LABELS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_failure_is_a_500_and_the_server_keeps_going(student_dir):
    calls = []

    def fail_once(texts):
        calls.append(len(texts))
        if len(calls) == 1:
            raise RuntimeError("boom")

    with running(student_dir, forward_hook=fail_once) as srv, srv.client() as c:
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model=NAME, messages=user(TEXTS[0]))
        assert e.value.body["type"] == "server_error" and "boom" not in e.value.body["message"]
        assert c.chat.completions.create(model=NAME, messages=user(TEXTS[0])).choices[0].message.content in LABELS
