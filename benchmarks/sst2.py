"""SST-2 benchmark (issue 12): fine-tune a MiniLM teacher, distill it with protege under each lever off/on over
three seeds, evaluate on the 872 dev sentences.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sst2.py            # full run, writes BENCHMARKS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sst2.py --quick    # small smoke run, no BENCHMARKS.md

Data is read from ../shared/data/sst2 (label<TAB>sentence, 0=negative, 1=positive: train.tsv 6,920, dev.tsv
872); the harness is benchmarks/_classify_bench.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import DATA, Dataset, main

LABELS = ("negative", "positive")
DESCRIPTIONS = {
    "negative": "the sentence expresses a negative opinion of the movie",
    "positive": "the sentence expresses a positive opinion of the movie",
}


def read_tsv(path: Path) -> list[tuple[int, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, sentence = line.split("\t", 1)
        if label not in ("0", "1"):
            raise SystemExit(f"{path}:{n}: label {label!r} is not 0 or 1")
        rows.append((int(label), sentence.strip()))
    return rows


def dataset() -> Dataset:
    return Dataset(
        name="sst2",
        title="SST-2",
        section="## SST-2 (benchmarks/sst2.py)",
        instruction="Classify the sentiment of the movie review sentence.",
        labels=LABELS,
        descriptions=DESCRIPTIONS,
        train=read_tsv(DATA / "sst2" / "train.tsv"),
        eval=read_tsv(DATA / "sst2" / "dev.tsv"),
        eval_name="dev",
        command="benchmarks/sst2.py",
    )


if __name__ == "__main__":
    sys.exit(main(dataset()))
