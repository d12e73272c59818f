"""Score trained SST-2 / TREC students again on their selection slice's augmented copies (no gold label read).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/slice_copies.py sst2

``training.select_rows: all`` scores a slice's augmented texts with its original rows. This applies that slice to
students already trained by benchmarks/slice_tune.py (runs/<dataset>-tune/<variant>-s<seed>) and by the dataset
benchmark (runs/<dataset>/all-s<seed>), so that variants chosen on the 692 original sentences can be compared on
about ten times the rows, which the teacher reads afresh (it was fine-tuned on the originals). Every student of a
seed is scored on the same texts: the copies in runs/<dataset>/all-s<seed>/signals/train.jsonl whose source
sentence is in that seed's slice (the slice is drawn by row id and seed, so no student of that seed trained on
them). Prints KL(teacher || student) and agreement per variant and seed, and their means.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _classify_bench import teacher_fit  # noqa: E402

from protege.recipe import load_recipe  # noqa: E402
from protege.training.select import selection_split  # noqa: E402


def _slice_copies(base: Path) -> list[dict]:
    recipe = load_recipe(base / "recipe.yaml")
    rows = [json.loads(x) for x in (base / "signals" / "train.jsonl").read_text().splitlines() if x.strip()]
    _, held = selection_split([r["id"] for r in rows], [r.get("augmented_from") for r in rows],
                              recipe.training.select_fraction, recipe.training.seed, with_copies=True)
    return [rows[i] for i in held if rows[i].get("augmented_from")]


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "sst2"
    work, tune = REPO / "runs" / name, REPO / "runs" / f"{name}-tune"
    runs: dict[str, dict[int, Path]] = {}
    for seed_dir in sorted(work.glob("all-s*")):
        runs.setdefault("all", {})[int(seed_dir.name.rsplit("-s", 1)[1])] = seed_dir
    for d in sorted(tune.glob("*-s*")):
        if (d / "student" / "model.safetensors").is_file():
            variant, seed = d.name.rsplit("-s", 1)
            runs.setdefault(variant, {})[int(seed)] = d
    copies = {s: _slice_copies(work / f"all-s{s}") for s in sorted({s for v in runs.values() for s in v})
              if (work / f"all-s{s}" / "signals" / "train.jsonl").is_file()}
    print("| variant | copies KL s0 / s1 / s2 | mean | copies agreement % s0 / s1 / s2 | mean |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, by_seed in runs.items():
        got = {s: teacher_fit(p / "student", copies[s], load_recipe(p / "recipe.yaml").student.max_length)
               for s, p in sorted(by_seed.items()) if s in copies}
        if not got:
            continue
        kls = " / ".join(f"{k:.4f}" for k, _ in got.values())
        ags = " / ".join(f"{100 * a:.1f}" for _, a in got.values())
        print(f"| {variant} ({','.join(map(str, got))}) | {kls} | {statistics.mean(k for k, _ in got.values()):.4f} | "
              f"{ags} | {100 * statistics.mean(a for _, a in got.values()):.1f} |", flush=True)
    print("copies per seed: " + ", ".join(f"s{s} {len(c):,}" for s, c in copies.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
