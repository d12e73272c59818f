"""Pins down the test servers with the official openai SDK: the llama.cpp server's OpenAI-compatible answers
(logprobs, determinism, what it ignores), every fault kind's client-side exception, the counters, the
requests-per-minute emulation and the fake Batch API of servers.py's proxy; and that the in-process fake in
openai_fake.py answers in the same format and fails with the same exceptions, so the engine tests that run
against it see what they would see on real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import time

import openai
import pytest
from openai_fake import FakeOpenAI, expected_probs, prompt_tokens
from servers import FaultProxy, fault_proxy, format_duration, free_port, llama_server  # noqa: F401, F811  (fixtures)

MSGS = [{"role": "user", "content": "Name a color."}]


@pytest.fixture
def client(fault_proxy):
    with openai.OpenAI(base_url=fault_proxy.base_url, api_key="sk-test", max_retries=0, timeout=60) as c:
        yield c


def _chat(client, model, **kw):
    args = dict(model=model, messages=MSGS, temperature=0, max_tokens=3)
    args.update(kw)
    return client.chat.completions.create(**args)


# ---- the llama.cpp server itself


def test_chat_completion_through_proxy_has_top_logprobs(client, fault_proxy, llama_server):
    r = _chat(client, llama_server.model, logprobs=True, top_logprobs=5, max_tokens=5)
    content = r.choices[0].logprobs.content
    assert r.model == llama_server.model
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 5
        assert t.logprob <= 0 and all(a.logprob >= b.logprob for a, b in zip(t.top_logprobs, t.top_logprobs[1:]))
        assert t.bytes is None  # llama.cpp's server does not fill bytes
    # usage has only the three counts; no *_tokens_details
    assert r.usage.prompt_tokens > 0 and r.usage.prompt_tokens_details is None
    assert (fault_proxy.received, fault_proxy.forwarded, fault_proxy.auth_headers) == (1, 1, ["Bearer sk-test"])


def test_logprobs_need_top_logprobs(client, llama_server):
    # logprobs=True alone gives logprobs=None on this server (OpenAI would return per-token logprobs)
    assert _chat(client, llama_server.model, logprobs=True).choices[0].logprobs is None


def test_greedy_is_deterministic_even_for_repeated_prompts(client, llama_server):
    # back-to-back identical prompts hit llama-cpp-python's prefix cache; --n_ubatch 1 keeps the numerics identical
    def run():
        r = _chat(client, llama_server.model, logprobs=True, top_logprobs=2, max_tokens=6)
        return r.choices[0].message.content, [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

    first, second = run(), run()
    _chat(client, llama_server.model, messages=[{"role": "user", "content": "Something else."}])
    third = run()
    assert first == second == third


def test_server_ignores_n_but_honours_seed(client, llama_server):
    r = _chat(client, llama_server.model, n=3, temperature=0.9, max_tokens=4, seed=7)
    assert len(r.choices) == 1  # n > 1 is silently ignored
    again = _chat(client, llama_server.model, temperature=0.9, max_tokens=4, seed=7)
    assert r.choices[0].message.content == again.choices[0].message.content


# ---- faults


@pytest.mark.parametrize(
    "kind, exc, status",
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("400", openai.BadRequestError, 400),
        ("401", openai.AuthenticationError, 401),
    ],
)
def test_status_faults(client, fault_proxy, llama_server, kind, exc, status):
    fault_proxy.retry_after = "7"
    fault_proxy.plan([kind])
    with pytest.raises(exc) as info:
        _chat(client, llama_server.model)
    e = info.value
    assert e.status_code == status
    assert e.body["type"] in ("rate_limit_error", "server_error", "invalid_request_error")
    assert e.body["param"] is None
    if kind == "429":
        assert e.response.headers["retry-after"] == "7"
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert e.body["code"] == "rate_limit_exceeded"
    if kind == "401":
        assert e.body["code"] == "invalid_api_key" and "sk-test" not in e.response.text
    assert (fault_proxy.received, fault_proxy.forwarded, dict(fault_proxy.by_kind)) == (1, 0, {kind: 1})
    _chat(client, llama_server.model)  # plan exhausted: passes through
    assert fault_proxy.forwarded == 1 and fault_proxy.errors == []


def test_slow_times_out_client_and_proxy_survives(client, fault_proxy, llama_server):
    fault_proxy.slow_seconds = 1.5
    fault_proxy.plan(["slow"])
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        _chat(client, llama_server.model, timeout=0.5)
    assert time.monotonic() - t0 < 1.5
    time.sleep(1.3)  # let the proxy write into the closed connection
    assert _chat(client, llama_server.model).choices[0].message.content
    assert fault_proxy.errors == [] and fault_proxy.forwarded == 2


def test_cut_raises_connection_error(client, fault_proxy, llama_server):
    fault_proxy.plan(["cut"])
    with pytest.raises(openai.APIConnectionError) as info:
        _chat(client, llama_server.model)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert fault_proxy.forwarded == 1 and fault_proxy.by_kind["cut"] == 1


def test_malformed_200_raises_plain_json_error(client, fault_proxy, llama_server):
    # the SDK does not wrap a bad JSON body: json.JSONDecodeError (a ValueError), not an openai.APIError
    fault_proxy.plan(["malformed"])
    with pytest.raises(json.JSONDecodeError):
        _chat(client, llama_server.model)
    assert fault_proxy.forwarded == 1


def test_plan_order_counters_and_auth(client, fault_proxy, llama_server):
    fault_proxy.plan(["500", None, "429"])
    outcomes = []
    for _ in range(4):
        try:
            _chat(client, llama_server.model, max_tokens=1)
            outcomes.append("ok")
        except openai.APIStatusError as e:
            outcomes.append(e.status_code)
    assert outcomes == [500, "ok", 429, "ok"]
    assert fault_proxy.received == 4 and fault_proxy.forwarded == 2
    assert fault_proxy.by_kind == {"500": 1, "429": 1}
    assert fault_proxy.requests_log == [("/v1/chat/completions", f) for f in ("500", None, "429", None)]
    assert fault_proxy.auth_headers == ["Bearer sk-test"] * 4
    for req in fault_proxy.requests:  # the key travels only in the Authorization header
        others = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
        assert "sk-test" not in req.path + json.dumps(others) and b"sk-test" not in req.body


def test_random_faults_are_seeded(llama_server):
    def run():
        with FaultProxy(llama_server.base_url) as proxy, openai.OpenAI(
            base_url=proxy.base_url, api_key="sk-test", max_retries=0
        ) as c:
            proxy.random_faults(0.5, kinds=("429", "503"), seed=3)
            for _ in range(12):
                try:
                    c.models.list()
                except openai.APIStatusError:
                    pass
            assert proxy.received == 12 == proxy.forwarded + sum(proxy.by_kind.values())
            return [f for _, f in proxy.requests_log]

    first = run()
    assert first == run() and {"429", "503", None} == set(first)


def test_upstream_down_gives_502():
    with FaultProxy(f"http://127.0.0.1:{free_port()}/v1") as proxy, openai.OpenAI(
        base_url=proxy.base_url, api_key="sk-test", max_retries=0
    ) as c:
        with pytest.raises(openai.InternalServerError) as info:
            c.models.list()
        assert info.value.status_code == 502 and proxy.forwarded == 0


# ---- requests-per-minute emulation


def test_format_duration():
    assert [format_duration(s) for s in (0.02, 1, 8.64, 59.999, 360, 90.5, 3723)] == [
        "20ms", "1s", "8.64s", "59.999s", "6m0s", "1m30.5s", "1h2m3s"
    ]  # fmt: skip


def test_limit_rpm(client, fault_proxy):
    fault_proxy.limit_rpm(2)
    raw = client.models.with_raw_response.list()
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", raw.headers["x-ratelimit-reset-requests"])
    assert client.models.with_raw_response.list().headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        client.models.list()
    assert 55 <= int(info.value.response.headers["retry-after"]) <= 60
    assert (fault_proxy.rate_limited, fault_proxy.forwarded, fault_proxy.requests_log[-1][1]) == (1, 2, "rpm_429")
    fault_proxy.limit_rpm(1, window=0.3)  # a short window frees its slot
    client.models.list()
    time.sleep(0.35)
    client.models.list()
    assert fault_proxy.rate_limited == 1


# ---- fake Batch API


def _jsonl(model, ids, max_tokens=2):
    rows = [
        {"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": MSGS, "temperature": 0, "max_tokens": max_tokens}}
        for i in ids
    ]  # fmt: skip
    return io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())


def _wait(client, batch_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
            return b
        time.sleep(0.1)


def test_batch_round_trip(client, fault_proxy, llama_server):
    fault_proxy.batch_fail_custom_ids = {"c"}
    f = client.files.create(file=("in.jsonl", _jsonl(llama_server.model, ["a", "b", "c"])), purpose="batch")
    assert (f.object, f.purpose, f.filename, f.status) == ("file", "batch", "in.jsonl", "processed")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t"}
    )
    assert (b.object, b.status, b.metadata, b.input_file_id) == ("batch", "validating", {"run": "t"}, f.id)
    b = _wait(client, b.id)
    assert b.status == "completed" and b.model == llama_server.model
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 2, 1)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.usage.output_tokens == 4
    out = [json.loads(line) for line in client.files.content(b.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b"]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        assert o["response"]["body"]["object"] == "chat.completion" and o["response"]["body"]["choices"]
    err = [json.loads(line) for line in client.files.content(b.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in err] == [("c", 500)]
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    page = client.batches.list(limit=5)
    assert [x.id for x in page.data] == [b.id] and page.has_more is False
    assert fault_proxy.batches_created == 1 and fault_proxy.batch_lines_forwarded == 2


def test_batch_cancel_and_validation_failure(client, fault_proxy, llama_server):
    fault_proxy.batch_delay = 30
    f = client.files.create(file=("in.jsonl", _jsonl(llama_server.model, ["x"])), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(b.id).request_counts.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.batches.retrieve(b.id).status == "in_progress"  # held by batch_delay
    assert client.batches.cancel(b.id).status == "cancelling"
    b = _wait(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at and b.output_file_id  # partial results are kept

    bad = io.BytesIO(b'{"custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {}}\nnot json\n')
    f = client.files.create(file=("bad.jsonl", bad), purpose="batch")
    b = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)  # fmt: skip
    assert b.status == "failed" and [(e.code, e.line) for e in b.errors.data] == [
        ("mismatched_endpoint", 1), ("invalid_json_line", 2)
    ]  # fmt: skip
    page = client.batches.list(limit=1)
    assert page.data[0].id == b.id and page.has_more is True
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert fault_proxy.batches_created == 2 and fault_proxy.errors == []


# ---- the in-process fake (openai_fake.py)


def _fake_call(fake: FakeOpenAI, **kw):
    """One chat completion through the SDK's async client and the fake's transport: the raw response, or the
    exception the SDK raised."""

    async def go():
        client = openai.AsyncOpenAI(base_url="https://fake.test/v1", api_key="sk-test", max_retries=0,
                                    http_client=fake.client())  # fmt: skip
        args = dict(model="m", messages=MSGS, temperature=0, max_tokens=3)
        args.update(kw)
        try:
            return await client.chat.completions.with_raw_response.create(**args)
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            return e

    try:
        return asyncio.run(go())
    finally:
        fake.close()


LABEL_PROMPT = [{"role": "user", "content": (
    'Is the review positive or negative?\n\nLabels:\n- positive\n- negative\n\nText:\n"""\nA lovely meal.\n"""'
    "\n\nWhich label fits the text? Answer with one of: positive, negative."
)}]  # fmt: skip


def test_fake_answers_in_openai_format_with_top_logprobs_usage_and_n_choices():
    fake = FakeOpenAI(lambda text, labels: "positive" if "lovely" in text else "negative", cache_prefix=True)
    _fake_call(fake, messages=LABEL_PROMPT)  # the first call fills the prompt cache
    raw = _fake_call(fake, messages=LABEL_PROMPT, logprobs=True, top_logprobs=5, seed=0)
    r = raw.parse()
    assert raw.headers["x-request-id"] and r.object == "chat.completion" and r.model == "m"
    (choice,) = r.choices
    assert choice.message.content == "positive" and choice.finish_reason == "stop"
    (step,) = choice.logprobs.content
    assert step.token == "positive" and step.bytes == list(b"positive") and len(step.top_logprobs) == 5
    probs = {t.token: math.exp(t.logprob) for t in step.top_logprobs}
    shown = probs["positive"] / (probs["positive"] + probs["negative"])
    assert shown == pytest.approx(expected_probs("positive", ["positive", "negative"])[0])
    assert [t.logprob for t in step.top_logprobs] == sorted((t.logprob for t in step.top_logprobs), reverse=True)
    u = r.usage
    assert u.prompt_tokens == prompt_tokens({"messages": LABEL_PROMPT}) and u.completion_tokens == 1
    assert u.total_tokens == u.prompt_tokens + 1 and 0 < u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    # sampled: n choices following the cycle (chosen, chosen, next, none)
    r = _fake_call(fake, messages=LABEL_PROMPT, temperature=1.0, n=4, max_tokens=8).parse()
    assert [c.message.content for c in r.choices] == ["positive", "positive", "negative", "I am not sure."]
    assert r.choices[0].logprobs is None and r.usage.completion_tokens == 1 + 1 + 1 + 4
    # a provider that ignores n answers one choice
    fake.honour_n = False
    assert len(_fake_call(fake, messages=LABEL_PROMPT, temperature=1.0, n=4).parse().choices) == 1
    assert fake.received == fake.answered == 4


@pytest.mark.parametrize(
    "kind, exc, status",
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("400", openai.BadRequestError, 400),
        ("401", openai.AuthenticationError, 401),
        ("403", openai.PermissionDeniedError, 403),
        ("404", openai.NotFoundError, 404),
    ],
)
def test_fake_status_faults_are_what_the_proxy_and_openai_send(kind, exc, status):
    fake = FakeOpenAI(faults=[kind], retry_after="7")
    e = _fake_call(fake)
    assert isinstance(e, exc) and e.status_code == status
    assert set(e.body) == {"message", "type", "param", "code"} and e.body["message"]
    assert e.body["type"] in ("requests", "server_error", "invalid_request_error")
    if kind == "429":
        assert e.response.headers["retry-after"] == "7" and e.body["code"] == "rate_limit_exceeded"
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert e.response.headers["x-ratelimit-reset-requests"] == "120ms"
    if kind == "401":
        assert e.body["code"] == "invalid_api_key" and "sk-test" not in e.response.text
    assert fake.answered == 0 and fake.by_kind == {kind: 1}


@pytest.mark.parametrize(
    "kind, check",
    [
        ("timeout", lambda e: isinstance(e, openai.APITimeoutError)),
        ("connect", lambda e: isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError)),
        ("cut", lambda e: isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError)),
        ("malformed", lambda e: isinstance(e, json.JSONDecodeError)),  # as the proxy's malformed fault above
    ],
)
def test_fake_transport_faults_raise_what_real_sockets_raise(kind, check):
    fake = FakeOpenAI(faults=[kind])
    if kind == "malformed":  # the SDK parses the body lazily
        raw = _fake_call(fake)
        with pytest.raises(json.JSONDecodeError):
            raw.parse()
    else:
        assert check(_fake_call(fake))
    assert fake.answered == (0 if kind == "connect" else 1)  # only a refused connection did no work


def test_fake_refuses_a_wrong_key_an_unknown_model_and_too_many_top_logprobs():
    fake = FakeOpenAI(key="sk-right", model="gpt-4o-mini")
    e = _fake_call(fake)  # OpenAI echoes a wrong key masked, as here
    assert isinstance(e, openai.AuthenticationError) and "sk-***test" in e.message and "sk-test" not in e.message
    fake.key = None
    e = _fake_call(fake)
    assert isinstance(e, openai.NotFoundError) and e.body["code"] == "model_not_found"
    e = _fake_call(fake, model="gpt-4o-mini", logprobs=True, top_logprobs=21)
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "top_logprobs"
    assert _fake_call(fake, model="gpt-4o-mini").parse().choices[0].message.content
    assert fake.received == 4 and fake.answered == 1


def test_fake_limit_rpm_sends_openais_headers_and_refuses_past_the_window():
    fake = FakeOpenAI().limit_rpm(2, window=0.3)
    first, second = _fake_call(fake), _fake_call(fake)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+ms", second.headers["x-ratelimit-reset-requests"])
    e = _fake_call(fake)
    assert isinstance(e, openai.RateLimitError) and e.response.headers["retry-after"] == "1"
    assert 0 < int(e.response.headers["retry-after-ms"]) <= 300
    time.sleep(0.35)
    assert _fake_call(fake).parse().choices and fake.rate_limited == 1 and fake.log[2] == "rpm_429"
