"""TREC benchmark (issue 12): fine-tune a MiniLM teacher on TREC's six coarse question types, distill it with
protege under each lever off/on over three seeds, evaluate on the 500 test questions.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trec.py            # full run, writes BENCHMARKS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trec.py --quick    # small smoke run, no BENCHMARKS.md

Data is read from ../shared/data/trec (`COARSE:fine question` lines: train.txt 5,452, test.txt 500); the
harness is benchmarks/_classify_bench.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import DATA, Dataset, main

LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
DESCRIPTIONS = {
    "ABBR": "the question asks for an abbreviation or what an abbreviation stands for",
    "DESC": "the question asks for a description, definition, manner or reason",
    "ENTY": "the question asks for an entity: a thing, animal, colour, food, product, event, term and so on",
    "HUM": "the question asks for a person, a group of people or an organisation",
    "LOC": "the question asks for a location: a city, country, mountain, state or other place",
    "NUM": "the question asks for a number: a count, date, distance, price, percentage, speed and so on",
}


def read_trec(path: Path) -> list[tuple[int, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        tag, question = line.split(" ", 1)
        coarse = tag.split(":", 1)[0]
        if coarse not in LABELS:
            raise SystemExit(f"{path}:{n}: coarse label {coarse!r} is not one of {', '.join(LABELS)}")
        rows.append((LABELS.index(coarse), question.strip()))
    return rows


def dataset() -> Dataset:
    return Dataset(
        name="trec",
        title="TREC",
        section="## TREC (benchmarks/trec.py)",
        instruction="Classify the type of answer the question asks for.",
        labels=LABELS,
        descriptions=DESCRIPTIONS,
        train=read_trec(DATA / "trec" / "train.txt"),
        eval=read_trec(DATA / "trec" / "test.txt"),
        eval_name="test",
        command="benchmarks/trec.py",
    )


if __name__ == "__main__":
    sys.exit(main(dataset()))
