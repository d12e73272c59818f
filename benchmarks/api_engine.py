"""Benchmark of protege's labeling engine for API teachers (``protege.labeling.engine.run_api``), on loopback only.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api_engine.py            # full run (~11 min), writes BENCHMARKS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api_engine.py --quick    # smoke run (~1 min), no BENCHMARKS.md

Two servers, both on 127.0.0.1:

* llama.cpp's OpenAI-compatible server (``tests/servers.py:LlamaServer``) serving the packaged
  SmolLM2-135M-Instruct. It answers ONE request at a time, so throughput with more calls in flight plateaus at
  its service rate: what the concurrency sweep shows is whether the engine keeps a serial server busy and whether
  it slows down at high concurrency, not how a real provider scales.
* an "instant" endpoint started by this script in a subprocess (plain asyncio, keep-alive): every
  ``/v1/chat/completions`` gets the same valid completion with ``logprobs`` at once, so the server's time is
  about zero and what is left is the client: the SDK, and the engine on top of it.

Measured, side by side in one run:

1. throughput as concurrency grows (1, 4, 16, 64): the same rows at every level, a fresh store each time (nothing
   cached), run in the order 1 4 16 64 64 16 4 1 with half the rows per pass to cancel drift; against llama.cpp
   and against the instant endpoint (the engine's own ceiling on this machine);
2. the engine's overhead per call against a bare ``openai.AsyncOpenAI`` loop sending the same requests (the
   teacher's own ``_params``), concurrency 1, in alternating rounds (A B B A ...); wall ms and client CPU ms
   per call, against llama.cpp and against the instant endpoint; plus the time the engine spends in
   ``Store.put`` (serialising each row's signal, one SQLite transaction);
3. the replay of 1,000 cached rows: ``protege.labeling.labeler.label`` once (instant endpoint), then again with every row in
   the store (0 calls), timed;
4. the fraction of a requests-per-minute limit achieved: ``FaultProxy.limit_rpm(R)`` (a sliding 60 s window, 429
   past it, OpenAI-style ``x-ratelimit-*`` headers) in front of the instant endpoint and
   ``teacher.requests_per_minute = R``; arrival times of the admitted calls are taken at the endpoint. Then (B)
   the proxy's limit at R/2 with the recipe still at R: only the provider's headers and 429s hold the engine back.

Nothing is timed-asserted; the checks are on counts (0 calls on replay, every row answered).
Work files go to runs/api_engine (git-ignored). ``--json FILE`` keeps every figure; ``--render FILE`` rewrites
the BENCHMARKS.md section from such a file without measuring (hand-written notes below the section's marker stay).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback servers live with the tests

import yaml
from servers import FaultProxy, LlamaServer

from protege.labeling.engine import run_api
from protege.labeling.labeler import label
from protege.labeling.prompts import render_request
from protege.recipe import Recipe, TeacherConfig, load_recipe
from protege.store import Store
from protege.teachers import make_teacher
from protege.teachers.base import Request

SECTION = "## API labeling engine (benchmarks/api_engine.py)"
NOTES_MARK = "<!-- notes below this line are kept when benchmarks/api_engine.py rewrites this section -->"
LABELS = ["positive", "negative"]
_GOOD = [
    "wonderful",
    "delightful",
    "excellent",
    "lovely",
    "superb",
    "charming",
    "great",
    "brilliant",
]
_BAD = [
    "awful",
    "terrible",
    "dreadful",
    "boring",
    "horrible",
    "dull",
    "disappointing",
    "bad",
]
_THINGS = ["film", "meal", "hotel", "book", "concert", "service", "phone", "game"]


def reviews(n: int, tag: str = "") -> list[dict]:
    """``n`` distinct short reviews (the same generator as tests/test_api_teacher.py, without randomness)."""
    out = []
    for i in range(n):
        good = i % 2 == 0
        word = (_GOOD if good else _BAD)[(i * 7 + i // 16) % 8]
        thing = _THINGS[(i // 2) % len(_THINGS)]
        out.append(
            {
                "id": f"r{tag}{i:05d}",
                "text": f"The {thing} was {word}. #{tag}{i}",
                "label": LABELS[not good],
            }
        )
    return out


# -- the instant endpoint ------------------------------------------------------------------------------------

# Run in its own process (``python -c``) so its CPU time is not the benchmark's. One fixed completion shaped like
# llama.cpp's (two generated tokens, 20 top_logprobs each); ``GET /stats`` returns the monotonic arrival times of
# the chat completions since the last ``POST /reset`` (CLOCK_MONOTONIC is system-wide on Linux).
_INSTANT_SERVER = r"""
import asyncio, json, sys, time

def step(token, first):
    alts = ([first, "negative" if first == "positive" else "positive", "Positive", "Negative", "neutral"]
            + [f"tok{i}" for i in range(15)])
    top = [{"token": t, "logprob": -0.05 - 0.4 * i, "bytes": None} for i, t in enumerate(alts)]
    return {"token": token, "logprob": -0.05, "bytes": None, "top_logprobs": top}

COMPLETION = json.dumps({
    "id": "chatcmpl-instant", "object": "chat.completion", "created": 1700000000, "model": sys.argv[1],
    "choices": [{"index": 0, "finish_reason": "length",
                 "message": {"role": "assistant", "content": "positive."},
                 "logprobs": {"content": [step("positive", "positive"), step(".", ".")]}}],
    "usage": {"prompt_tokens": 90, "completion_tokens": 2, "total_tokens": 92},
}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": sys.argv[1], "object": "model", "owned_by": "me"}]}).encode()
arrivals = []

async def handle(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, target = line.decode("latin-1").split(" ")[:2]
            length, close = 0, False
            while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            if length:
                await reader.readexactly(length)
            status = b"200 OK"
            if target.endswith("/chat/completions"):
                arrivals.append(time.monotonic())
                body = COMPLETION
            elif target.endswith("/models"):
                body = MODELS
            elif target == "/stats":
                body = json.dumps({"arrivals": arrivals}).encode()
            elif target == "/reset":
                arrivals.clear()
                body = b"{}"
            else:
                status, body = b"404 Not Found", b'{"error": {"message": "not found"}}'
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            if close:
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class InstantServer:
    """The fixed-answer endpoint above, in a subprocess."""

    def __init__(self, model: str = "instant"):
        self.model = model
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _INSTANT_SERVER, self.model],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def _get(self, path: str, method: str = "GET") -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        self._get("/reset", "POST")

    def arrivals(self) -> list[float]:
        return self._get("/stats")["arrivals"]


# -- helpers -------------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds the whole machine spent busy, and how much of it was this benchmark's processes (itself,
    llama.cpp, the instant endpoint): the rest is other load. The build machine is shared, and llama.cpp slows
    down many times over when other processes take its cores, so every figure comes with the other load it ran
    under. Linux /proc only; elsewhere the figures read 0."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        return (sum(v[:8]) - v[3] - v[4]) / self.tick  # all but idle and iowait (guest time is inside user)

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                total += (int(rest[11]) + int(rest[12])) / self.tick  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def snap(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._busy(), self._ours()

    @staticmethod
    def other(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict:
        """Between two snaps: wall seconds, our CPU seconds, other processes' CPU seconds and their share of
        the machine's capacity."""
        wall, busy, ours = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        other = max(0.0, busy - ours)
        return {
            "wall": wall,
            "ours_cpu": ours,
            "other_cpu": other,
            "other_share": other / (wall * (os.cpu_count() or 1)) if wall else 0.0,
        }


def make_recipe(work: Path, base_url: str, model: str, rows: int, tag: str = "", **teacher) -> Recipe:
    """A sentiment recipe as in tests/test_api_teacher.py, over ``rows`` distinct reviews."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews(rows, tag)))
    recipe = {
        "task": {
            "instruction": "Is the review positive or negative?",
            "labels": LABELS,
        },
        "data": {"path": "data.jsonl", "eval_fraction": 0.2},
        "teacher": {
            "model": f"openai:{model}",
            "provider": "llamacpp",
            "base_url": base_url,
            "max_tokens": 2,
            "timeout_s": 600,  # 64 calls queued at a serial server wait 64 service times
            "max_retries": 6,
            "parse_retries": 0,  # one call per row, so rows/s and calls/s are the same thing
            "max_failed_fraction": 1.0,
            **teacher,
        },
        "output_dir": "out",
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


def requests_for(recipe: Recipe, n: int, tag: str = "") -> list[Request]:
    return [render_request(recipe.task, r["text"]) for r in reviews(n, tag)]


def items_for(requests: list[Request], prefix: str) -> list[tuple[str, Request]]:
    return [(f"{prefix}-{i}", r) for i, r in enumerate(requests)]


def engine_run(cfg: TeacherConfig, items, store_path: Path, time_commits: bool = False) -> dict:
    """One ``run_api`` over ``items`` into a fresh store; wall and client CPU seconds around it."""
    if store_path.exists():
        store_path.unlink()
    teacher = make_teacher(cfg)
    with Store(store_path) as store:
        commit = [0.0]
        if time_commits:  # how much of the engine's time is the per-row SQLite transaction
            put = store.put

            def timed_put(*a, **k):
                t = time.perf_counter()
                try:
                    return put(*a, **k)
                finally:
                    commit[0] += time.perf_counter() - t

            store.put = timed_put
        w0, c0 = time.perf_counter(), time.process_time()
        _, stats = run_api(teacher, cfg, store, items, cfg.model, quiet=True)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "stats": stats, "commit": commit[0]}


async def _bare(base_url: str, timeout: float, params: list[dict]) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="not-needed", base_url=base_url, max_retries=0, timeout=timeout)
    try:
        for p in params:
            reply = await client.chat.completions.create(**p)
            if not reply.choices:
                raise RuntimeError("empty reply")
    finally:
        await client.close()


def bare_run(cfg: TeacherConfig, requests: list[Request]) -> dict:
    """The same requests, one after another, through the SDK alone: a fresh client per run (as the engine has)."""
    teacher = make_teacher(cfg)
    params = [teacher._params(r, n=1) for r in requests]  # exactly what the teacher sends
    w0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(_bare(cfg.base_url, cfg.timeout_s, params))
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


# -- 1. throughput vs concurrency ----------------------------------------------------------------------------


def sweep(recipe: Recipe, rows: int, levels: list[int], work: Path, name: str, meter: CpuMeter) -> list[dict]:
    """Same ``rows`` at every level, fresh store each pass, order 1 4 16 64 64 16 4 1 (half the rows a pass)."""
    reqs = requests_for(recipe, rows)
    halves = [reqs[: rows // 2], reqs[rows // 2 :]]
    acc = {
        c: {
            "rows": 0,
            "wall": 0.0,
            "engine": 0.0,
            "ok": 0,
            "failed": 0,
            "attempts": 0,
            "other_cpu": 0.0,
        }
        for c in levels
    }
    order = [(c, 0) for c in levels] + [(c, 1) for c in reversed(levels)]
    for c, half in order:
        cfg = recipe.teacher.model_copy(update={"concurrency": c})
        before = meter.snap()
        r = engine_run(cfg, items_for(halves[half], f"{c}-{half}"), work / f"sweep-{name}.db")
        load = CpuMeter.other(before, meter.snap())
        a, s = acc[c], r["stats"]
        a["other_cpu"] += load["other_cpu"]
        a["rows"] += len(halves[half])
        a["wall"] += r["wall"]
        a["engine"] += s.seconds
        a["ok"] += s.ok
        a["failed"] += s.failed
        a["attempts"] += s.attempts
        print(
            f"  [{name}] concurrency {c:>2} pass {half}: {len(halves[half])} rows in {r['wall']:.2f} s "
            f"(other load {100 * load['other_share']:.0f}% of the machine)",
            flush=True,
        )
    out = []
    for c in levels:
        a = acc[c]
        share = a["other_cpu"] / (a["wall"] * (os.cpu_count() or 1))
        out.append(
            {
                "concurrency": c,
                **a,
                "rows_per_s": a["rows"] / a["wall"],
                "other_share": share,
            }
        )
    return out


# -- 2. overhead per call ------------------------------------------------------------------------------------


def overhead(recipe: Recipe, calls: int, rounds: int, work: Path, name: str) -> dict:
    """Bare SDK loop (A) vs run_api at concurrency 1 (B) on the same requests, A B B A A B ... in ``rounds``
    rounds per side; each round sends ``calls // rounds`` requests, the same ones for A and B."""
    per = max(1, calls // rounds)
    reqs = requests_for(recipe, per * rounds, tag="o")
    cfg = recipe.teacher.model_copy(update={"concurrency": 1})
    # one untimed warm-up of each (imports, first connections, llama.cpp's prompt cache)
    bare_run(cfg, reqs[:2])
    engine_run(cfg, items_for(reqs[:2], "warm"), work / f"overhead-{name}.db")
    bare = {"wall": 0.0, "cpu": 0.0}
    eng = {"wall": 0.0, "cpu": 0.0, "commit": 0.0, "failed": 0, "attempts": 0}
    diffs = []  # per round: engine minus bare, ms per call (their spread gives the noise of the mean)
    for k in range(rounds):
        walls = {}
        chunk = reqs[k * per : (k + 1) * per]
        sides = ["bare", "engine"] if k % 2 == 0 else ["engine", "bare"]
        for side in sides:
            if side == "bare":
                r = bare_run(cfg, chunk)
                walls[side] = r["wall"]
                bare["wall"] += r["wall"]
                bare["cpu"] += r["cpu"]
            else:
                r = engine_run(
                    cfg,
                    items_for(chunk, f"o{k}"),
                    work / f"overhead-{name}.db",
                    time_commits=True,
                )
                walls[side] = r["wall"]
                for key in ("wall", "cpu", "commit"):
                    eng[key] += r[key]
                eng["failed"] += r["stats"].failed
                eng["attempts"] += r["stats"].attempts
        diffs.append(1e3 * (walls["engine"] - walls["bare"]) / len(chunk))
    n = per * rounds
    res = {
        "calls": n,
        "rounds": rounds,
        "bare_ms": 1e3 * bare["wall"] / n,
        "engine_ms": 1e3 * eng["wall"] / n,
        "bare_cpu_ms": 1e3 * bare["cpu"] / n,
        "engine_cpu_ms": 1e3 * eng["cpu"] / n,
        "commit_ms": 1e3 * eng["commit"] / n,
        "engine_failed": eng["failed"],
        "engine_attempts": eng["attempts"],
    }
    res["diff_ms"] = res["engine_ms"] - res["bare_ms"]
    res["diff_se_ms"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    res["diff_cpu_ms"] = res["engine_cpu_ms"] - res["bare_cpu_ms"]
    print(
        f"  [{name}] bare {res['bare_ms']:.2f} ms/call, engine {res['engine_ms']:.2f} ms/call",
        flush=True,
    )
    return res


# -- 3. replay of cached rows --------------------------------------------------------------------------------


def replay(base_url: str, model: str, rows: int, repeats: int, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    recipe = make_recipe(work, base_url, model, rows, tag="c", concurrency=16)
    t0 = time.perf_counter()
    first = label(recipe, quiet=True)
    first_s = time.perf_counter() - t0
    if first.called != rows or first.failed:
        raise SystemExit(f"replay setup: expected {rows} calls and 0 failures, got {first}")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        again = label(recipe, quiet=True)
        times.append(time.perf_counter() - t0)
        assert again.called == 0 and again.attempts == 0, again  # a replay makes no call
        assert again.cached == rows, again
    print(
        f"  replay of {rows} cached rows: {', '.join(f'{t:.3f}' for t in times)} s",
        flush=True,
    )
    return {
        "rows": rows,
        "first_s": first_s,
        "replays": times,
        "median": statistics.median(times),
        "min": min(times),
    }


# -- 4. requests-per-minute fraction -------------------------------------------------------------------------


def max_in_window(ts: list[float], window: float) -> int:
    return max(
        (bisect.bisect_right(ts, t + window - 1e-9) - i for i, t in enumerate(ts)),
        default=0,
    )


def rpm_fraction(
    instant: InstantServer, rpm: int, rows: int, concurrency: int, work: Path, provider_rpm: int | None = None
) -> dict:
    """``rows`` through the proxy limited to ``provider_rpm`` (default: the recipe's ``rpm``), the recipe set to
    ``rpm``; the achieved rate is taken as a fraction of the proxy's limit."""
    limit = provider_rpm or rpm
    with FaultProxy(instant.base_url) as proxy:
        proxy.limit_rpm(limit)
        recipe = make_recipe(
            work / "rpm",
            proxy.base_url,
            instant.model,
            4,
            requests_per_minute=rpm,
            concurrency=concurrency,
        )
        reqs = requests_for(recipe, rows, tag="rpm")
        instant.reset()
        r = engine_run(recipe.teacher, items_for(reqs, f"rpm{limit}"), work / f"rpm{limit}.db")
        ts = sorted(instant.arrivals())
        with proxy.lock:
            received, forwarded, limited = (
                proxy.received,
                proxy.forwarded,
                proxy.rate_limited,
            )
    s = r["stats"]
    span = ts[-1] - ts[0] if len(ts) > 1 else 0.0
    res = {
        "rpm": rpm,
        "limit": limit,
        "rows": rows,
        "concurrency": concurrency,
        "seconds": r["wall"],
        "ok": s.ok,
        "failed": s.failed,
        "attempts": s.attempts,
        "received": received,
        "forwarded": forwarded,
        "proxy_429": limited,
        "admitted": len(ts),
        "span_s": span,
        # admitted calls per minute from the first arrival to the last (the first second's burst included)
        "overall_rpm": (len(ts) - 1) / span * 60 if span else 0.0,
        # busiest 60 s sliding window: the proxy's own measure (it refuses past rpm)
        "max_window": max_in_window(ts, 60.0),
    }
    if span >= 60:  # the last full window, when the run is past its start-up
        res["last_window"] = len(ts) - bisect.bisect_right(ts, ts[-1] - 60.0)
    # steady rate: arrivals per second after the first 60 s window filled (second minute on)
    later = [t for t in ts if t > ts[0] + 60.0]
    if len(later) > 1:
        res["after_first_window_rpm"] = (len(later) - 1) / (later[-1] - later[0]) * 60
    # seconds with no admitted call at all (engine paused): gaps over 0.5 s between arrivals
    gaps = [b - a for a, b in itertools.pairwise(ts) if b - a > 0.5]
    res["pauses"] = len(gaps)
    res["pause_s"] = sum(gaps)
    res["fraction"] = res["overall_rpm"] / limit
    print(
        f"  recipe rpm {rpm}, proxy limit {limit}: {len(ts)} admitted in {span:.1f} s = {res['overall_rpm']:.1f}/min "
        f"({100 * res['fraction']:.1f}%), {limited} 429s from the proxy, {s.failed} rows failed",
        flush=True,
    )
    return res


# -- report --------------------------------------------------------------------------------------------------


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def commit_note() -> str:
    head = git("rev-parse", "--short", "HEAD")
    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:].startswith("src/")]
    return f"{head} plus uncommitted changes in {', '.join(sorted(dirty))}" if dirty else head


def para(text: str) -> list[str]:
    """A paragraph of generated prose as lines of at most 112 characters (the width of BENCHMARKS.md)."""
    return textwrap.wrap(text, 112, break_long_words=False, break_on_hyphens=False)


def markdown(res: dict, args: argparse.Namespace, cmd: str) -> str:
    m = res["meta"]
    lines = [
        SECTION,
        "",
        "The engine (`protege.labeling.engine.run_api` behind the `openai:` teacher) against loopback servers only: llama.cpp's",
        "OpenAI-compatible server with the packaged SmolLM2-135M-Instruct (`tests/servers.py:LlamaServer`, one request",
        "at a time), and an *instant* endpoint started by the script (a fixed valid completion with `logprobs`, no",
        "model: the server's time is about zero, so what is measured is the client). Requests are the sentiment",
        "task of `tests/test_api_teacher.py` (labels positive/negative, `label_method` logprobs, 20 `top_logprobs`,",
        f"`max_tokens` {args.max_tokens}, `parse_retries` 0 so one row is one call).",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: {m['machine']}",
        f"- Date: {m['date']}",
        f"- Commit: {m['commit']}",
        f"- Wall time: {m['wall_min']:.1f} min",
        f"- llama.cpp: `n_threads` {args.llama_threads} (`--llama-threads`), `n_ubatch` 1 as in the tests",
        "- Other load: the build machine is shared (other sessions run test suites with their own llama.cpp",
        "  servers). CPU the machine spent on processes other than this benchmark's three, as a share of its",
        f"  capacity: {100 * res['load']['idle']['other_share']:.0f}% in 10 s before the run; per part below.",
        "",
        "### 1. Throughput as concurrency grows",
        "",
        f"The same {args.sweep_rows} distinct rows at each level (llama.cpp; {args.instant_rows} against the instant",
        "endpoint), a fresh store each time so nothing is cached, levels run 1 4 16 64 64 16 4 1 with half the rows",
        "per pass (drift cancels). Wall time is around the whole `run_api` call.",
        "",
        (
            "| concurrency | llama.cpp rows | wall s | rows/s | vs concurrency 1 | other load "
            "| instant rows | wall s | rows/s | vs concurrency 1 | other load |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    llama, inst = res["sweep_llama"], res["sweep_instant"]
    for a, b in zip(llama, inst):
        lines.append(
            f"| {a['concurrency']} | {a['rows']} | {fmt_s(a['wall'])} | {a['rows_per_s']:.2f} | "
            f"{a['rows_per_s'] / llama[0]['rows_per_s']:.2f}x | {100 * a['other_share']:.0f}% | {b['rows']} | "
            f"{fmt_s(b['wall'])} | {b['rows_per_s']:.0f} | {b['rows_per_s'] / inst[0]['rows_per_s']:.2f}x | "
            f"{100 * b['other_share']:.0f}% |"
        )
    fails = sum(a["failed"] for a in llama + inst)
    retries = sum(a["attempts"] - a["ok"] - a["failed"] for a in llama + inst)
    lines += [
        "",
        f"Rows the teacher could not label (no label in the top alternatives; kept as failed, not retried): "
        f"{sum(a['failed'] for a in llama)} of {sum(a['rows'] for a in llama)} on llama.cpp, "
        f"{sum(a['failed'] for a in inst)} on the instant endpoint; HTTP retries: {retries}."
        if fails or retries
        else "Every row answered in one call (no HTTP retries, no unparseable answers).",
        "",
        *para(
            "llama.cpp's server answers one request at a time, so rows/s cannot grow past its service rate (about "
            f"{1 / max(a['rows_per_s'] for a in llama):.2f} s a row here at best). Concurrency 1 reaches "
            f"{100 * llama[0]['rows_per_s'] / max(a['rows_per_s'] for a in llama):.0f}% of the best level: there "
            "the server idles while the client reads a reply, records the row and sends the next request; with more "
            "calls in flight the next request is already queued. What this part measures is whether the engine keeps "
            "such a server busy and whether it slows down with 64 calls in flight (each then waits about 64 service "
            "times; the recipe sets `timeout_s` 600): "
            f"{100 * llama[-1]['rows_per_s'] / max(a['rows_per_s'] for a in llama):.0f}% of the best level at "
            f"{llama[-1]['concurrency']}. It does not measure how a real provider scales."
        ),
        "",
        *para(
            "Against the instant endpoint the client is the bottleneck: one Python process at about "
            f"{res['overhead_instant']['engine_cpu_ms']:.1f} ms of CPU per row (part 2) on a machine whose other "
            "core runs the endpoint, so more calls in flight do not raise the engine's ceiling of a few hundred "
            "rows/s here (asyncio and the HTTP pool cost a little more with 64 connections), which is far above "
            "what a rate-limited provider allows."
        ),
        "",
        "### 2. Engine overhead per call vs the bare SDK",
        "",
        "The same requests (the teacher's own request body, `OpenAITeacher._params`) sent by (A) a bare",
        "`openai.AsyncOpenAI` loop, one call after another, and (B) `run_api` at concurrency 1 (limits, budget",
        "reservation, tenacity retry wrapper, parsing the logprobs into a label distribution, one SQLite",
        "transaction per row); a fresh client per run on both sides; rounds alternate A B B A ... Wall ms and",
        "client-process CPU ms per call; the difference is the mean ± its standard error over the rounds.",
        "`store.put` is the engine's per-row commit: serialising the signal (20 alternatives per token) and one",
        "SQLite transaction (WAL, synchronous NORMAL).",
        "",
        (
            "| server | calls per side (rounds) | bare SDK ms/call | engine ms/call | difference | bare CPU ms/call "
            "| engine CPU ms/call | CPU difference | of which store.put | other load |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, key in (("llama.cpp", "overhead_llama"), ("instant", "overhead_instant")):
        o = res[key]
        lines.append(
            f"| {name} | {o['calls']} ({o['rounds']}) | {o['bare_ms']:.2f} | {o['engine_ms']:.2f} | "
            f"{o['diff_ms']:+.2f} ± {o['diff_se_ms']:.2f} ms ({100 * o['diff_ms'] / o['bare_ms']:+.1f}%) | "
            f"{o['bare_cpu_ms']:.2f} | {o['engine_cpu_ms']:.2f} | {o['diff_cpu_ms']:+.2f} ms | "
            f"{o['commit_ms']:.2f} ms | {100 * res['load'][key]['other_share']:.0f}% |"
        )
    rp = res["replay"]
    lines += [
        "",
        "### 3. Replay of cached rows",
        "",
        f"`protege.labeling.labeler.label` over {rp['rows']} rows (train and eval splits) once against the instant endpoint",
        f"({rp['first_s']:.2f} s, {rp['rows']} calls, concurrency 16), then again with every row in the store:",
        (
            f"0 calls (checked), **{rp['median']:.2f} s** median of {len(rp['replays'])} "
            f"({', '.join(f'{t:.2f}' for t in rp['replays'])} s), "
            f"i.e. {1e3 * rp['median'] / rp['rows']:.2f} ms per row,"
        ),
        "for reading the data, computing the cache keys, reading the signals and rewriting the signal files",
        f"(other load {100 * res['load']['replay']['other_share']:.0f}%).",
        "",
        "### 4. Requests-per-minute limit",
        "",
    ]
    q, u = {**res["rpm"], "part": "rpm"}, {**res["rpm_under"], "part": "rpm_under"}

    def pct(x: float, of: int) -> str:
        return f"{x:.0f} = {100 * x / of:.1f}%"

    def row(name: str, f) -> str:
        return f"| {name} | {f(q)} | {f(u)} |"

    lines += [
        "`FaultProxy.limit_rpm(L)` in front of the instant endpoint: a sliding 60 s window, past it a 429 with",
        "`Retry-After` and `x-ratelimit-*` headers; every admitted response carries `x-ratelimit-remaining-requests`",
        "and `x-ratelimit-reset-requests`, which the engine obeys (it pauses every worker when remaining is 0).",
        *para(
            "Arrival times of the admitted calls are taken at the endpoint. (A) the recipe's "
            f"`teacher.requests_per_minute` equals the provider's limit; {q['rows']} rows, "
            f"{q['rows'] / q['limit']:.1f} windows' worth. (B) the provider's limit is half the recipe's (a key shared "
            "with other jobs, a lower tier), so only the headers and 429s can hold the engine back; "
            f"{u['rows']} rows, {u['rows'] / u['limit']:.1f} windows' worth. `concurrency` {q['concurrency']}."
        ),
        "",
        f"| figure | (A) limit {q['limit']}, recipe {q['rpm']} | (B) limit {u['limit']}, recipe {u['rpm']} |",
        "| --- | ---: | ---: |",
        row("rows answered / failed", lambda x: f"{x['ok']} / {x['failed']}"),
        row("calls sent by the engine (retries included)", lambda x: f"{x['attempts']}"),
        row("429s sent by the proxy (all retried by the engine)", lambda x: f"**{x['proxy_429']}**"),
        row("calls admitted, first to last arrival", lambda x: f"{x['admitted']} in {x['span_s']:.1f} s"),
        row("achieved rate, whole run (per min, share of the limit)", lambda x: pct(x["overall_rpm"], x["limit"])),
        row(  # only meaningful when the run is paced, not paused, past its first window
            "achieved rate after the first 60 s",
            lambda x: (
                pct(x["after_first_window_rpm"], x["limit"])
                if x["rpm"] == x["limit"] and "after_first_window_rpm" in x
                else "-"
            ),
        ),
        row(
            "calls in the last full 60 s window",
            lambda x: pct(x["last_window"], x["limit"]) if "last_window" in x else "-",
        ),
        row("busiest 60 s window", lambda x: pct(x["max_window"], x["limit"])),
        row("gaps over 0.5 s with no call admitted", lambda x: f"{x['pauses']} ({x['pause_s']:.1f} s in all)"),
        row("wall time", lambda x: f"{x['seconds']:.1f} s"),
        row("other load on the machine", lambda x: f"{100 * res['load'][x['part']]['other_share']:.0f}%"),
        "",
        *para(
            "Goal (A): at least 95% of the limit with no 429 reaching the user -> "
            f"**{'met' if q['fraction'] >= 0.95 and q['failed'] == 0 else 'NOT met'}** "
            f"({100 * q['fraction']:.1f}% over the whole run, {q['failed']} rows failed, {q['proxy_429']} 429s "
            "from the proxy). In (B) the whole-run rate can exceed the limit (a first full window plus part of a "
            "second within little more than 60 s); the busiest 60 s window is the figure that must not pass it, "
            "and the 429s are what the engine sent into a window it had been told was full."
        ),
    ]
    return "\n".join(lines) + "\n"


def write_section(md: Path, section: str) -> None:
    """Replace this script's section of BENCHMARKS.md (or append it), keeping notes below NOTES_MARK."""
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    old = pattern.search(text)
    notes = ""
    if old and NOTES_MARK in old.group(0):
        notes = old.group(0).split(NOTES_MARK, 1)[1].strip()
    section = section.rstrip() + "\n\n" + NOTES_MARK + ("\n\n" + notes if notes else "") + "\n"
    if old:
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    md.write_text(text, encoding="utf-8")


def print_table(res: dict) -> None:
    print("\nthroughput (rows/s) by concurrency:")
    print(f"  {'conc':>4} {'llama rows/s':>13} {'wall s':>8} {'instant rows/s':>15} {'wall s':>8}")
    for a, b in zip(res["sweep_llama"], res["sweep_instant"]):
        print(
            f"  {a['concurrency']:>4} {a['rows_per_s']:>13.2f} {a['wall']:>8.2f} "
            f"{b['rows_per_s']:>15.0f} {b['wall']:>8.2f}"
        )
    print("overhead per call (concurrency 1):")
    for name in ("llama", "instant"):
        o = res[f"overhead_{name}"]
        print(
            f"  {name:>8}: bare {o['bare_ms']:.2f} ms, engine {o['engine_ms']:.2f} ms ({o['diff_ms']:+.2f}); "
            f"CPU bare {o['bare_cpu_ms']:.2f} ms, engine {o['engine_cpu_ms']:.2f} ms ({o['diff_cpu_ms']:+.2f}); "
            f"SQLite {o['commit_ms']:.2f} ms"
        )
    rp, q = res["replay"], res["rpm"]
    print(f"replay of {rp['rows']} cached rows: median {rp['median']:.3f} s ({rp['replays']})")
    print(
        f"rpm {q['rpm']}: {100 * q['fraction']:.1f}% achieved, {q['proxy_429']} 429s from the proxy, "
        f"{q['failed']} rows failed, busiest window {q['max_window']}"
    )
    u = res["rpm_under"]
    print(
        f"proxy limit {u['limit']} under recipe {u['rpm']}: {u['proxy_429']} 429s from the proxy, {u['failed']} rows "
        f"failed, busiest window {u['max_window']}, {u['pauses']} pauses ({u['pause_s']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~1 min); never writes BENCHMARKS.md",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work dir (default runs/api_engine[-quick])",
    )
    p.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    p.add_argument("--sweep-rows", type=int, default=160, help="rows per level against llama.cpp")
    p.add_argument(
        "--instant-rows",
        type=int,
        default=2000,
        help="rows per level against the instant endpoint",
    )
    p.add_argument(
        "--llama-calls",
        type=int,
        default=80,
        help="calls per side, overhead vs bare SDK on llama.cpp",
    )
    p.add_argument(
        "--instant-calls",
        type=int,
        default=2000,
        help="calls per side, overhead on the instant endpoint",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="alternating rounds per side in the overhead comparison",
    )
    p.add_argument("--replay-rows", type=int, default=1000)
    p.add_argument(
        "--rpm",
        type=int,
        default=600,
        help="requests-per-minute limit of the proxy and the recipe",
    )
    p.add_argument(
        "--rpm-rows",
        type=int,
        default=None,
        help="rows for the rpm part (default 1.5 x rpm: ~90 s)",
    )
    p.add_argument("--rpm-concurrency", type=int, default=16)
    p.add_argument("--provider-rpm", type=int, default=None, help="the proxy's limit in (B) (default rpm / 2)")
    p.add_argument("--under-rows", type=int, default=None, help="rows in (B) (default 1.1 x the proxy's limit)")
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument(
        "--llama-threads", type=int, default=1,
        help="llama.cpp threads (1: leaves a core to the client, and a shared machine slows it far less than 2)",
    )  # fmt: skip
    p.add_argument(
        "--no-md",
        action="store_true",
        help="do not write BENCHMARKS.md (always off with --quick)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    p.add_argument(
        "--render", type=Path, default=None, metavar="JSON",
        help="measure nothing: rewrite the BENCHMARKS.md section from a --json file of an earlier run",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:  # small sizes; (B) then stays inside one window (no pause): a smoke test of the code only
        args.sweep_rows, args.instant_rows, args.llama_calls, args.instant_calls = 16, 200, 8, 200
        args.rounds, args.replay_rows = 2, 200
        args.rpm_rows, args.under_rows = args.rpm_rows or 120, args.under_rows or 100
    args.rpm_rows = args.rpm_rows or int(1.5 * args.rpm)
    args.provider_rpm = args.provider_rpm or max(1, args.rpm // 2)
    args.under_rows = args.under_rows or int(1.1 * args.provider_rpm)
    levels = [int(x) for x in args.levels.split(",")]
    work = args.out or REPO / "runs" / ("api_engine-quick" if args.quick else "api_engine")
    work.mkdir(parents=True, exist_ok=True)
    if args.render:  # the figures and settings of an earlier run
        res = json.loads(args.render.read_text())
        vars(args).update({k: v for k, v in res.get("args", {}).items() if k not in ("render", "no_md", "json")})
        return report(res, args)
    started = time.perf_counter()
    commit = commit_note()  # the code that is imported now is the code measured
    res: dict = {}

    with (
        LlamaServer(log_dir=work / "llama", n_threads=args.llama_threads) as llama,
        InstantServer() as instant,
    ):
        assert llama.proc is not None and instant.proc is not None
        meter = CpuMeter([os.getpid(), llama.proc.pid, instant.proc.pid])
        load: dict[str, dict] = {}
        res["load"] = load
        llama_recipe = make_recipe(
            work / "llama-recipe",
            llama.base_url,
            llama.model,
            4,
            max_tokens=args.max_tokens,
        )
        instant_recipe = make_recipe(
            work / "instant-recipe",
            instant.base_url,
            instant.model,
            4,
            max_tokens=args.max_tokens,
        )
        print(
            f"llama.cpp at {llama.base_url}, instant endpoint at {instant.base_url}",
            flush=True,
        )

        # 10 s of nothing: the other load on the machine before we start
        before = meter.snap()
        time.sleep(2 if args.quick else 10)
        load["idle"] = CpuMeter.other(before, meter.snap())
        print(
            f"other load before the run: {100 * load['idle']['other_share']:.0f}% of the machine",
            flush=True,
        )

        parts = [
            ("sweep_llama", "1. throughput vs concurrency: llama.cpp",
             lambda: sweep(llama_recipe, args.sweep_rows, levels, work, "llama", meter)),
            ("sweep_instant", "1. throughput vs concurrency: instant endpoint",
             lambda: sweep(instant_recipe, args.instant_rows, levels, work, "instant", meter)),
            ("overhead_llama", "2. overhead per call vs the bare SDK: llama.cpp",
             lambda: overhead(llama_recipe, args.llama_calls, args.rounds, work, "llama")),
            ("overhead_instant", "2. overhead per call vs the bare SDK: instant endpoint",
             lambda: overhead(instant_recipe, args.instant_calls, args.rounds, work, "instant")),
            ("replay", "3. replay of cached rows",
             lambda: replay(instant.base_url, instant.model, args.replay_rows, 3, work / "replay")),
            ("rpm", "4. requests-per-minute limit (A): the provider's limit is the recipe's",
             lambda: rpm_fraction(instant, args.rpm, args.rpm_rows, args.rpm_concurrency, work)),
            ("rpm_under", "4. requests-per-minute limit (B): the provider's limit is lower",
             lambda: rpm_fraction(instant, args.rpm, args.under_rows, args.rpm_concurrency, work, args.provider_rpm)),
        ]  # fmt: skip
        for key, title, run in parts:
            print(title, flush=True)
            before = meter.snap()
            res[key] = run()
            load[key] = CpuMeter.other(before, meter.snap())
            print(f"  ({load[key]['wall']:.0f} s, other load {100 * load[key]['other_share']:.0f}% of the machine)")

    wall = time.perf_counter() - started
    res["meta"] = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU (Python {platform.python_version()}, "
        f"openai {__import__('openai').__version__})",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit if commit_note() == commit else f"{commit} (HEAD moved to {commit_note()} during the run)",
        "wall_min": wall / 60,
    }
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return report(res, args)


def report(res: dict, args: argparse.Namespace) -> int:
    print_table(res)
    print(f"total wall time {res['meta']['wall_min']:.1f} min")
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api_engine.py" + (" --quick" if args.quick else "")
    section = markdown(res, args, cmd)
    if args.quick or args.no_md:
        print("\n" + section)
    else:
        write_section(REPO / "BENCHMARKS.md", section)
        print(f"wrote {SECTION!r} to {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
