"""How protege's cost grows with the number of rows (issue 15): store and signal bytes per row, peak memory and
rows per second of each stage, and the rate a rerun replays cached answers, at 20,000 / 50,000 / 200,000 rows.

The data are the demo's generated support tickets (protege.demo_data, written once per size; beyond the ~40,000
distinct tickets the templates give, repeats made distinct by a reference number); the teacher a tiny local
classifier (a random 2-layer BERT over all-MiniLM-L6-v2's vocabulary, from the packaged model, hidden 32); the
student a one-layer scratch BERT (hidden 32) trained one epoch. Each stage runs in its own process, so its
peak resident memory (``ru_maxrss``) is its own:

* ``label``: read the data, ask the teacher about every row, write the store and ``signals/``;
* ``replay``: the same command again: every answer comes from the store (the cached replay rate);
* ``train``: train the student from ``signals/train.*``;
* ``store``: every stored answer read back and decoded (``Store.get_signals``, 10,000 keys at a time): the store's
  own replay rate, without reading the data or writing the signal files.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --rows 20000 50000 200000 --out runs/scale

Prints a Markdown table; ``--write`` puts it in BENCHMARKS.md (its section replaced) with the command, machine,
date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGE = r"""
import json, os, resource, sys, time
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from protege.recipe import load_recipe
stage, recipe_path = sys.argv[1], sys.argv[2]
recipe = load_recipe(recipe_path)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if stage == "store":
    from protege.store import Store
    with Store(recipe.store_path) as store:
        keys = [k for (k,) in store.db.execute("SELECT key FROM calls")]
        t0 = time.perf_counter()
        got = sum(len(store.get_signals(keys[i : i + 10_000])) for i in range(0, len(keys), 10_000))
    extra = {"examples": got}
elif stage in ("label", "replay"):
    from protege.pipeline import label
    stats = label(recipe, quiet=True)
    extra = {"called": stats.called, "cached": stats.cached, "examples": stats.examples}
else:
    from protege.pipeline import train
    out = train(recipe, quiet=True)
    extra = {"steps": out["student"]["steps"], "examples": out["student"]["examples"]}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"seconds": seconds, "peak_kb": peak, "start_kb": base, **extra}))
"""


TITLE = "## Scale: 20,000 / 50,000 / 200,000 rows (benchmarks/scale.py)"


def tiny_teacher(path: Path) -> Path:
    """A random 2-layer BERT classifier over the demo labels with all-MiniLM-L6-v2's tokenizer, saved once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from protege.demo_data import LABELS
    from protege.sources import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("all-minilm-l6-v2").name_or_path)
    torch.manual_seed(0)
    names = list(LABELS)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={n: i for i, n in enumerate(names)}, max_position_embeddings=512)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_run(root: Path, rows: int, teacher: Path) -> Path:
    import yaml

    from protege.demo_data import LABELS, make_examples

    run = root / str(rows)
    data = run / "data.jsonl"
    if not data.is_file():
        run.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix(".tmp")
        base = make_examples(min(rows, 40_000), seed=0)  # the templates give about 40,000 distinct tickets
        with tmp.open("w") as f:
            for i in range(rows):  # beyond them, each repeat made distinct by a reference number
                r = base[i % len(base)]
                text = r["text"] if i < len(base) else f"{r['text']} (ref {i})"
                f.write(json.dumps({"id": f"s{i:06d}", "text": text, "label": r["label"]}) + "\n")
        tmp.rename(data)
    recipe = {
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": list(LABELS)},
        "data": {"path": str(data), "eval_fraction": 0.02},
        "teacher": {"model": f"hf:{teacher}", "batch_size": 256, "max_length": 64},
        "student": {"model": "all-minilm-l6-v2", "init": "scratch", "hidden_size": 32, "num_layers": 1,
                    "num_heads": 2, "intermediate_size": 64, "max_length": 64},
        "training": {"epochs": 1, "batch_size": 64, "hard_label_baseline": False},
        "output_dir": str(run / "out"),
    }
    path = run / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def stage(name: str, recipe: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run([sys.executable, "-c", STAGE, name, str(recipe)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{p.stderr[-4000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def sizes(out: Path, rows: int) -> dict:
    db = sum(p.stat().st_size for p in out.glob("protege.db*"))
    sig = out / "signals"
    jsonl = sum((sig / f"{s}.jsonl").stat().st_size for s in ("train", "eval") if (sig / f"{s}.jsonl").is_file())
    parquet = sum((sig / f"{s}.parquet").stat().st_size for s in ("train", "eval")
                  if (sig / f"{s}.parquet").is_file())
    return {"store_b_per_row": db / rows, "jsonl_b_per_row": jsonl / rows, "parquet_b_per_row": parquet / rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 50_000, 200_000])
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--stages", nargs="+", default=["label", "replay", "train", "store"],
                    help="stages to run (label first: it makes the store the others read)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md (replacing its section)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out = args.out.resolve()
    teacher = tiny_teacher(args.out / "teacher")
    results = []
    t_all = time.time()
    for n in args.rows:
        recipe = make_run(args.out, n, teacher)
        out = recipe.parent / "out"
        import shutil

        if "label" in args.stages:
            shutil.rmtree(out, ignore_errors=True)  # a fresh store: label asks the teacher about every row
        r = {"rows": n}
        for name in args.stages:
            r[name] = stage(name, recipe)
            print(f"{n} {name}: {r[name]}", flush=True)
        if "label" in args.stages:
            r.update(sizes(out, n))
        results.append(r)
    stages = [x for x in args.stages if x in results[0]]
    head = "| rows | " + " | ".join(f"{x} rows/s | {x} peak MB" for x in stages)
    if "label" in stages:
        head += " | store B/row | signals JSONL B/row | signals Parquet B/row"
    lines = [head + " |", "|" + "---:|" * (1 + 2 * len(stages) + 3 * ("label" in stages))]
    for r in results:
        cells = [f"{r['rows']:,}"]
        for x in stages:
            cells += [f"{r[x]['examples'] / r[x]['seconds']:,.0f}", f"{r[x]['peak_kb'] / 1024:,.0f}"]
        if "label" in stages:
            cells += [f"{r['store_b_per_row']:,.0f}", f"{r['jsonl_b_per_row']:,.0f}", f"{r['parquet_b_per_row']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = results[0], results[-1]
    lines.append("")
    lines.append(f"Peak memory at {last['rows']:,} rows over {first['rows']:,}: " + ", ".join(
        f"{x} {last[x]['peak_kb'] / first[x]['peak_kb']:.2f}x" for x in stages)
        + f". Wall time {(time.time() - t_all) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    if args.write:
        from _md import provenance, write_section

        command = f"OMP_NUM_THREADS=1 python benchmarks/scale.py --rows {' '.join(map(str, args.rows))} --write"
        write_section(Path("BENCHMARKS.md"), TITLE, f"{TITLE}\n\n{provenance(command)}\n\n{table}\n")
        json.dump(results, open(args.out / "results.json", "w"), indent=2)


if __name__ == "__main__":
    main()
