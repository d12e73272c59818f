"""Choose the demo recipe's student settings on other draws of the demo data, never on the demo's own held-out set.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_tune.py --data-seeds 1,2

``protege demo`` writes its tickets with seed 0. This script writes the same kind of data with other seeds (a new
split of the templates into training and held-out pools, new tickets), runs the demo's recipe on each as it is
(``base``), then once per variant (one or more recipe settings changed), each variant in its own folder with a copy
of the base run's store, so the teacher labels every text once per data seed. It prints, per variant, the
student's held-out accuracy and the share of the teacher's it keeps on each data seed, and their mean. The
hard-label student is not trained here (``training.hard_label_baseline: false``): only the distilled student is
being chosen.

A variant with ``@n_train`` changes the data, not the recipe: its folder gets the seed's data written with that many
training tickets (the held-out tickets are the same: their own draw, from templates training never uses).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from protege.demo import demo_recipe
from protege.demo_data import write_demo_data
from protege.pipeline import run
from protege.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "base": {},
    "tau1": {"training.temperature": 1.0},
    "tau4": {"training.temperature": 4.0},
    "epochs20": {"training.epochs": 20},
    "select": {"training.select_fraction": 0.1},
    "augment24": {"data.augment.per_text": 24},
    "select+tau4": {"training.select_fraction": 0.1, "training.temperature": 4.0},
    "pool": {"student.pooling": "mean"},
    "distilled": {"student.embeddings": "distilled"},
    "ema": {"training.ema_decay": 0.998},
    "hidden": {"training.hidden_weight": 1.0},
    "hidden-all": {"training.hidden_weight": 1.0, "training.hidden_rows": "all"},
    "span": {"data.augment.ngram_max": 40},
    "span5": {"data.augment.ngram_max": 40, "data.augment.ngram_p": 0.5},
    "nb": {"data.augment.replace_with": "neighbours"},
    "nb3": {"data.augment.replace_with": "neighbours", "data.augment.replace_p": 0.3},
    "bilstm": {"student.architecture": "bilstm", "student.intermediate_size": 64},
    "train1000": {"@n_train": 1000},
    "train1000-aug8": {"@n_train": 1000, "data.augment.per_text": 8},
}


def _scores(report: Path) -> tuple[float, float]:
    models = json.loads(report.read_text())["models"]
    return models["teacher"]["accuracy"], models["student"]["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-seeds", default="1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "runs" / "demo-tune"))
    args = p.parse_args()
    seeds = [int(s) for s in args.data_seeds.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    results: dict[str, dict[int, tuple[float, float]]] = {n: {} for n in names}
    quiet = {"training.hard_label_baseline": False}
    for seed in seeds:
        base = Path(args.out) / f"data{seed}" / "base"
        if not (base / "data" / "tickets.jsonl").is_file():
            write_demo_data(base / "data" / "tickets.jsonl", base / "data" / "held_out.jsonl", seed=seed)
        demo_recipe(base)  # writes base/demo.yaml around the seed's data
        for name in names:
            out = base if name == "base" else base.parent / name
            if name != "base":
                if not (base / "protege.db").is_file():
                    run(load_recipe(base / "demo.yaml", quiet), quiet=True)
                out.mkdir(parents=True, exist_ok=True)
                if not (out / "protege.db").is_file():
                    shutil.copy2(base / "protege.db", out / "protege.db")
            settings = {k: v for k, v in VARIANTS[name].items() if not k.startswith("@")}
            if "@n_train" in VARIANTS[name]:  # this variant's own training tickets; the held-out ones are the same
                data = out / "data"
                if not (data / "tickets.jsonl").is_file():
                    write_demo_data(data / "tickets.jsonl", data / "held_out.jsonl", n_train=VARIANTS[name]["@n_train"],
                                    seed=seed)
                if (data / "held_out.jsonl").read_bytes() != (base / "data" / "held_out.jsonl").read_bytes():
                    raise SystemExit(f"{name}: data seed {seed}'s held-out tickets differ from the base's")
                settings |= {"data.path": str(data / "tickets.jsonl")}
            t0 = time.time()
            run(load_recipe(base / "demo.yaml", {**quiet, **settings, "output_dir": str(out)}), quiet=True)
            teacher, student = _scores(out / "report.json")
            results[name][seed] = (teacher, student)
            print(f"data seed {seed} {name:10s} teacher {teacher:.1%} student {student:.1%} "
                  f"kept {student / teacher:.1%} ({time.time() - t0:.0f}s)", flush=True)
    print("\n| variant | " + " | ".join(f"data seed {s}: student % (kept %)" for s in seeds) + " | mean kept % |")
    print("| --- | " + " | ".join("---:" for _ in seeds) + " | ---: |")
    for name in names:
        got = results[name]
        cells = [f"{100 * got[s][1]:.1f} ({100 * got[s][1] / got[s][0]:.1f})" for s in seeds]
        mean = statistics.mean(got[s][1] / got[s][0] for s in seeds)
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} |")


if __name__ == "__main__":
    main()
