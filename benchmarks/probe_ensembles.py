"""Probe, not a feature: what averaging SST-2's student with a second model would add on dev.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_ensembles.py

Reads benchmarks/sst2.py's `all` runs (runs/sst2/all-s0..2: their recipes, teacher-labelled rows and saved
students) and prints, on the dev sentences (gold), the accuracy of each student, of the report's TF-IDF floor
(protege.evaluation.classifier._floor: fitted on the same teacher labels), of their probability average at a few
weights w (w student + (1 - w) floor), and of the average of two students of different seeds. It reads gold to
score, so nothing here may choose a setting; it points at what to try (BENCHMARKS.md, SST-2, "two layers, and what
an ensemble would add").
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from protege.evaluation.classifier import _floor  # noqa: E402
from protege.labeling.labeler import read_signals  # noqa: E402
from protege.lean import classifier_logits, encode  # noqa: E402
from protege.recipe import load_recipe  # noqa: E402
from protege.students.classifier import load_student  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    probs, gold = {}, None
    for seed in (0, 1, 2):
        r = load_recipe(REPO / "runs" / "sst2" / f"all-s{seed}" / "recipe.yaml")
        rows = read_signals(r, "eval")
        texts = [x["text"] for x in rows]
        gold = np.array([r.task.label_names.index(x["gold"]) for x in rows])
        floor, _ = _floor(r, texts)
        model, tok, _ = load_student(r.output_dir / "student")
        f = classifier_logits(model.eval())
        with torch.inference_mode():
            p = np.concatenate([torch.softmax(f(**encode(tok, texts[i:i + 64], r.student.max_length)), -1).numpy()
                                for i in range(0, len(texts), 64)])
        probs[seed] = p
        mixes = " ".join(f"w{w:.1f} {100 * ((w * p + (1 - w) * floor).argmax(1) == gold).mean():.1f}"
                         for w in (0.5, 0.6, 0.7, 0.8))
        print(f"s{seed}: student {100 * (p.argmax(1) == gold).mean():.1f}, floor "
              f"{100 * (floor.argmax(1) == gold).mean():.1f}; student + floor: {mixes}", flush=True)
    for a, b in itertools.combinations(probs, 2):
        print(f"students s{a} + s{b}: {100 * ((probs[a] + probs[b]).argmax(1) == gold).mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
