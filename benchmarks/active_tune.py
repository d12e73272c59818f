"""Choosing teacher.select's settings for benchmarks/active.py on the SST-2 TRAINING texts only (issue 13.4).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/active_tune.py                 # every config
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/active_tune.py --configs margin,share50

The dev set is not read for choosing: a seeded 900 of the 6,920 training texts, with their gold labels, are the
tuning split's evaluation set, and the other 6,020 its pool. Each config runs protege's selection loop (the
benchmark's student and rounds: a random seed slice of 500, then rounds of 500) to half the pool (3,010 teacher
calls, as 3,460 is half of SST-2's texts) and is compared, seed by seed, with random selection at the same calls and
with random at the whole pool (one student trained on all 6,020). Teacher answers come from benchmarks/sst2.py's
store (runs/sst2/shared.db, copied into each run): no teacher compute. Results go to runs/active-tune/results.json
and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import REPO, Settings, _copy_db, _write_jsonl, minilm_path, recipe_dict  # noqa: E402
from sst2 import dataset  # noqa: E402

HOLDOUT_SEED = 13  # the split of the training texts into the tuning pool and its evaluation set

# name -> (teacher.select, teacher overrides, training overrides); the baselines train one student on a random
# prefix of the pool, the size filled in at run time ("half" or "all")
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "random-half": ("random", {}, {}),
    "random-all": ("random", {}, {}),
    "random": ("random", {}, {}),  # random's rounds to half the pool: its curve, for the end-of-curve mean
    "margin": ("uncertainty", {}, {}),  # the benchmark's settings so far
    "nodiv": ("uncertainty", {"select_diversity": False}, {}),
    "share50": ("uncertainty", {"select_random_share": 0.5}, {}),
    "share25": ("uncertainty", {"select_random_share": 0.25}, {}),
    "round250": ("uncertainty", {"select_round_rows": 250}, {}),
    "seed1000": ("uncertainty", {"select_seed_rows": 1000}, {}),  # a stronger first student, fewer rounds
    # every student trained for the optimizer steps of 5 epochs over the whole pool (training.max_steps), random
    # and uncertainty alike: small labelled sets get more epochs, the whole pool exactly its 5 (so random-all is
    # the same training with or without it)
    "random-half+steps": ("random", {}, {"max_steps": "pool"}),
    "margin+steps": ("uncertainty", {}, {"max_steps": "pool"}),
    "share50+steps": ("uncertainty", {"select_random_share": 0.5}, {"max_steps": "pool"}),
}


def tuning_split(ds, holdout: int) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """(pool, held) as (original training index, gold label, text): a seeded holdout of the training texts."""
    rows = [(i, y, s) for i, (y, s) in enumerate(ds.train)]
    order = list(range(len(rows)))
    random.Random(HOLDOUT_SEED).shuffle(order)
    held = sorted(order[:holdout])
    pool = sorted(order[holdout:])
    return [rows[i] for i in pool], [rows[i] for i in held]


def run_one(ds, name: str, seed: int, pool_n: int, args, st: Settings, work: Path, minilm: str) -> dict:
    import protege
    from protege.active import label_selected

    select, teacher, training = CONFIGS[name]
    half = pool_n // 2
    d = recipe_dict(ds, "+embed", seed, st, work, REPO / "runs" / "sst2" / "teacher", minilm)
    d["training"]["hard_label_baseline"] = False
    steps = st.epochs * -(-pool_n // st.batch_size)  # 5 epochs over the whole pool
    d["training"] |= {k: (steps if v == "pool" else v) for k, v in training.items()}
    rows = pool_n if name == "random-all" else half
    one_round = name.startswith("random-")  # one student on a random prefix of the pool, as random's rounds take it
    d["teacher"] |= {"select": select, "select_seed_rows": rows if one_round else args.seed_rows,
                     "select_round_rows": args.round_rows, "select_max_rows": rows} | teacher
    out = work / f"{name}-s{seed}"
    d["output_dir"] = str(out)
    recipe = protege.Recipe.model_validate(d)
    if not recipe.store_path.is_file():
        _copy_db(REPO / "runs" / "sst2" / "shared.db", recipe.store_path)
    t0 = time.perf_counter()
    stats = label_selected(recipe, quiet=True)
    sel = json.loads((out / "signals" / "selection.json").read_text())
    curve = {r["rows"]: r["eval_accuracy"] for r in sel["rounds"] if r.get("eval_accuracy") is not None}
    res = {"name": name, "seed": seed, "rows": rows, "acc": curve[max(curve)], "curve": curve,
           "teacher_acc": sel["teacher_eval_accuracy"], "new_calls": stats.called,
           "seconds": time.perf_counter() - t0}
    print(f"[{name} s{seed}] {res['acc'] * 100:.1f}% at {max(curve)} rows ({res['seconds']:.0f}s; "
          + ", ".join(f"{k}:{100 * v:.1f}" for k, v in curve.items()) + ")", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--holdout", type=int, default=900)
    p.add_argument("--seed-rows", type=int, default=500)
    p.add_argument("--round-rows", type=int, default=500)
    p.add_argument("--out", default="active-tune", help="work dir under runs/")
    args = p.parse_args(argv)
    ds = dataset()
    ds.eval = []  # the dev set plays no part in choosing
    pool, held = tuning_split(ds, args.holdout)
    work = REPO / "runs" / args.out
    _write_jsonl(work / "data" / "train.jsonl", [{"id": f"train-{i}", "text": s} for i, _, s in pool])
    _write_jsonl(work / "data" / "eval.jsonl", [{"id": f"train-{i}", "text": s, "label": ds.labels[y]}
                                                for i, y, s in held])
    st, minilm = Settings(epochs=5), minilm_path()
    print(f"tuning split: pool {len(pool)}, held-out {len(held)} training texts (gold); half = {len(pool) // 2}",
          flush=True)
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.configs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results[f"{name}-s{seed}"] = run_one(ds, name, seed, len(pool), args, st, work, minilm)
            path.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    """Held-out accuracy by config and seed, and the paired difference to random at the whole pool."""
    by: dict[str, dict[int, dict]] = {}
    for r in results.values():
        by.setdefault(r["name"], {})[r["seed"]] = r
    # one student's accuracy moves by a point or two with 10 texts more (its training noise), so besides the last
    # point the table gives the mean over the curve's last three points (2,500, 3,000 and 3,010 texts in rounds of
    # 500)
    print("\n| config | texts labelled | held-out accuracy % by seed | mean | vs random-all | last three points, "
          "mean % |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, seeds in by.items():
        ref = by.get("random-all", {})
        accs = [seeds[s]["acc"] for s in sorted(seeds)]
        diffs = [seeds[s]["acc"] - ref[s]["acc"] for s in sorted(seeds) if s in ref]
        ends = [v for s in seeds.values() if len(s["curve"]) >= 3
                for v in [s["curve"][k] for k in sorted(s["curve"], key=int)][-3:]]
        print(f"| {name} | {next(iter(seeds.values()))['rows']:,} | "
              + " / ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * statistics.fmean(accs):.1f} | "
              + (f"{100 * statistics.fmean(diffs):+.1f}" if diffs else "") + " | "
              + (f"{100 * statistics.fmean(ends):.1f}" if ends else "") + " |")


if __name__ == "__main__":
    sys.exit(main())
