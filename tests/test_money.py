"""Prices, budget reservations, rate-limit headers and secret scrubbing: the arithmetic money depends on."""

from __future__ import annotations

import email.utils
import time
from datetime import datetime, timedelta, timezone

import pytest

from protege.errors import BudgetReached, RecipeError
from protege.labeling.engine import Budget, RateControl, _duration
from protege.recipe import TeacherConfig
from protege.teachers._api import retry_after, scrub
from protege.teachers.base import Price, Request, worst_case_tokens
from protege.teachers.presets import PRESETS, resolve_price


def test_price_of_a_call_counts_cached_input_apart():
    p = Price(input=2.0, cached_input=0.5, output=8.0)
    assert p.cost(1_000_000, 0) == pytest.approx(2.0)
    assert p.cost(1000, 500, cached_input_tokens=400) == pytest.approx((600 * 2.0 + 400 * 0.5 + 500 * 8.0) / 1e6)
    assert p.cost(1000, 500, factor=0.5) == pytest.approx(0.5 * (1000 * 2.0 + 500 * 8.0) / 1e6)


def test_price_table_lookup_and_recipe_overrides():
    cfg = TeacherConfig(model="openai:gpt-4o-mini")
    assert resolve_price(cfg, PRESETS["openai"], "openai", "gpt-4o-mini") == Price(0.15, 0.075, 0.60)
    # a dated snapshot costs what its family costs
    assert resolve_price(cfg, PRESETS["openai"], "openai", "gpt-4o-mini-2024-07-18") == Price(0.15, 0.075, 0.60)
    cfg = TeacherConfig(model="openai:gpt-4o-mini", price_output=1.0)
    assert resolve_price(cfg, PRESETS["openai"], "openai", "gpt-4o-mini") == Price(0.15, 0.075, 1.0)
    # a local server is free unless the recipe says otherwise
    assert resolve_price(TeacherConfig(), PRESETS["vllm"], "vllm", "anything").free
    # an unknown paid model is refused, not run at an unknown price
    with pytest.raises(RecipeError, match="no price is known.*teacher.price_input"):
        resolve_price(TeacherConfig(), PRESETS["openai"], "openai", "gpt-9")
    with pytest.raises(RecipeError, match="set both"):
        resolve_price(TeacherConfig(price_input=1.0), PRESETS["openai"], "openai", "gpt-9")
    given = TeacherConfig(price_input=1.0, price_output=3.0)
    assert resolve_price(given, PRESETS["openai"], "openai", "gpt-9") == Price(1.0, 1.0, 3.0)


def test_budget_reserves_worst_case_and_settles_actual_cost():
    b = Budget(cap=1.0, spent=0.25)
    b.reserve(0.5)
    b.reserve(0.25)  # exactly at the cap is allowed
    with pytest.raises(BudgetReached, match="rerun with a higher --teacher.budget_usd"):
        b.reserve(0.01)
    b.settle(0.5, spent=0.1)  # the call cost less than its worst case: room frees up
    b.reserve(0.3)
    b.settle(0.25, spent=0.0, uncertain=0.25)  # a timeout: it may have been billed, so it still counts
    assert (b.spent, b.uncertain, b.reserved) == pytest.approx((0.35, 0.25, 0.3))
    with pytest.raises(BudgetReached):
        b.reserve(0.2)
    assert b.spent + b.uncertain + b.reserved <= 1.0 + 1e-12
    assert Budget(cap=None, spent=10.0).reserve(1e9) is None  # no cap, no limit


def test_worst_case_input_tokens_bound_byte_level_tokenizers():
    req = Request(messages=({"role": "user", "content": "héllo wörld " * 10},), labels=("a", "b"), text="x")
    n_bytes = len(("héllo wörld " * 10).encode())
    assert worst_case_tokens(req) >= n_bytes  # a byte-level BPE never spends less than a byte per token


def test_reset_durations_and_retry_after():
    assert _duration("1s") == 1.0 and _duration("6m0s") == 360.0 and _duration("20ms") == pytest.approx(0.02)
    assert _duration("1h2m3.5s") == pytest.approx(3723.5) and _duration("soon") is None
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after({"retry-after": when}) <= 31
    assert retry_after({}) is None and retry_after(None) is None


def test_exhausted_rate_window_pauses_everyone():
    rate = RateControl(None, None)
    rate.observe({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "10s"})
    assert rate.cooldown_until == 0.0
    rate.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"})
    assert 1.5 < rate.cooldown_until - time.monotonic() <= 2.0
    rate.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"})
    assert rate.cooldown_until - time.monotonic() > 300
    rate = RateControl(None, None)
    reset = (datetime.now(timezone.utc) + timedelta(seconds=20)).isoformat().replace("+00:00", "Z")
    rate.observe({"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset})
    assert 18 < rate.cooldown_until - time.monotonic() <= 20


def test_scrub_masks_the_key_and_key_shaped_strings():
    key = "sk-proj-ABCdef123456"
    assert key not in scrub(f"Incorrect API key provided: {key}.", key)
    assert "sk-***" in scrub("Incorrect API key provided: sk-abc12***********xyz9.", None)
    assert scrub("nothing secret here", key) == "nothing secret here"


def test_request_limit_paces_so_no_window_holds_more_than_the_limit():
    """At 600 requests per minute the limiter spaces requests by 60/599 s: any 60-second window then holds at
    most 600. Checked on a short run: 11 requests cannot be sent in less than 10 spacings (sleeps only run
    long, so this lower bound cannot flake)."""
    import asyncio

    async def send(n: int) -> list[float]:
        rate = RateControl(600, None)
        stamps = []
        for _ in range(n):
            await rate.wait(1)
            stamps.append(time.monotonic())
        return stamps

    stamps = asyncio.run(send(11))
    assert stamps[-1] - stamps[0] >= 10 * 60 / 599 - 1e-3


def test_a_pause_set_while_workers_queue_on_the_limiter_holds_them_back():
    """A 429 seen by one worker pauses everyone, including workers already queued on the request limiter: none
    of them may send before the pause ends (they did, and sent straight into the full window)."""
    import asyncio

    async def run() -> tuple[float, list[float]]:
        rate = RateControl(1200, None)  # one slot every ~50 ms
        sent: list[float] = []

        async def worker() -> None:
            await rate.wait(1)
            sent.append(time.monotonic())

        first = asyncio.create_task(worker())
        await first  # the first slot is free; the rest queue behind the pacing
        queued = [asyncio.create_task(worker()) for _ in range(4)]
        await asyncio.sleep(0.01)
        rate.pause(0.5)
        paused_until = rate.cooldown_until
        await asyncio.gather(*queued)
        return paused_until, sent[1:]

    paused_until, later = asyncio.run(run())
    assert len(later) == 4 and min(later) >= paused_until
    assert all(b - a >= 60 / 1199 - 1e-3 for a, b in zip(sorted(later), sorted(later)[1:]))  # still paced


def test_output_cap_is_sent_in_the_parameter_each_provider_honours():
    """The budget's worst case assumes the output cap is enforced, so it must be sent under the name the
    provider reads: OpenAI's reasoning models refuse max_tokens and bound hidden reasoning only by
    max_completion_tokens; other OpenAI-compatible servers read max_tokens."""
    from protege.teachers.openai_api import OpenAITeacher

    req = Request(messages=({"role": "user", "content": "hi"},), labels=("a", "b"), text="hi")
    openai = OpenAITeacher("gpt-4o-mini", TeacherConfig(model="openai:gpt-4o-mini", max_tokens=7))
    local = OpenAITeacher("m", TeacherConfig(model="openai:m", provider="vllm", max_tokens=7))
    assert openai._params(req, n=1)["max_completion_tokens"] == 7 and "max_tokens" not in openai._params(req, n=1)
    assert local._params(req, n=1)["max_tokens"] == 7 and "max_completion_tokens" not in local._params(req, n=1)
    assert openai.worst_case(req)[1] == 7


def test_cached_prompt_tokens_are_billed_at_the_cached_price_through_the_engine(tmp_path, openai_fake, monkeypatch):
    """OpenAI reports cached prompt tokens in ``usage.prompt_tokens_details.cached_tokens``: every call after the
    first shares the instruction block, so its cached part costs the cached price, row by row and in total,
    and the signal's usage keeps the cached count."""
    from openai_fake import prompt_tokens

    from protege.labeling.engine import run_api
    from protege.labeling.prompts import render_request
    from protege.recipe import build_recipe
    from protege.store import Store, call_key
    from protege.teachers import make_teacher

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-money")
    openai_fake.cache_prefix = True
    r = build_recipe({
        "task": {"instruction": "Classify the message by its intent.", "labels": ["billing", "shipping", "other"]},
        "teacher": {"model": "openai:gpt-4o-mini", "concurrency": 1, "max_tokens": 4},
    })  # fmt: skip
    teacher = make_teacher(r.teacher)
    texts = ["I was charged twice.", "Where is my parcel?", "Hello there.", "Refund my order please."]
    items = [(call_key(teacher.identity, q.to_json()), q) for q in (render_request(r.task, t) for t in texts)]
    with Store(tmp_path / "db") as store:
        done, stats = run_api(teacher, r.teacher, store, items, r.teacher.model, quiet=True)
        recorded = {k: store.get_signals([k])[k] for k, _ in items}
        spent = store.spent()
    price = Price(0.15, 0.075, 0.60)  # gpt-4o-mini, per million tokens
    shared = len(items[0][1].messages[0]["content"].split("Text:")[0].split())  # the instruction block's words
    cached = [0, shared, shared, shared]
    costs = [price.cost(prompt_tokens(b), 1, cached_input_tokens=c) for b, c in zip(openai_fake.bodies, cached)]
    assert openai_fake.received == 4 and openai_fake.cached_tokens == 3 * shared and shared > 10
    assert stats.cost_usd == pytest.approx(sum(costs), rel=1e-12) and spent == pytest.approx(sum(costs), rel=1e-12)
    assert costs[1] < costs[0] * 0.9  # the cache is worth something
    for (key, _), c in zip(items, cached):
        usage = recorded[key].usage
        assert usage.get("cached_input_tokens", 0) == c and usage["output_tokens"] == 1
    assert len(done) == 4
