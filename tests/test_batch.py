"""The OpenAI Batch API path: half price, the batch id persisted before waiting, and a crash mid-wait picks
the same batch up again (for classification and generation requests alike) instead of paying for a new one.
The Batch API is a fake in the test proxy that follows OpenAI's documented formats and sends each line to the
real llama.cpp server."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from servers import FaultProxy, llama_server  # noqa: F401  (fixture)
from test_api_teacher import rows, write_recipe

from conftest import stored_calls
from protege.labeling.data import load_splits
from protege.labeling.labeler import label, requests_for
from protege.recipe import load_recipe
from protege.store import Store, call_key
from protege.teachers import make_teacher

PRICES = {"price_input": 10.0, "price_output": 30.0}


@pytest.fixture
def proxy(llama_server):  # noqa: F811
    with FaultProxy(llama_server.base_url) as p:
        yield p


def _batches(db) -> list[tuple[str, str | None]]:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT status, batch_id FROM batches ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []


def test_batch_api_labels_at_half_price(tmp_path, proxy):
    recipe = write_recipe(tmp_path, proxy.base_url, rows=8, batch_api=True, batch_poll_s=0.2, **PRICES)
    batched = load_recipe(recipe)
    stats = label(batched, quiet=True)
    assert stats.called == 8 and stats.failed == 0
    assert proxy.batches_created == 2 and proxy.batch_lines_forwarded == 8  # one batch per split
    assert proxy.forwarded == 0  # nothing went through the synchronous endpoint
    ok = rows(batched.output_dir / "signals/train.jsonl") + rows(batched.output_dir / "signals/eval.jsonl")
    assert len(ok) == 8 and all(r["method"] == "label_logprobs" for r in ok)
    assert [s for s, _ in _batches(batched.store_path)] == ["collected", "collected"]

    # the same rows without the batch API: same answers, twice the price
    live = load_recipe(recipe, {"teacher.batch_api": False, "output_dir": "live"})
    label(live, quiet=True)
    with Store(batched.store_path) as a, Store(live.store_path) as b:
        ta, tb = a.teacher_totals(), b.teacher_totals()
        assert a.spent() == pytest.approx(ta["cost_usd"])  # reservations released on collection
    assert (ta["input_tokens"], ta["output_tokens"]) == (tb["input_tokens"], tb["output_tokens"])
    assert ta["cost_usd"] == pytest.approx(tb["cost_usd"] / 2) and ta["cost_usd"] > 0
    by_id = {r["id"]: r for r in rows(live.output_dir / "signals/train.jsonl")}
    for r in rows(batched.output_dir / "signals/train.jsonl"):
        assert r["teacher_label"] == by_id[r["id"]]["teacher_label"]


def _kill_once_submitted(cmd: list[str], db) -> list[tuple[str, str]]:
    """Run ``protege label`` with a batch teacher, kill -9 it once a batch is recorded as submitted (the client
    is waiting on the provider), and return the batches the store then holds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not any(s == "submitted" for s, _ in _batches(db)):
        assert time.monotonic() < deadline, "the batch was never recorded as submitted"
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return _batches(db)


def test_kill_9_while_waiting_resumes_the_same_batch(tmp_path, proxy):
    proxy.batch_delay = 4.0  # keep the batch in progress long enough to kill the client
    recipe = write_recipe(tmp_path, proxy.base_url, rows=6, batch_api=True, batch_poll_s=0.2, **PRICES)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "protege", "label", str(recipe), "-q"]
    (status, batch_id), = _kill_once_submitted(cmd, out / "protege.db")
    assert status == "submitted" and proxy.batches_created == 1

    proxy.batch_delay = 0.0
    res = subprocess.run(cmd, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert proxy.batches_created == 2  # the train batch was picked up again; only the eval split's is new
    assert _batches(out / "protege.db")[0] == ("collected", batch_id)
    assert proxy.batch_lines_forwarded == 6  # every row paid for once
    assert len(rows(out / "signals/train.jsonl")) + len(rows(out / "signals/eval.jsonl")) == 6


def test_a_batch_created_but_never_recorded_is_found_by_its_input_file(tmp_path, proxy):
    """The crash came after the batch was created and before its id was stored: the rerun finds it by the
    input file named in the store and adopts it; a file whose batch was never created is dropped."""
    recipe = write_recipe(tmp_path, proxy.base_url, rows=4, batch_api=True, batch_poll_s=0.2, **PRICES)
    r = load_recipe(recipe)
    train, _ = load_splits(r.data, r.task.label_names, r.training.seed)
    teacher = make_teacher(r.teacher)
    items = [(call_key(teacher.identity, q.to_json()), q) for q in requests_for(r, train)]

    async def create_unrecorded():
        api = teacher.batches()
        orphan_file = await api.prepare(items)  # uploaded, never batched
        file_id = await api.prepare(items)
        await api.create(file_id, items)
        await teacher.aclose()
        return orphan_file, file_id

    orphan_file, file_id = asyncio.run(create_unrecorded())
    with Store(r.store_path) as store:
        for f in (orphan_file, file_id):
            store.add_batch("openai", r.teacher.model, f, [(k, q.to_json()) for k, q in items], 0.5)
    assert proxy.batches_created == 1
    stats = label(r, quiet=True)
    assert stats.failed == 0
    assert proxy.batches_created == 2  # the adopted one, plus the eval split's
    assert [s for s, _ in _batches(r.store_path)] == ["abandoned", "collected", "collected"]
    assert proxy.batch_lines_forwarded == 4


def test_a_generation_batch_killed_while_waiting_is_collected_as_generation(tmp_path, proxy):
    """kill -9 after the batch id is recorded, on a generation task: the rerun rebuilds the batch's requests
    from the store with their generation settings, so the answers are read as generated text (not as labels)
    and stored under the keys they were sent with."""
    proxy.batch_delay = 4.0  # keep the batch in progress long enough to kill the client
    texts = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Name a fruit."]
    data = [{"id": f"q{i}", "text": t} for i, t in enumerate(texts)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
    recipe = {
        "task": {"kind": "generation", "instruction": "Answer briefly."},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "openai:smol", "provider": "llamacpp", "base_url": proxy.base_url, "max_tokens": 8,
                    "top_logprobs": 3, "timeout_s": 120, "batch_api": True, "batch_poll_s": 0.2, **PRICES},
        "student": {"model": "unused-here"},
        "output_dir": "out",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    (status, batch_id), = _kill_once_submitted([sys.executable, "-m", "protege", "label", str(path), "-q"],
                                                out / "protege.db")
    assert status == "submitted" and proxy.batches_created == 1

    proxy.batch_delay = 0.0
    r = load_recipe(path)
    stats = label(r, quiet=True)  # the rerun, in this process
    assert stats.called == 4 and stats.failed == 0
    assert proxy.batches_created == 2 and proxy.batch_lines_forwarded == 4  # collected, not bought again
    first, second = _batches(out / "protege.db")
    assert first == ("collected", batch_id) and second[0] == "collected"

    teacher = make_teacher(r.teacher)
    train, held = load_splits(r.data, None, r.training.seed)
    sent = {call_key(teacher.identity, q.to_json()): q.to_json() for q in requests_for(r, train + held)}
    stored = {k: c["request"] for k, c in stored_calls(out / "protege.db").items() if c["signal"] is not None}
    assert stored == sent and all("generate" in q for q in stored.values())
    for row in rows(out / "signals/train.jsonl") + rows(out / "signals/eval.jsonl"):
        assert row["teacher_text"] and "".join(row["token_logprobs"]["tokens"]) == row["teacher_text"]
        assert row["call_key"] in sent and len(row["token_logprobs"]["top"][0]) == 3
