"""kill -9 during labeling, then resume: nothing lost, nothing recorded twice, same answers."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from conftest import write_jsonl
from servers import llama_server  # noqa: F401  (fixture)

from protege.demo_data import make_examples


def _count(db) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _attempts(db) -> int:
    with sqlite3.connect(db, timeout=5) as c:
        return c.execute("SELECT SUM(attempts) FROM calls").fetchone()[0]


def _label(recipe, out, *flags):
    cmd = [sys.executable, "-m", "protege", "label", str(recipe), "-q", "--output_dir", str(out), *flags]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_recipe):
    # 300 rows: three kills take at most 3 * 60 of them, so each kill lands mid-run and the resume has work left
    n = 300
    write_jsonl(tiny_recipe.parent / "data.jsonl", make_examples(n, seed=7))
    rng = random.Random(0)
    killed = tiny_recipe.parent / "killed"
    db = killed / "protege.db"
    for _ in range(3):
        before = _count(db)
        target = before + rng.randint(20, 60)
        proc = _label(tiny_recipe, killed, "--teacher.batch_size", "1")
        while proc.poll() is None and _count(db) < target:
            time.sleep(0.02)
        assert proc.poll() is None, "labeling finished before it could be killed; make the run longer"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        after = _count(db)
        assert after >= target > before  # every committed call survived the kill

    proc = _label(tiny_recipe, killed, "--teacher.batch_size", "1")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]

    clean = tiny_recipe.parent / "clean"
    proc = _label(tiny_recipe, clean, "--teacher.batch_size", "1")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]

    assert _count(db) == _count(clean / "protege.db") == n  # one row per unique request, none twice
    for split in ("train", "eval"):
        a = [json.loads(x) for x in (killed / "signals" / f"{split}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (clean / "signals" / f"{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in a] == [r["id"] for r in b]
        for ra, rb in zip(a, b):
            assert ra["call_key"] == rb["call_key"]
            assert max(abs(x - y) for x, y in zip(ra["teacher_probs"], rb["teacher_probs"])) < 1e-6


def test_kill_9_during_api_labeling_loses_no_answer_and_buys_none_twice(tmp_path, llama_server):  # noqa: F811
    """kill -9 a labeling run against the loopback server at random points, rerun to the end, compare with an
    uninterrupted run: same rows, same answers, and the only calls paid twice are those in flight at a kill."""
    from servers import FaultProxy
    from test_api_teacher import write_recipe

    # 20 rows: three kills take at most 3 * 5 of them (a real server answers about one a second), so each kill
    # lands mid-run and the resume has work left
    n, concurrency, kills = 20, 4, 3
    with FaultProxy(llama_server.base_url) as proxy:
        recipe = write_recipe(tmp_path, proxy.base_url, rows=n, concurrency=concurrency)
        killed = tmp_path / "killed"
        db = killed / "protege.db"
        rng = random.Random(1)
        for _ in range(kills):
            before = _count(db)
            target = before + rng.randint(2, 5)
            proc = _label(recipe, killed)
            while proc.poll() is None and _count(db) < target:
                time.sleep(0.01)
            assert proc.poll() is None, "labeling finished before it could be killed; make the run longer"
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            assert _count(db) >= target > before
        proc = _label(recipe, killed)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        paid = proxy.forwarded
        assert _count(db) == n  # one row per unique request, none twice
        # every call that reached the server is a recorded attempt (answers naming no label are asked again,
        # and that is recorded too), except at most the ones in flight at a kill
        recorded = _attempts(db)
        assert n <= recorded <= paid <= recorded + kills * concurrency

        clean = tmp_path / "clean"
        proc = _label(recipe, clean)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert proxy.forwarded - paid == _attempts(clean / "protege.db")

    for split in ("train", "eval"):
        a = [json.loads(x) for x in (killed / "signals" / f"{split}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (clean / "signals" / f"{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in a] == [r["id"] for r in b]
        for ra, rb in zip(a, b):
            assert ra["call_key"] == rb["call_key"] and ra["teacher_label"] == rb["teacher_label"]
            assert max(abs(x - y) for x, y in zip(ra["teacher_probs"], rb["teacher_probs"])) < 1e-4
