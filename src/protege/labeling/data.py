"""Read the user's texts (JSONL, CSV or Parquet), check them against the task, and split off evaluation."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataConfig

__all__ = ["Example", "read_examples", "load_splits", "draw_shots"]

SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One text to distill on. ``gold`` is None for unlabeled rows; ``where`` is 'file:line' for messages."""

    id: str
    text: str
    gold: str | None
    where: str


def _raw_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or row number, row) pairs; numbers are 1-based lines for JSONL/CSV and 1-based rows for Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                rows.append((n, row))
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells but the header has "
                        f"{len(reader.fieldnames or [])} columns; quote cells that contain commas"
                    )
                rows.append((reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}))
            return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        return list(enumerate(table.to_pylist(), 1))
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def read_examples(path: Path, cfg: DataConfig, labels: tuple[str, ...] | None, split: str = "") -> list[Example]:
    """Read and validate every row of ``path``; raise DataError naming the file, line and fix.

    ``labels`` is the label set gold labels must come from; None for a generation task, whose label column
    holds free-text reference answers.
    Without an id column, a row's id is ``[split:]stem:line``.
    """
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check data.path (or data.eval_path)")
    if path.is_dir():
        raise DataError(f"data path {str(path)!r} is a directory; point it at a {'/'.join(SUFFIXES)} file")
    rows = _raw_rows(path)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"data file {str(path)!r} has no rows; add data or fix the path")

    columns = set().union(*(r.keys() for _, r in rows))
    if cfg.text_column not in columns:
        raise DataError(
            f"{path}: no {cfg.text_column!r} column (columns: {sorted(columns)}); set data.text_column"
        )
    label_col = cfg.label_column or ("label" if "label" in columns else None)
    if label_col is not None and label_col not in columns:
        raise DataError(f"{path}: no {label_col!r} column (columns: {sorted(columns)}); set data.label_column")
    id_col = cfg.id_column or ("id" if "id" in columns else None)
    if id_col is not None and id_col not in columns:
        raise DataError(f"{path}: no {id_col!r} column (columns: {sorted(columns)}); set data.id_column")

    folded = {name.casefold(): name for name in labels or ()}
    examples, seen_ids = [], {}
    for n, row in rows:
        where = f"{path}:{n}"
        text = row.get(cfg.text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {cfg.text_column!r} is empty or not text ({text!r}); fix or remove the row")
        gold = row.get(label_col) if label_col else None
        if gold is not None:
            gold = str(gold).strip()
            if gold == "":
                gold = None
            elif labels is not None and gold not in labels:
                hint = (
                    f"; did you mean {folded[gold.casefold()]!r}?"
                    if gold.casefold() in folded
                    else "; fix the row or add the label to task.labels"
                )
                raise DataError(f"{where}: label {gold!r} is not one of the task's labels {list(labels)}{hint}")
        ex_id = str(row[id_col]) if id_col and row.get(id_col) is not None else f"{split}{path.stem}:{n}"
        if ex_id in seen_ids:
            raise DataError(f"{where}: id {ex_id!r} repeats line {seen_ids[ex_id]}; ids must be unique")
        seen_ids[ex_id] = n
        examples.append(Example(ex_id, text, gold, where))
    return examples


def _rank(seed: int, ex_id: str) -> str:
    return hashlib.sha256(f"{seed}:{ex_id}".encode()).hexdigest()


def load_splits(cfg: DataConfig, labels: tuple[str, ...] | None, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval). The eval split is fixed by the seed and row ids, before anything is trained."""
    train = read_examples(cfg.path, cfg, labels)
    if cfg.eval_path is not None:
        held = read_examples(cfg.eval_path, cfg, labels, split="eval:")
        clash = {e.id for e in train} & {e.id for e in held}
        if clash:
            raise DataError(
                f"{len(clash)} ids appear in both data.path and data.eval_path (e.g. {sorted(clash)[0]!r}); "
                "a held-out row must not be trained on"
            )
        return train, held
    n_eval = round(len(train) * cfg.eval_fraction)
    if n_eval < 1 or n_eval >= len(train):
        raise DataError(
            f"{cfg.path}: {len(train)} rows with data.eval_fraction={cfg.eval_fraction} leaves "
            f"{n_eval} for evaluation and {len(train) - n_eval} for training; add rows or change the fraction"
        )
    held_ids = set(sorted((e.id for e in train), key=lambda i: _rank(seed, i))[:n_eval])
    return [e for e in train if e.id not in held_ids], [e for e in train if e.id in held_ids]


def draw_shots(
    train: list[Example], labels: tuple[str, ...], k: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(shots, rest): ``k`` gold-labelled rows per label drawn from ``train`` (by the seed and row ids, so the same
    rows every run), and the training rows without them. Only training rows are drawn, so no held-out row is ever
    shown to the teacher. A label with fewer than ``k`` gold rows gives what it has."""
    if k <= 0:
        return [], list(train)
    by_label: dict[str, list[Example]] = {x: [] for x in labels}
    for ex in sorted((e for e in train if e.gold is not None), key=lambda e: _rank(seed + 7919, e.id)):
        if len(by_label[ex.gold]) < k:
            by_label[ex.gold].append(ex)
    if not any(by_label.values()):
        raise DataError(
            "teacher.few_shot draws worked examples from gold-labelled training rows, and no training row has a "
            "gold label; set data.label_column, give task.examples, or set teacher.few_shot: 0"
        )
    # interleave the labels, so the teacher does not see one label's examples in a run
    shots = [group[i] for i in range(k) for group in by_label.values() if i < len(group)]
    chosen = {e.id for e in shots}
    return shots, [e for e in train if e.id not in chosen]
