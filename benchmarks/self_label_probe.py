"""Does self-training help a student trained on half of SST-2's teacher labels? (the probe behind
teacher.select_student_labels; issue 13.4)

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/self_label_probe.py 0,1,2 [--pool]

Per seed: a student on a random 3,460 of the 6,920 training texts (teacher labels from runs/sst2/teacher, made by
benchmarks/sst2.py), then the same plus the other 3,460 labelled by that student (hard labels above 0.9, and soft
labels for all), and a student on all 6,920; prints each one's dev accuracy. Reads dev: it decided whether the idea
was worth building, nothing was tuned on it. Outside protege's loop (no store, no rounds): benchmarks/active.py
--student-labels measures the feature itself.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import REPO, Settings, minilm_path, recipe_dict  # noqa: E402
from sst2 import dataset  # noqa: E402

import protege  # noqa: E402
from protege.lean import encode  # noqa: E402
from protege.students.classifier import load_student  # noqa: E402
from protege.training.classifier import TrainRow, train_student  # noqa: E402

HALF = 3460  # half of SST-2's 6,920 training texts
CONFIDENT = 0.9  # the hard-label variant keeps the student's labels at least this sure


def teacher_probs(texts: list[str], teacher: Path, cache: Path) -> np.ndarray:
    """(N, 2) label probabilities of the fine-tuned teacher, computed once into ``cache``."""
    if not cache.is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher)
        model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 128):
                enc = tok(texts[i : i + 128], padding=True, truncation=True, max_length=64, return_tensors="pt")
                out.append(torch.softmax(model(**enc).logits, -1).numpy())
        np.save(cache, np.concatenate(out))
    return np.load(cache)


def predict(path: Path, texts: list[str]) -> np.ndarray:
    model, tok, _ = load_student(path)
    probs = []
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            probs.append(torch.softmax(model(**encode(tok, texts[i : i + 256], 64)).logits, -1).numpy())
    return np.concatenate(probs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("seeds", nargs="?", default="0,1,2")
    ap.add_argument("--pool", action="store_true", help="the mean-pooled 2-epoch tau-2 student (+pool), not +embed")
    args = ap.parse_args()
    ds, minilm = dataset(), minilm_path()
    sst2, work = REPO / "runs" / "sst2", REPO / "runs" / "self-label-probe"
    if not (sst2 / "teacher").is_dir():
        raise SystemExit(f"no teacher in {sst2}: run benchmarks/sst2.py first")
    work.mkdir(parents=True, exist_ok=True)
    texts = [s for _, s in ds.train]
    tp = teacher_probs(texts, sst2 / "teacher", work / "teacher_probs.npy")
    dev_texts, dev_y = [s for _, s in ds.eval], np.array([y for y, _ in ds.eval])
    st = Settings(epochs=2, temperature=2.0) if args.pool else Settings(epochs=5, temperature=4.0)
    cond = "+pool" if args.pool else "+embed"

    def fit(seed: int, idx: list[int], extra: list = (), tag: str = "") -> tuple[float, Path]:
        d = recipe_dict(ds, cond, seed, st, sst2, sst2 / "teacher", minilm)
        d["training"]["hard_label_baseline"] = False
        d["output_dir"] = str(work / f"{tag}-s{seed}")
        recipe = protege.Recipe.model_validate(d)
        rows = [TrainRow(texts[i], tuple(tp[i]), int(tp[i].argmax()), id=f"t{i}") for i in idx]
        rows += [TrainRow(texts[i], tuple(p), int(np.argmax(p)), id=f"p{i}") for i, p in extra]
        out = Path(d["output_dir"]) / "student"
        train_student(recipe, rows, out, 1.0, quiet=True)
        return float((predict(out, dev_texts).argmax(1) == dev_y).mean()), out

    for seed in (int(s) for s in args.seeds.split(",")):
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        half, rest = order[:HALF], order[HALF:]
        r: dict[str, float] = {}
        r["half"], out = fit(seed, half, tag="half")
        p = predict(out, [texts[i] for i in rest])
        keep = [(i, pp) for i, pp in zip(rest, p) if pp.max() >= CONFIDENT]
        r[f"hard{CONFIDENT}"], _ = fit(seed, half, [(i, np.eye(2)[pp.argmax()]) for i, pp in keep],
                                      tag=f"hard{CONFIDENT}")
        r[f"n{CONFIDENT}"] = len(keep)
        r[f"pseudo_vs_teacher{CONFIDENT}"] = float(np.mean([pp.argmax() == tp[i].argmax() for i, pp in keep]))
        r["soft_all"], _ = fit(seed, half, list(zip(rest, p)), tag="soft")
        r["all"], _ = fit(seed, order, tag="all")
        print(seed, json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
