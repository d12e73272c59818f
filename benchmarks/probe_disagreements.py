"""Probe, not a feature, and one that reads gold labels (nothing is chosen from it): where do trained students part
from their teacher on a held-out set, and is the teacher right there?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_disagreements.py runs/sst2/all-s0 [...]

For each run folder (a trained protege classifier run, evaluated, so its signals/eval.jsonl holds the teacher's
label and the gold label of every held-out text), prints the student's accuracy, how many texts it answers
otherwise than the teacher and how often the teacher is right on those, and its agreement and accuracy by text
length and on the texts with a contrast or a negation ("but", "not", "n't"), beside the teacher's accuracy there
(BENCHMARKS.md, SST-2, "seventh session").
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from protege.evaluation.classifier import student_probs  # noqa: E402

TURNS = re.compile(r"\b(but|not)\b|n't\b")
LENGTHS = ((0, 10), (10, 20), (20, 30), (30, 1000))  # words


def main() -> int:
    torch.set_num_threads(1)
    for run in sys.argv[1:]:
        rows = [json.loads(x) for x in (Path(run) / "signals" / "eval.jsonl").read_text().splitlines() if x.strip()]
        probs, labels = student_probs(Path(run) / "student", [r["text"] for r in rows])
        said = [labels[i] for i in probs.argmax(1)]
        teacher, gold = [r["teacher_label"] for r in rows], [r["gold"] for r in rows]
        n = len(rows)
        apart = [i for i in range(n) if said[i] != teacher[i]]
        right = sum(teacher[i] == gold[i] for i in apart)
        print(f"{run}: accuracy {sum(s == g for s, g in zip(said, gold)) / n:.1%}; {len(apart)} of {n} texts answered "
              f"otherwise than the teacher, the teacher right on {right} of them ({right / max(len(apart), 1):.0%})")

        def line(name: str, idx: list[int]) -> str:
            m = max(len(idx), 1)
            return (f"  {name}: {len(idx)} texts, agreement {sum(said[i] == teacher[i] for i in idx) / m:.1%}, student "
                    f"{sum(said[i] == gold[i] for i in idx) / m:.1%}, teacher {sum(teacher[i] == gold[i] for i in idx) / m:.1%}")

        words = [len(r["text"].split()) for r in rows]
        for lo, hi in LENGTHS:
            print(line(f"{lo}-{hi - 1 if hi < 1000 else ''} words", [i for i in range(n) if lo <= words[i] < hi]))
        print(line("with but / not / n't", [i for i in range(n) if TURNS.search(rows[i]["text"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
