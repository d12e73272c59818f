"""The flywheel measured (issue 13): a student served with capture and a cascade, then `protege improve` on its
traffic. How much better the next student is, and how much of its new data the teacher had already been paid for.

Per seed: `protege run` on 400 generated support tickets (the embedding teacher all-MiniLM-L6-v2 from its wheel;
a one-layer scratch student with MiniLM's embeddings projected, as the demo's), 80 of them held out. Then 800 new
tickets (another generator seed) go through `protege serve --capture --cascade-threshold T` on loopback with the
OpenAI SDK: the teacher answers those the student is unsure of (cached in the store). `protege improve` labels the
rest least sure first and trains the candidate with the run's settings; the table gives the incumbent's and the
candidate's accuracy on the fixed held-out split (gold) and agreement with the teacher on the fresh slice of
traffic, the teacher calls improve made, and the share of the new training texts that cost nothing.

    OMP_NUM_THREADS=1 python benchmarks/flywheel.py --seeds 0 1 2 --out runs/flywheel [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

THRESHOLD = 0.6


TITLE = "## Flywheel: improve from served traffic (benchmarks/flywheel.py)"


def n_calls(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def one(seed: int, root: Path) -> dict:
    import yaml
    from click.testing import CliRunner

    from protege.cli import cli
    from protege.demo_data import LABELS, make_examples

    base = root / f"seed{seed}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(400, seed=100 + seed)))
    recipe = {
        "task": {"instruction": "Classify the customer support message by its intent.",
                 "labels": [{"name": k, "description": v} for k, v in LABELS.items()]},
        "data": {"path": "data.jsonl", "eval_fraction": 0.2},
        "teacher": {"model": "embed:all-minilm-l6-v2", "batch_size": 32},
        "student": {"model": "all-minilm-l6-v2", "init": "scratch", "hidden_size": 64, "num_heads": 2,
                    "num_layers": 1, "intermediate_size": 256, "max_length": 64, "embeddings": "projected"},
        "training": {"epochs": 10, "batch_size": 16, "learning_rate": 3e-3, "alpha": 1.0, "temperature": 2.0,
                     "use_gold": False, "seed": seed},
        "eval": {"latency_samples": 4},
        "output_dir": "out",
    }
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(cli, ["run", str(base / "recipe.yaml"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = base / "out"

    import openai
    import uvicorn

    from protege.serve import create_app

    traffic = [r["text"] for r in make_examples(800, seed=200 + seed)]
    app = create_app(run / "student", capture=True, cascade_threshold=THRESHOLD)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    import threading

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    by = {"student": 0, "teacher": 0}
    t0 = time.perf_counter()
    for text in traffic:
        r = client.chat.completions.with_raw_response.create(model="x", messages=[{"role": "user", "content": text}])
        by[r.headers["x-protege-model"]] += 1
    serve_s = time.perf_counter() - t0
    server.should_exit = True
    thread.join(30)
    calls = n_calls(run / "protege.db")
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["improve", str(run), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    improve_s = time.perf_counter() - t0
    report = json.loads((run / "improve" / "v2" / "report.json").read_text())
    t, sets = report["training"], report["sets"]
    return {
        "seed": seed, "served": len(traffic), "to_teacher": by["teacher"], "serve_s": serve_s,
        "new_texts": report["captured"]["new_texts"], "fresh": report["fresh_held_out"]["texts"],
        "new_rows": t["new_rows"], "free": t["free"], "improve_calls": n_calls(run / "protege.db") - calls,
        "fixed_incumbent": sets["fixed held-out"]["incumbent"]["value"],
        "fixed_candidate": sets["fixed held-out"]["candidate"]["value"],
        "fresh_incumbent": sets["fresh traffic"]["incumbent"]["value"],
        "fresh_candidate": sets["fresh traffic"]["candidate"]["value"],
        "decision": report["decision"], "improve_s": improve_s,
        "teacher": json.loads((run / "report.json").read_text())["models"]["teacher"]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/flywheel"))
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md (replacing its section)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.time()
    results = [one(s, args.out.resolve()) for s in args.seeds]
    for r in results:
        print(json.dumps(r), flush=True)

    def ms(key: str) -> str:
        xs = [100 * r[key] for r in results]
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.1f}"

    lines = [
        "| seed | served (to teacher) | new texts | fresh held-out | new training rows (free) | teacher calls by "
        "improve | fixed accuracy: teacher; incumbent → candidate | fresh agreement: incumbent → candidate | decision | "
        "improve s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {r['served']} ({r['to_teacher']}) | {r['new_texts']} | {r['fresh']} | {r['new_rows']} "
            f"({r['free']}) | {r['improve_calls']} | {100 * r['teacher']:.1f}%; {100 * r['fixed_incumbent']:.1f}% → "
            f"{100 * r['fixed_candidate']:.1f}% | {100 * r['fresh_incumbent']:.1f}% → {100 * r['fresh_candidate']:.1f}% "
            f"| {r['decision']} | {r['improve_s']:.0f} |")
    lines.append(f"| mean ± sd | | | | | | {ms('teacher')}; {ms('fixed_incumbent')} → {ms('fixed_candidate')} | "
                 f"{ms('fresh_incumbent')} → {ms('fresh_candidate')} | | |")
    lines.append("")
    lines.append(f"Wall time {(time.time() - t_all) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    if args.write:
        from _md import provenance, write_section

        table += f"\n\nCascade threshold {THRESHOLD}."
        command = f"OMP_NUM_THREADS=1 python benchmarks/flywheel.py --seeds {' '.join(map(str, args.seeds))} --write"
        write_section(Path("BENCHMARKS.md"), TITLE, f"{TITLE}\n\n{provenance(command)}\n\n{table}\n")
        json.dump(results, open(args.out / "results.json", "w"), indent=2)


if __name__ == "__main__":
    sys.exit(main())
