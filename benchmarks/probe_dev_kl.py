"""Probe, not a feature: does the selection slice's KL say how a student follows the teacher on new text, and does
following it more closely raise accuracy?

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_dev_kl.py

For every SST-2 student benchmarks/slice_tune.py trained (runs/sst2-tune/results.jsonl and its folders) and for
sst2.py's `all` students (runs/sst2/all-s0..2), prints the slice KL(teacher || student) the run recorded, and on
the 872 dev sentences the same KL against the teacher's dev distribution, the top-label agreement with the
teacher and the accuracy (gold); then the Pearson correlation over the students of slice KL with dev KL and of
dev KL with dev accuracy. It also prints the teacher's mean top probability on its own fine-tuning sentences, on
their augmented copies and on dev. It reads gold to score, so nothing here may choose a setting (BENCHMARKS.md,
SST-2, "weight averaging and hidden-state distillation").
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from protege.lean import encode  # noqa: E402
from protege.students.classifier import load_student  # noqa: E402
from protege.training.select import slice_scores  # noqa: E402


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def main() -> int:
    runs = REPO / "runs"
    recorded = {(r["variant"], r["seed"]): r["kl"] for r in _jsonl(runs / "sst2-tune" / "results.jsonl")}
    dev = _jsonl(runs / "sst2" / "all-s0" / "signals" / "eval.jsonl")
    texts = [r["text"] for r in dev]
    teacher = torch.tensor([r["teacher_probs"] for r in dev])  # (N, 2)
    labels = ["negative", "positive"]
    gold = torch.tensor([labels.index(r["gold"]) for r in dev])
    train = _jsonl(runs / "sst2" / "all-s0" / "signals" / "train.jsonl")
    top = {"fine-tuning sentences": [max(r["teacher_probs"]) for r in train if r.get("augmented_from") is None],
           "their augmented copies": [max(r["teacher_probs"]) for r in train if r.get("augmented_from") is not None],
           "dev": teacher.max(1).values.tolist()}
    print("teacher's mean top probability: " + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in top.items()))

    students = [(v, s, runs / "sst2-tune" / f"{v}-s{s}" / "student", kl) for (v, s), kl in sorted(recorded.items())]
    students += [("all", s, runs / "sst2" / f"all-s{s}" / "student", None) for s in (0, 1, 2)]
    print("\n| student | seed | slice KL (recorded) | dev KL | dev agreement % | dev accuracy % |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    points = []
    for variant, seed, path, slice_kl in students:
        if not path.is_dir():
            continue
        model, tok, _ = load_student(path)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(**{k: v for k, v in encode(tok, texts[i : i + 128], 64).items()
                                         if k in ("input_ids", "attention_mask")}).logits
                                for i in range(0, len(texts), 128)])  # (N, 2)
        kl, agree = slice_scores(logits, teacher)
        kl, agree = kl.item() / len(texts), agree.item() / len(texts)
        acc = (logits.argmax(-1) == gold).float().mean().item()
        points.append((slice_kl, kl, acc))
        shown = "-" if slice_kl is None else f"{slice_kl:.4f}"
        print(f"| {variant} | {seed} | {shown} | {kl:.4f} | {100 * agree:.1f} | {100 * acc:.1f} |", flush=True)
    both = [(a, b) for a, b, _ in points if a is not None]
    print(f"\nPearson r over {len(both)} students, slice KL with dev KL: "
          f"{statistics.correlation(*zip(*both)):.2f}; over {len(points)}, dev KL with dev accuracy: "
          f"{statistics.correlation([p[1] for p in points], [p[2] for p in points]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
