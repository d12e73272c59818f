"""Probe, not a feature: does a student fall short of its teacher because it cannot fit the teacher's labels
(capacity) or because what it fits does not carry to new text (generalisation)?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_train_fit.py runs/sst2/all-s0 [...]

For each run folder (a trained protege classifier run with a selection slice), prints the student's top-label
agreement with the teacher on the original training rows it trained on, on their augmented copies, and on the
selection slice it never trained on, from the run's signals/train.jsonl and its recorded split. No gold label is
read (BENCHMARKS.md, SST-2, "Later run: longer cuts, nearest-word swaps").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _classify_bench import teacher_fit  # noqa: E402

from protege.recipe import load_recipe  # noqa: E402
from protege.training.select import selection_split  # noqa: E402


def main() -> int:
    for run in sys.argv[1:]:
        recipe = load_recipe(Path(run) / "recipe.yaml")
        rows = [json.loads(x) for x in (Path(run) / "signals" / "train.jsonl").read_text().splitlines() if x.strip()]
        train, held = selection_split([r["id"] for r in rows], [r.get("augmented_from") for r in rows],
                                      recipe.training.select_fraction, recipe.training.seed)
        originals = [rows[i] for i in train if not rows[i].get("augmented_from")]
        copies = [rows[i] for i in train if rows[i].get("augmented_from")]
        slice_rows = [rows[i] for i in held]
        student, n = Path(run) / "student", recipe.student.max_length
        print(f"{run}: agreement with the teacher on the {len(originals):,} original training rows "
              f"{teacher_fit(student, originals, n)[1]:.1%}, on their {len(copies):,} augmented copies "
              f"{teacher_fit(student, copies, n)[1]:.1%}, on the {len(slice_rows):,}-row slice "
              f"{teacher_fit(student, slice_rows, n)[1]:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
