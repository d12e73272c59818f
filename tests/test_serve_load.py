"""Load test of `protege serve` on loopback: 200 requests from 32 concurrent clients (the official AsyncOpenAI
client for chat completions, plain and streamed, and httpx for /v1/classify), bounded in count and time.

Every request gets an answer; none is a 5xx; a non-2xx is only ever a 429 in OpenAI's format, and only when
more requests are in flight than the server allows; what a request gets under load equals what it gets alone."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

import httpx2
import openai
import pytest

from protege.demo_data import LABELS, make_examples

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import NAME, running, student_dir  # noqa: E402, F401  (student_dir is a fixture)

REQUESTS = 200
CLIENTS = 32
TEXTS = [r["text"] for r in make_examples(12, seed=5)]
DEADLINE_S = 90  # the whole burst; each request also has its own 20 s timeout


@dataclass
class Outcome:
    """One request's answer: its status and, for a 200, the label and probabilities of each text."""

    kind: str
    texts: list[str]
    status: int = 0
    labels: list[str] = field(default_factory=list)
    probs: list[dict[str, float]] = field(default_factory=list)
    error: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _plan(i: int) -> tuple[str, list[str]]:
    """Request i: chat, streamed chat, classify one text, classify two texts, in turn."""
    kind = ("chat", "stream", "classify", "classify2")[i % 4]
    texts = [TEXTS[i % len(TEXTS)]] + ([TEXTS[(i + 5) % len(TEXTS)]] if kind == "classify2" else [])
    return kind, texts


def _chat_probs(logprobs) -> dict[str, float]:
    return {t.token: math.exp(t.logprob) for t in logprobs.content[0].top_logprobs}


async def _one(kind: str, texts: list[str], oai: openai.AsyncOpenAI, http: httpx2.AsyncClient,
               on_429: threading.Event) -> Outcome:
    out = Outcome(kind, texts)
    messages = [{"role": "user", "content": texts[0]}]
    try:
        if kind == "chat":
            raw = await oai.chat.completions.with_raw_response.create(
                model=NAME, messages=messages, logprobs=True, top_logprobs=len(LABELS))
            r = raw.parse()
            out.status, out.headers = raw.status_code, dict(raw.headers)
            out.labels, out.probs = [r.choices[0].message.content], [_chat_probs(r.choices[0].logprobs)]
        elif kind == "stream":
            stream = await oai.chat.completions.create(
                model=NAME, messages=messages, logprobs=True, top_logprobs=len(LABELS), stream=True)
            chunks = [c async for c in stream]
            out.status = 200
            out.labels = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices)]
            out.probs = [_chat_probs(chunks[0].choices[0].logprobs)]
        else:
            resp = await http.post("/v1/classify", json={"input": texts if kind == "classify2" else texts[0]})
            out.status, out.headers = resp.status_code, dict(resp.headers)
            if resp.status_code == 200:
                data = resp.json()["data"]
                out.labels, out.probs = [d["label"] for d in data], [d["probs"] for d in data]
            else:
                out.error = resp.json().get("error")
    except openai.APIStatusError as e:
        out.status, out.headers, out.error = e.status_code, dict(e.response.headers), e.response.json().get("error")
    if out.status == 429:
        on_429.set()
    return out


async def _burst(base: str, n: int, concurrency: int, on_429: threading.Event) -> list[Outcome | None]:
    """n requests from ``concurrency`` tasks, each sending its next request as soon as its last one is answered."""
    results: list[Outcome | None] = [None] * n
    todo = iter(range(n))
    async with (
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=20) as oai,
        httpx2.AsyncClient(base_url=base, timeout=20) as http,
    ):
        async def client() -> None:
            for i in todo:
                results[i] = await _one(*_plan(i), oai, http, on_429)

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), DEADLINE_S)
    return results


@pytest.fixture(scope="module")
def alone(student_dir):  # noqa: F811
    """What each text gets when it is the only request on the server: label and probabilities."""
    with running(student_dir) as srv, httpx2.Client(base_url=srv.url, timeout=20) as h:
        out = {}
        for t in TEXTS:
            (d,) = h.post("/v1/classify", json={"input": t}).json()["data"]
            out[t] = (d["label"], d["probs"])
        return out


def _check_answers(outcomes: list[Outcome], alone: dict) -> int:
    """Every 200 equals the single-request answers; returns how many 200s there were."""
    ok = 0
    for o in outcomes:
        if o.status != 200:
            continue
        ok += 1
        assert len(o.labels) == len(o.texts) == len(o.probs)
        for text, label, probs in zip(o.texts, o.labels, o.probs):
            want_label, want_probs = alone[text]
            assert label == want_label, (o.kind, text)
            assert probs.keys() == want_probs.keys()
            for lab in probs:  # padding in a bigger batch moves fp32 logits by ~1e-7, nothing more
                assert probs[lab] == pytest.approx(want_probs[lab], abs=1e-5), (o.kind, text, lab)
    return ok


def _check_no_loss_no_5xx(results: list[Outcome | None]) -> list[Outcome]:
    assert all(r is not None for r in results), "a request got no answer"
    outcomes = [r for r in results if r is not None]
    assert len(outcomes) == REQUESTS
    assert {o.status for o in outcomes} <= {200, 429}, sorted({o.status for o in outcomes})
    for o in outcomes:
        if o.status == 429:
            assert o.error is not None and set(o.error) == {"message", "type", "param", "code"}
            assert (o.error["type"], o.error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert o.headers.get("retry-after") == "1"
        else:
            assert o.headers.get("x-protege-model", "student") == "student"
    return outcomes


def test_limit_below_client_concurrency_gives_429s_and_nothing_else(student_dir, alone):  # noqa: F811
    """4 requests allowed in flight, 32 clients. The first forward pass is held until a client has seen a
    429, so the server is certainly over its limit at least once, whatever the machine's speed."""
    limit = 4
    first_429 = threading.Event()
    calls = []

    def hold_first(texts: list[str]) -> None:
        calls.append(len(texts))
        if len(calls) == 1:
            assert first_429.wait(20), "no 429 while the server was full"
        time.sleep(0.005)

    with running(student_dir, max_concurrency=limit, forward_hook=hold_first) as srv:
        t0 = time.monotonic()
        results = asyncio.run(_burst(srv.url, REQUESTS, CLIENTS, first_429))
        elapsed = time.monotonic() - t0
        # the in-flight count came back to zero: a new request is served
        with httpx2.Client(base_url=srv.url, timeout=20) as h:
            assert h.post("/v1/classify", json={"input": TEXTS[0]}).status_code == 200
    outcomes = _check_no_loss_no_5xx(results)
    limited = sum(o.status == 429 for o in outcomes)
    ok = _check_answers(outcomes, alone)
    assert ok + limited == REQUESTS and limited >= 1
    assert ok >= limit  # the requests in flight when the first 429 was sent all finished
    assert elapsed < DEADLINE_S


def test_limit_at_client_concurrency_gives_no_429(student_dir, alone):  # noqa: F811
    """As many requests allowed in flight as there are clients: every one of the 200 is answered, none
    refused, each as it would be alone, and the server batched them (fewer forward passes than texts)."""
    never = threading.Event()
    with running(student_dir, max_concurrency=CLIENTS, forward_hook=lambda texts: time.sleep(0.01)) as srv:
        results = asyncio.run(_burst(srv.url, REQUESTS, CLIENTS, never))
        passes = srv.app.state.batcher.forward_passes
    outcomes = _check_no_loss_no_5xx(results)
    assert [o.status for o in outcomes] == [200] * REQUESTS
    assert not never.is_set()
    assert _check_answers(outcomes, alone) == REQUESTS
    n_texts = sum(len(o.texts) for o in outcomes)
    assert passes < n_texts  # concurrent requests shared forward passes
