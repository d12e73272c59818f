"""Choose student settings for sst2.py / trec.py without a gold label: train variants of the `all` student and
compare them on the selection slice only (a held-out tenth of the teacher-labelled training texts, see
protege.training.select), never on the dev or test set.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/slice_tune.py sst2 --seeds 0 \\
        --variant base= --variant aug16=data.augment.per_text=16 --variant lr5=training.learning_rate=0.005

Each variant is the `all` recipe of benchmarks/_classify_bench.py (mean pooling, projected embeddings, 8
augmented texts per text, select_fraction 0.1, 2 epochs, one evaluation per epoch, alpha 1, tau 2: the sweep's
pick on every SST-2 seed) with dotted overrides (``key.sub=value``, the value read as YAML). The teacher and its
store are the dataset benchmark's (runs/<dataset>/teacher and shared.db, made by sst2.py or trec.py); new
augmented texts are labelled through a copy of that store and written back, so nothing is labelled twice.
Prints, per variant and seed, the slice KL(teacher || student) and agreement at every evaluation and at the kept
one, and the mean over seeds; writes runs/<dataset>-tune/results.jsonl. Nothing here reads a gold label.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import REPO, Settings, label_through_shared, minilm_path, recipe_dict  # noqa: E402


def _dataset(name: str):
    if name == "sst2":
        from sst2 import dataset
    elif name == "trec":
        from trec import dataset
    else:
        raise SystemExit(f"dataset {name!r}: pick sst2 or trec")
    return dataset()


def _override(d: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    *path, last = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = yaml.safe_load(value)


def run_variant(name: str, overrides: list[str], seed: int, ds, work: Path, tune: Path, minilm: str) -> dict:
    import protege
    from protege.pipeline import train

    st = Settings(per_text=8, epochs=2, eval_every=None, patience=None, temperature=2.0)
    d = recipe_dict(ds, "all", seed, st, work, work / "teacher", minilm)
    out = tune / f"{name}-s{seed}"
    d["output_dir"] = str(out)
    for o in overrides:
        _override(d, o)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    recipe = protege.load_recipe(out / "recipe.yaml")
    t0 = time.perf_counter()
    stats = label_through_shared(recipe, work)
    trained = train(recipe, quiet=True, force=False)["student"]
    sel = trained["selection"]
    best = next(h for h in sel["history"] if h["step"] == sel["best_step"])
    row = {"variant": name, "overrides": overrides, "seed": seed, "slice_rows": sel["rows"],
           "kl": best["kl"], "agreement": best["agreement"], "best_step": sel["best_step"],
           "history": sel["history"], "parameters": trained["parameters"], "examples": trained["examples"],
           "teacher_calls": stats.called, "seconds": time.perf_counter() - t0}
    hist = ", ".join(f"{h['step']}: {h['kl']:.4f}/{100 * h['agreement']:.1f}%" for h in sel["history"])
    print(f"[{name} s{seed}] slice KL {best['kl']:.4f}, agreement {100 * best['agreement']:.1f}% at step "
          f"{sel['best_step']} ({hist}); {trained['parameters']:,} params, {trained['examples']:,} training texts, "
          f"{stats.called} teacher calls, {row['seconds']:.0f}s", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", choices=("sst2", "trec"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=key.sub=value[,key=value...] (NAME= alone: the base recipe)")
    args = ap.parse_args()
    ds = _dataset(args.dataset)
    work = REPO / "runs" / ds.name
    if not (work / "teacher").is_dir() or not (work / "shared.db").is_file():
        raise SystemExit(f"no teacher or store in {work}: run benchmarks/{ds.name}.py first")
    tune = REPO / "runs" / f"{ds.name}-tune"
    minilm = minilm_path()
    rows = []
    for v in args.variant:
        name, _, rest = v.partition("=")
        overrides = [o for o in rest.split(",") if o]
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_variant(name, overrides, seed, ds, work, tune, minilm))
            with (tune / "results.jsonl").open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print("\n| variant | slice KL (mean over seeds) | slice agreement % | seeds |\n| --- | ---: | ---: | --- |")
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        print(f"| {name} | {statistics.mean(r['kl'] for r in rs):.4f} | "
              f"{100 * statistics.mean(r['agreement'] for r in rs):.1f} | {','.join(str(r['seed']) for r in rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
