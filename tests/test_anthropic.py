"""The anthropic: teacher through the real ``anthropic`` SDK and the labeling engine, against a scripted
Messages API behind an ``httpx2.MockTransport``.

The scripted responses follow Anthropic's documented formats: a Message is ``{"id", "type": "message",
"role": "assistant", "model", "content": [blocks], "stop_reason", "stop_sequence", "usage"}``; an error is
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with 429 ``rate_limit_error`` (with
``retry-after``), 529 ``overloaded_error``, 500 ``api_error``; a Message Batches results line is
``{"custom_id", "result": {"type": "succeeded" | "errored" | "canceled" | "expired", ...}}``.

Every HTTP request the SDK sends is recorded, so the tests can count attempts and check where the key went.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest

import protege.labeling.engine as engine_mod
from conftest import stored_calls
from protege.errors import PermanentError, RecipeError
from protege.labeling.batch import run_batch
from protege.labeling.engine import run_api
from protege.labeling.prompts import render_generation, render_request
from protege.recipe import TaskConfig, TeacherConfig, build_recipe
from protege.signals import TeacherSignal
from protege.store import Store, call_key
from protege.teachers import make_teacher
from protege.teachers.anthropic_api import API_VERSION, AnthropicBatches, AnthropicTeacher
from protege.teachers.base import Request, TransientError, worst_case_tokens
from protege.teachers.parse import ParseError

KEY = "sk-ant-test-SECRET123"
MODEL = "claude-haiku-4-5"
HAIKU = (1.00, 0.10, 5.00)  # USD per million input, cached input, output tokens (presets.ANTHROPIC)
LABELS = {
    "billing": "charges, invoices, refunds",
    "shipping": "delivery and tracking",
    "technical": "crashes, errors, bugs",
    "account": "email, password, profile",
}
TEXTS = {
    "I was charged twice for order 1234.": "billing",
    "The app crashes every time I open settings.": "technical",
    "Please change the email address on my profile.": "account",
    "Where is my package? Tracking has not moved in a week.": "shipping",
    "You billed me after I cancelled, refund it.": "billing",
    "Login fails with error 500 on the website.": "technical",
}
USAGE = {"input_tokens": 150, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


# -- a scripted Messages API ---------------------------------------------------------------------------
def message(content: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5-20251001",
        "content": content,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": dict(usage or USAGE),
    }


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_response(status: int, text: str = "", headers: dict[str, str] | None = None) -> httpx2.Response:
    kind = ERRORS[status]
    return httpx2.Response(
        status,
        json=error_body(kind, text or kind.replace("_", " ")),
        headers={"request-id": "req_1", **(headers or {})},
    )


def label_of(body: dict[str, Any]) -> str:
    """The gold label of the text a request asks about."""
    content = body["messages"][-1]["content"]
    (label,) = [label for text, label in TEXTS.items() if text in content]
    return label


class FakeAnthropic:
    """Answers POST /v1/messages: the next scripted fault if any, else ``reply(body)`` (a string for one
    text block, or a list of content blocks). Records every request."""

    def __init__(self, reply: Callable[[dict[str, Any]], Any] = label_of, faults: list[Any] = (), usage=None):
        self.reply = reply
        self.faults = list(faults)
        self.usage = usage
        self.requests: list[httpx2.Request] = []
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.faults:
            fault = self.faults.pop(0)
            return fault(request) if callable(fault) else FAULTS[fault](request)
        content = self.reply(body)
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        return httpx2.Response(200, json=message(content, self.usage), headers={"request-id": "req_2"})

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self))


def _raise(exc: type[Exception], text: str) -> Callable[[httpx2.Request], httpx2.Response]:
    def fault(request: httpx2.Request) -> httpx2.Response:
        raise exc(text, request=request)

    return fault


FAULTS: dict[str, Callable[[httpx2.Request], httpx2.Response]] = {
    "429": lambda r: error_response(
        429,
        "Number of request tokens has exceeded your per-minute rate limit",
        {"retry-after": "0", "anthropic-ratelimit-requests-remaining": "0"},
    ),
    "529": lambda r: error_response(529, "Overloaded"),
    "500": lambda r: error_response(500, "Internal server error"),
    "malformed": lambda r: httpx2.Response(
        200, content=b'{"id": "msg_01", "type": "mess', headers={"content-type": "application/json"}
    ),
    "not-a-message": lambda r: httpx2.Response(200, json={"ok": True}),
    "html": lambda r: httpx2.Response(200, text="<html>bad gateway</html>", headers={"content-type": "text/html"}),
    "connect": _raise(httpx2.ConnectError, "connection refused"),
    "timeout": _raise(httpx2.ReadTimeout, "read timed out"),
}


# -- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def key_and_fast_backoff(monkeypatch):
    """The fake key in the environment, and no exponential backoff between retries (Retry-After still
    counts), so the file runs in seconds."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setattr(engine_mod, "wait_exponential_jitter", lambda **kw: lambda state: 0.0)


def recipe(**teacher: Any) -> tuple[TaskConfig, TeacherConfig]:
    r = build_recipe(
        {
            "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS},
            "teacher": {"model": f"anthropic:{MODEL}", "concurrency": 2, "max_retries": 3, "timeout_s": 5, **teacher},
        }
    )
    return r.task, r.teacher


def items_for(teacher: AnthropicTeacher, requests: list[Request]) -> list[tuple[str, Request]]:
    return [(call_key(teacher.identity, r.to_json()), r) for r in requests]


def run(tmp_path: Path, teacher: AnthropicTeacher, cfg: TeacherConfig, requests: list[Request]):
    items = items_for(teacher, requests)
    with Store(tmp_path / "db") as store:
        done, stats = run_api(teacher, cfg, store, items, cfg.model, quiet=True)
    return items, done, stats


def db(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "db") as c:
        return c.execute(sql).fetchall()


def send_once(teacher: AnthropicTeacher, request: Request):
    """One call through the teacher's SDK path, outside the engine: the Reply, or the exception raised."""

    async def go():
        try:
            return await teacher._send(teacher.params(request))
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            return e
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def one_request(
    task: TaskConfig, text: str = "I was charged twice for order 1234.", rationale: bool = False
) -> Request:
    return render_request(task, text, rationale)


# -- answers ---------------------------------------------------------------------------------------------
def test_hard_label_one_answer_per_text_and_the_system_prompt_goes_apart(tmp_path):
    task, cfg = recipe(label_method="hard_label")
    fake = FakeAnthropic()
    http = fake.client()
    teacher = AnthropicTeacher(MODEL, cfg, http_client=http)
    requests = [render_request(task, t) for t in list(TEXTS)[:3]]
    system = Request(
        messages=({"role": "system", "content": "You label support tickets."},) + requests[0].messages,
        labels=task.label_names,
        text=requests[0].text,
    )
    items, done, stats = run(tmp_path, teacher, cfg, [*requests, system])

    assert stats.ok == 4 and stats.failed == 0 and stats.attempts == 4 == len(fake.requests)
    for key, request in items:
        signal = done[key]
        gold = label_of({"messages": [dict(request.messages[-1])]})
        assert signal.distribution.method == "hard_label" and signal.distribution.top == gold
        assert signal.distribution.probs == tuple(1.0 if x == gold else 0.0 for x in task.label_names)
        assert signal.text == gold and signal.rationale is None and signal.thinking is None
    for req, body in zip(fake.requests, fake.bodies):
        assert str(req.url) == "https://api.anthropic.com/v1/messages" and req.method == "POST"
        assert req.headers["anthropic-version"] == API_VERSION
        assert body["model"] == MODEL and body["max_tokens"] == 16
        # API version 2026-10-21 refuses every sampling parameter, at any value
        assert not {"temperature", "top_p", "top_k", "thinking"} & set(body)
        assert [m["role"] for m in body["messages"]] == ["user"]
    with_system = [b for b in fake.bodies if "system" in b]
    assert len(with_system) == 1 and with_system[0]["system"] == "You label support tickets."
    assert with_system[0]["messages"] == [dict(system.messages[1])]
    assert not http.is_closed  # the engine closed the teacher's SDK client, not the caller's HTTP client


def test_samples_are_n_calls_with_an_empirical_distribution_and_unparseable_ones_counted(tmp_path):
    task, cfg = recipe(n_samples=4, parse_retries=0, concurrency=1, max_failed_fraction=1.0)
    assert cfg.label_method == "auto"
    answers = iter(["billing", "Billing.", "account", "I cannot tell from this message."] + ["no idea"] * 4)
    fake = FakeAnthropic(reply=lambda body: next(answers))
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    assert teacher.method == "samples" and teacher.identity["n_samples"] == 4
    assert teacher.worst_case(one_request(task)) == (worst_case_tokens(one_request(task)), 16, 4)
    requests = [one_request(task), one_request(task, "The app crashes every time I open settings.")]
    items, done, stats = run(tmp_path, teacher, cfg, requests)

    assert len(fake.requests) == 8 == stats.attempts  # one call per sample: the API has no n
    assert fake.bodies[0] == fake.bodies[1] == fake.bodies[2] == fake.bodies[3]
    dist = done[items[0][0]].distribution
    assert dist.method == "samples" and dist.n_samples == 3 and dist.covered_mass == pytest.approx(0.75)
    assert dict(zip(dist.labels, dist.probs)) == pytest.approx(
        {"billing": 2 / 3, "shipping": 0.0, "technical": 0.0, "account": 1 / 3}
    )
    assert done[items[0][0]].text == "billing"
    # the second text got four unparseable samples: recorded as failed, with the reason and what was said
    assert stats.failed == 1 and items[1][0] not in done
    ((status, error, raw, attempts),) = db(
        tmp_path, f"SELECT status, error, raw, attempts FROM calls WHERE key = '{items[1][0]}'"
    )
    assert status == "failed" and attempts == 4
    assert error.startswith("unparseable after 1 tries: none of 4 samples named a label") and "no idea" in raw


def test_a_rationale_is_stored_apart_from_the_answer(tmp_path):
    task, cfg = recipe(label_method="hard_label", rationale=True)
    why = "The customer says they were charged twice for one order, which is about a charge."
    fake = FakeAnthropic(reply=lambda body: f"{why}\n\nAnswer: {label_of(body)}")
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    items, done, _ = run(tmp_path, teacher, cfg, [one_request(task, rationale=True)])

    signal = done[items[0][0]]
    assert signal.text == "billing" and signal.rationale == why and signal.thinking is None
    assert signal.distribution.top == "billing" and signal.distribution.method == "hard_label"
    assert fake.bodies[0]["max_tokens"] == 512 and "Answer: <label>" in fake.bodies[0]["messages"][0]["content"]


def test_thinking_blocks_are_stored_in_thinking(tmp_path):
    task, cfg = recipe(label_method="hard_label", rationale=True, thinking_tokens=2048)
    thought = "They mention being charged twice. That is money, so billing, not shipping."
    why = "A double charge is a billing problem."
    content = [
        {"type": "thinking", "thinking": thought, "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"},
        {
            "type": "redacted_thinking",
            "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB9URj2pLmN3kF8/dW5hR7xJ0aP1oLs9yTcMnKVf2wRpEGjH9XaG0uK",
        },
        {"type": "text", "text": f"{why}\nAnswer: billing"},
    ]
    fake = FakeAnthropic(reply=lambda body: content)
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    request = one_request(task, rationale=True)
    assert teacher.worst_case(request) == (worst_case_tokens(request), 512 + 2048, 1)
    assert teacher.identity["thinking_tokens"] == 2048 and teacher.identity["temperature"] == "api-default"
    items, done, _ = run(tmp_path, teacher, cfg, [request])

    (body,) = fake.bodies
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 512 + 2048 > body["thinking"]["budget_tokens"]
    assert "temperature" not in body  # thinking needs temperature 1: the API's default, so none is sent
    signal = done[items[0][0]]
    assert (signal.thinking, signal.rationale, signal.text) == (thought, why, "billing")
    with Store(tmp_path / "db") as store:  # and it survives the store
        stored = store.get_signals([items[0][0]])[items[0][0]]
    assert stored.thinking == thought and stored.rationale == why and stored.distribution.top == "billing"


def test_usage_with_cache_reads_becomes_cost_through_the_engine(tmp_path):
    task, cfg = recipe(label_method="hard_label")
    usage = {"input_tokens": 150, "cache_read_input_tokens": 400, "cache_creation_input_tokens": 50, "output_tokens": 3}
    fake = FakeAnthropic(usage=usage)
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    assert (teacher.price.input, teacher.price.cached_input, teacher.price.output) == HAIKU
    requests = [render_request(task, t) for t in list(TEXTS)[:2]]
    items, done, stats = run(tmp_path, teacher, cfg, requests)

    # input counts every prompt token (150 fresh + 400 read from the cache + 50 written to it); 400 are cached
    per_call = (200 * 1.00 + 400 * 0.10 + 3 * 5.00) / 1e6
    assert stats.cost_usd == pytest.approx(2 * per_call)
    for key, _ in items:
        assert done[key].usage == {"input_tokens": 600, "output_tokens": 3, "cached_input_tokens": 400}
    with Store(tmp_path / "db") as store:
        totals = store.teacher_totals(cfg.model)
        assert store.spent() == pytest.approx(2 * per_call)
    assert totals["input_tokens"] == 1200 and totals["output_tokens"] == 6
    assert totals["cost_usd"] == pytest.approx(2 * per_call) and totals["uncertain_usd"] == 0


# -- retries and errors ---------------------------------------------------------------------------------------------
def test_rate_limits_are_retried_and_every_attempt_is_counted(tmp_path):
    task, cfg = recipe(label_method="hard_label", concurrency=2)
    fake = FakeAnthropic(faults=["429", "429"])
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    requests = [render_request(task, t) for t in list(TEXTS)[:4]]
    items, done, stats = run(tmp_path, teacher, cfg, requests)

    assert stats.ok == 4 and stats.failed == 0
    assert len(fake.requests) == 4 + 2 == stats.attempts and stats.retries == 2
    assert db(tmp_path, "SELECT SUM(attempts), COUNT(*) FROM calls") == [(6, 4)]
    assert all(done[k].distribution.top == label_of({"messages": [dict(r.messages[-1])]}) for k, r in items)


def test_overload_server_errors_and_broken_replies_are_retried(tmp_path):
    faults = ["529", "500", "malformed", "not-a-message", "html", "connect", "timeout"]
    # enough retries that a row that draws every fault (a retry can go out before the other worker's call)
    # still succeeds
    task, cfg = recipe(label_method="hard_label", concurrency=2, max_retries=len(faults))
    fake = FakeAnthropic(faults=faults)
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    requests = [render_request(task, t) for t in TEXTS]
    _, _, stats = run(tmp_path, teacher, cfg, requests)

    assert stats.ok == 6 and stats.failed == 0
    assert len(fake.requests) == 6 + len(faults) == stats.attempts
    # a broken body, a cut connection and a timeout may have been billed: their worst case stays counted
    worst = teacher.price.cost(min(worst_case_tokens(r) for r in requests), 16)
    assert stats.uncertain_usd >= 5 * worst > 0
    assert db(tmp_path, "SELECT SUM(uncertain_usd) FROM calls")[0][0] == pytest.approx(stats.uncertain_usd)


def test_what_a_retry_can_fix_and_what_it_cannot(tmp_path):
    task, cfg = recipe(label_method="hard_label")
    request = one_request(task)

    def outcome(response: httpx2.Response):
        fake = FakeAnthropic(faults=[lambda r: response])
        return send_once(AnthropicTeacher(MODEL, cfg, http_client=fake.client()), request)

    e = outcome(error_response(429, "rate limited", {"retry-after": "7"}))
    assert isinstance(e, TransientError) and e.retry_after == 7.0 and e.reason.startswith("HTTP 429 rate_limit_error")
    e = outcome(error_response(429, "rate limited"))
    assert isinstance(e, TransientError) and e.retry_after == 1.0  # no hint: a short pause for everyone
    e = outcome(error_response(529, "Overloaded"))
    assert isinstance(e, TransientError) and e.retry_after is None and "overloaded_error: Overloaded" in e.reason
    e = outcome(error_response(529, "Overloaded", {"retry-after": "2"}))
    assert isinstance(e, TransientError) and e.retry_after == 2.0 and not e.maybe_billed
    for status in (408, 409, 500, 504):
        assert isinstance(outcome(error_response(status)), TransientError), status
    for status in (400, 401, 402, 403, 404, 413):
        e = outcome(error_response(status, "refused"))
        assert isinstance(e, PermanentError) and f"HTTP {status}: refused" in str(e), status
    assert "check teacher.model" in str(outcome(error_response(404, "model: claude-nope")))
    spend = httpx2.Response(
        429,
        json={
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "You have reached your specified API usage limits.",
                "details": {"error_code": "enforced_spend_limit_reached"},
            },
        },
    )
    e = outcome(spend)
    assert isinstance(e, PermanentError) and "spend limit" in str(e)  # waiting does not lift a spend cap
    e = outcome(FAULTS["malformed"](None))
    assert isinstance(e, TransientError) and e.maybe_billed and e.reason == "malformed response body (JSONDecodeError)"
    assert e.raw == '{"id": "msg_01", "type": "mess'
    e = outcome(FAULTS["not-a-message"](None))
    assert isinstance(e, TransientError) and e.maybe_billed and e.raw == '{"ok":true}'


def test_a_refused_key_stops_the_run_at_once_without_leaking_it(tmp_path):
    task, cfg = recipe(label_method="hard_label", concurrency=1)
    refused = lambda r: error_response(401, f"invalid x-api-key: {KEY}")  # an echoing proxy
    fake = FakeAnthropic(faults=[refused])
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    requests = [render_request(task, t) for t in list(TEXTS)[:4]]
    with pytest.raises(PermanentError) as info:
        run(tmp_path, teacher, cfg, requests)

    message = str(info.value)
    assert "HTTP 401" in message and "check the key in $ANTHROPIC_API_KEY" in message
    assert KEY not in message and "invalid x-api-key: ***" in message
    assert len(fake.requests) == 1  # nothing else was sent
    ((status, error),) = db(tmp_path, "SELECT status, error FROM calls")
    assert status == "failed" and error.startswith("stopped: anthropic refused the request with HTTP 401")


def test_a_missing_key_is_an_error_before_any_call(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    task, cfg = recipe(label_method="hard_label")
    fake = FakeAnthropic()
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    with pytest.raises(RecipeError, match="export ANTHROPIC_API_KEY="):
        run(tmp_path, teacher, cfg, [one_request(task)])
    assert fake.requests == []


def test_the_key_goes_only_in_the_x_api_key_header(tmp_path):
    task, cfg = recipe(label_method="hard_label", concurrency=1, max_retries=1, max_failed_fraction=1.0)
    echo = lambda r: httpx2.Response(
        200, text=f"<html>proxy: bad key {KEY}</html>", headers={"content-type": "text/html"}
    )
    fake = FakeAnthropic(faults=["429", echo, echo])
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    requests = [render_request(task, t) for t in list(TEXTS)[:3]]
    _, _, stats = run(tmp_path, teacher, cfg, requests)
    # the first row got the 429, then the echoing page, and gave up; the second got the page, then its answer
    assert stats.ok == 2 and stats.failed == 1 and len(fake.requests) == 3 + 2 == stats.attempts
    ((raw,),) = db(tmp_path, "SELECT raw FROM calls WHERE status = 'failed'")
    assert raw == "<html>proxy: bad key ***</html>"

    refused = lambda r: error_response(401, f"invalid x-api-key {KEY}")
    fake.faults = [refused]
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    with pytest.raises(PermanentError) as info:
        run(tmp_path, teacher, cfg, [render_request(task, t) for t in list(TEXTS)[3:]])
    assert KEY not in str(info.value)

    assert len(fake.requests) == 5 + 1
    for req in fake.requests:
        assert req.headers["x-api-key"] == KEY
        assert "authorization" not in req.headers
        assert [name for name, value in req.headers.items() if KEY in value] == ["x-api-key"]
        assert KEY not in str(req.url) and KEY.encode() not in req.content
    assert KEY not in json.dumps(teacher.identity) and "api.anthropic.com" not in json.dumps(teacher.identity)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "db" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


# -- construction -----------------------------------------------------------------------------------------
def test_identity_and_what_the_constructor_refuses():
    _, cfg = recipe(label_method="hard_label", max_tokens=8)
    teacher = make_teacher(cfg)  # the factory wiring
    assert (
        isinstance(teacher, AnthropicTeacher)
        and teacher.backend == "anthropic"
        and teacher.key_env == "ANTHROPIC_API_KEY"
    )
    assert teacher.identity == {
        "backend": "anthropic",
        "model": MODEL,
        "method": "hard_label",
        "rationale": False,
        "max_tokens": 8,
        "thinking_tokens": None,
        "api_version": API_VERSION,
        "temperature": "api-default",
    }
    _, cfg = recipe(n_samples=5)
    assert AnthropicTeacher(MODEL, cfg).identity["n_samples"] == 5
    assert AnthropicTeacher(MODEL, cfg).identity["method"] == "samples"
    _, other = recipe(n_samples=6)
    assert AnthropicTeacher(MODEL, other).identity != AnthropicTeacher(MODEL, cfg).identity

    with pytest.raises(RecipeError, match="returns no logprobs"):
        recipe(label_method="logprobs")  # the recipe refuses it...
    bypass = TeacherConfig.model_construct(model=f"anthropic:{MODEL}", label_method="logprobs")
    with pytest.raises(RecipeError, match="returns no logprobs"):
        AnthropicTeacher(MODEL, bypass)  # ...and so does the teacher
    with pytest.raises(RecipeError, match="accepts no temperature"):
        AnthropicTeacher(MODEL, recipe(sample_temperature=0.5)[1])
    with pytest.raises(RecipeError, match="no price is known"):
        AnthropicTeacher("claude-unknown-9", recipe()[1])
    assert AnthropicTeacher("claude-unknown-9", recipe(price_input=2.0, price_output=9.0)[1]).price.output == 9.0
    assert AnthropicTeacher("claude-haiku-4-5-20251001", recipe()[1]).price.input == 1.00  # dated ids
    with pytest.raises(RecipeError, match="names no model"):
        AnthropicTeacher("", recipe()[1])
    with pytest.raises(RecipeError, match="applies to 'openai:' teachers"):
        AnthropicTeacher(MODEL, recipe(provider="deepseek")[1])


# -- Message Batches ---------------------------------------------------------------------------------------
def batch_json(status: str, **counts: int) -> dict[str, Any]:
    c = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, **counts}
    return {
        "id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message_batch",
        "processing_status": status,
        "request_counts": c,
        "ended_at": "2026-11-02T18:37:24.100435Z" if status == "ended" else None,
        "created_at": "2026-11-02T18:37:24.100435Z",
        "expires_at": "2026-11-03T18:37:24.100435Z",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results"
        if status == "ended"
        else None,
    }


def succeeded(custom_id: str, text: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "result": {"type": "succeeded", "message": message([{"type": "text", "text": text}], usage)},
    }


def test_batch_requests_results_and_outcomes_for_hard_labels():
    task, cfg = recipe(label_method="hard_label")
    requests = [render_request(task, t) for t in list(TEXTS)[:5]]
    posted: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        assert request.headers["x-api-key"] == KEY and "authorization" not in request.headers
        if request.method == "POST" and path == "/v1/messages/batches":
            posted.append(json.loads(request.content))
            return httpx2.Response(200, json=batch_json("in_progress", processing=5))
        if path == "/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF":
            return httpx2.Response(200, json=batch_json("ended", succeeded=2, errored=1, canceled=1, expired=1))
        if path.endswith("/results"):
            body = "".join(json.dumps(line) + "\n" for line in lines)
            return httpx2.Response(200, content=body.encode(), headers={"content-type": "application/binary"})
        raise AssertionError(f"unexpected {request.method} {path}")

    teacher = AnthropicTeacher(MODEL, cfg, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    api = AnthropicBatches(teacher)
    items = items_for(teacher, requests)
    keys = [k for k, _ in items]
    u = {"input_tokens": 100, "output_tokens": 2, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}
    lines += [
        succeeded(keys[0], "billing", u),
        succeeded(keys[1], "I am not sure what this is about.", u),
        {
            "custom_id": keys[2],
            "result": {"type": "errored", "error": error_body("invalid_request_error", "max_tokens: too large")},
        },
        {"custom_id": keys[3], "result": {"type": "canceled"}},
        {"custom_id": keys[4], "result": {"type": "expired"}},
        succeeded("someone-elses-request", "billing"),
    ]

    async def go():
        batch_id = await api.create(await api.prepare(items), items)
        status = await api.status(batch_id)
        got = await api.results(batch_id)
        await teacher.aclose()
        return batch_id, status, got

    batch_id, status, got = asyncio.run(go())
    assert batch_id == "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"
    assert status.done and status.state == "ended" and (status.succeeded, status.errored, status.expired) == (2, 1, 1)
    (body,) = posted
    assert [r["custom_id"] for r in body["requests"]] == keys
    assert all(r["params"] == teacher.params(req) for r, (_, req) in zip(body["requests"], items))
    assert body["requests"][0]["params"]["model"] == MODEL and "temperature" not in body["requests"][0]["params"]

    outcomes = {o.key: o for o in api.outcomes_of(got, dict(items))}
    assert set(outcomes) == set(keys)  # the stranger's line is ignored
    ok = outcomes[keys[0]]
    assert (
        ok.error is None and ok.signal.distribution.top == "billing" and ok.signal.distribution.method == "hard_label"
    )
    assert (ok.usage.input_tokens, ok.usage.output_tokens, ok.usage.cached_input_tokens) == (120, 2, 20)
    bad = outcomes[keys[1]]
    assert bad.signal is None and bad.error.startswith("unparseable batch answer") and bad.usage.input_tokens == 120
    assert outcomes[keys[2]].error == "batch request errored: invalid_request_error: max_tokens: too large"
    assert outcomes[keys[3]].error.startswith("batch request canceled")
    assert outcomes[keys[4]].error.startswith("batch request expired")
    assert all(outcomes[k].usage.input_tokens == 0 for k in keys[2:])  # not answered: not billed


def test_batch_samples_get_one_request_each_and_are_gathered_per_text():
    task, cfg = recipe(n_samples=3)
    teacher = AnthropicTeacher(MODEL, cfg)
    api = AnthropicBatches(teacher)
    requests = [render_request(task, t) for t in list(TEXTS)[:2]]
    items = items_for(teacher, requests)
    reqs = api.requests(items)
    ids = [r["custom_id"] for r in reqs]
    assert len(ids) == 6 == len(set(ids)) and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i) for i in ids)
    (k0, _), (k1, _) = items
    assert api.custom_ids(k0, requests[0]) == ids[:3] and all(i.startswith(k0[:56]) for i in ids[:3])

    lines = [
        succeeded(ids[0], "billing"),
        succeeded(ids[1], "account"),
        succeeded(ids[2], "billing"),
        succeeded(ids[3], "technical"),
        {"custom_id": ids[4], "result": {"type": "expired"}},
        succeeded(ids[5], "technical"),
    ]
    outcomes = {o.key: o for o in api.outcomes_of(reversed(lines), dict(items))}
    dist = outcomes[k0].signal.distribution
    assert dist.method == "samples" and dist.n_samples == 3
    assert dict(zip(dist.labels, dist.probs)) == pytest.approx(
        {"billing": 2 / 3, "shipping": 0, "technical": 0, "account": 1 / 3}
    )
    assert outcomes[k0].usage.input_tokens == 3 * 150
    assert outcomes[k1].signal is None and outcomes[k1].error.startswith("batch request expired")
    assert outcomes[k1].usage.input_tokens == 2 * 150  # the two answered samples were billed
    partial = {o.key: o for o in api.outcomes_of(lines[:2], dict(items))}
    assert list(partial) == [k0] and partial[k0].error == "1 of 3 answers missing from the batch results"


def test_signal_round_trips_through_json():
    task, cfg = recipe(label_method="hard_label")
    teacher = AnthropicTeacher(MODEL, cfg)
    body = message([{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "shipping"}])
    signal = teacher.signal_from_message(body, one_request(task))
    assert TeacherSignal.from_json(json.loads(json.dumps(signal.to_json()))) == signal
    assert signal.thinking == "hmm" and signal.distribution.top == "shipping"


def test_a_reply_without_an_answer_says_why():
    task, cfg = recipe(label_method="hard_label", thinking_tokens=1024)
    teacher = AnthropicTeacher(MODEL, cfg)
    cut = message([{"type": "thinking", "thinking": "Let me weigh billing against", "signature": "s"}])
    cut["stop_reason"] = "max_tokens"
    with pytest.raises(ParseError, match="cut at max_tokens before it gave an answer") as info:
        teacher.signal_from_message(cut, one_request(task))
    assert info.value.raw == "Let me weigh billing against"
    refusal = message([])
    refusal["stop_reason"] = "refusal"
    with pytest.raises(ParseError, match="declined to answer"):
        teacher.signal_from_message(refusal, one_request(task))


# -- the batch runner over Message Batches ---------------------------------------------------------------
CACHED_USAGE = {
    "input_tokens": 100, "output_tokens": 2, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0,
}


class FakeMessageBatches:
    """Message Batches in Anthropic's documented formats: POST creates a batch from its requests, GET reports
    it ended (after ``fail_polls`` 500s), the results line of each request is ``reply(params)``."""

    def __init__(self, reply: Callable[[dict[str, Any]], str], usage: dict[str, int] | None = None, fail_polls=0):
        self.reply, self.usage, self.fail_polls = reply, usage, fail_polls
        self.created: list[list[dict[str, Any]]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        n = len(self.created[-1]) if self.created else 0
        if request.method == "POST" and path == "/v1/messages/batches":
            self.created.append(json.loads(request.content)["requests"])
            return httpx2.Response(200, json=batch_json("in_progress", processing=len(self.created[-1])))
        if path == "/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF":
            if self.fail_polls:
                self.fail_polls -= 1
                return error_response(500, "Internal server error")
            return httpx2.Response(200, json=batch_json("ended", succeeded=n))
        if path.endswith("/results"):
            lines = [succeeded(r["custom_id"], self.reply(r["params"]), self.usage) for r in self.created[-1]]
            body = "".join(json.dumps(line) + "\n" for line in lines)
            return httpx2.Response(200, content=body.encode(), headers={"content-type": "application/binary"})
        raise AssertionError(f"unexpected {request.method} {path}")

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self))


def test_run_batch_bills_the_batch_discount_and_keeps_cached_tokens(tmp_path):
    task, cfg = recipe(label_method="hard_label", batch_api=True)
    fake = FakeMessageBatches(label_of, CACHED_USAGE)
    teacher = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    assert teacher.kind == "api" and teacher.batches().discount == 0.5
    items = items_for(teacher, [render_request(task, t) for t in list(TEXTS)[:3]])
    with Store(tmp_path / "db") as store:
        done, stats = run_batch(teacher, cfg, store, items, cfg.model, quiet=True)
        spent = store.spent()
    assert len(fake.created) == 1 and [r["custom_id"] for r in fake.created[0]] == [k for k, _ in items]
    assert stats.ok == 3 and stats.failed == 0
    for key, request in items:
        assert done[key].distribution.top == label_of({"messages": [dict(request.messages[-1])]})
        # the usage the signal carries is the one the engine would record, cached tokens included
        assert done[key].usage == {"input_tokens": 120, "output_tokens": 2, "cached_input_tokens": 20}
    one = teacher.price.cost(120, 2, 20) / 2
    assert stats.cost_usd == pytest.approx(3 * one) and spent == pytest.approx(3 * one) and one > 0
    assert db(tmp_path, "SELECT status, reserved_usd > 0 FROM batches") == [("collected", 1)]


def test_a_generation_batch_resumed_after_the_run_died_is_collected_as_generation(tmp_path):
    """The run dies while waiting (the batch id is recorded); the rerun rebuilds the requests from the store,
    so they must come back as generation requests: answered as text, stored under the key they were sent with."""
    r = build_recipe(
        {
            "task": {"kind": "generation", "instruction": "Reply to the customer in one sentence."},
            "teacher": {"model": f"anthropic:{MODEL}", "max_tokens": 32, "batch_api": True, "timeout_s": 5},
            "student": {"model": "unused-here"},
        }
    )
    cfg = r.teacher
    reply = "Sorry about that; we are looking into it now."
    fake = FakeMessageBatches(lambda params: reply, fail_polls=1)
    requests = [render_generation(r.task, t, cfg.max_tokens, cfg.top_logprobs) for t in list(TEXTS)[:3]]
    first = AnthropicTeacher(MODEL, cfg, http_client=fake.client())
    items = items_for(first, requests)
    with Store(tmp_path / "db") as store:
        with pytest.raises(anthropic.InternalServerError):
            run_batch(first, cfg, store, items, cfg.model, quiet=True)
        (pending,) = store.pending_batches(cfg.model)
    assert pending.status == "submitted" and pending.batch_id == "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"

    again = AnthropicTeacher(MODEL, cfg, http_client=fake.client())  # a new process builds a new teacher
    with Store(tmp_path / "db") as store:
        done, stats = run_batch(again, cfg, store, items, cfg.model, quiet=True)
    assert len(fake.created) == 1  # collected, not bought again
    assert stats.ok == 3 and stats.failed == 0 and stats.stopped is None
    for key, request in items:
        signal = done[key]
        assert signal.distribution is None and signal.text == reply and signal.answer == reply
    stored = {k: c["request"] for k, c in stored_calls(tmp_path / "db").items() if c["signal"] is not None}
    assert set(stored) == {k for k, _ in items}
    for key, request in items:
        assert stored[key] == request.to_json() and call_key(again.identity, stored[key]) == key
    assert db(tmp_path, "SELECT status FROM batches") == [("collected",)]
