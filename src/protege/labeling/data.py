"""Read the user's texts (JSONL, CSV, Parquet or a Hugging Face dataset), check them against the task, and split off
evaluation."""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..errors import DataError, MissingExtra
from ..recipe import DATA_FILE_SUFFIXES as SUFFIXES
from ..recipe import DataConfig, hub_dataset_id

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["Example", "read_examples", "load_splits", "draw_shots"]

_SAVED_DATASET = ("dataset_dict.json", "state.json")  # what save_to_disk writes: a DatasetDict, a Dataset
_BATCH_ROWS = 1000  # rows read from a Hugging Face dataset at a time


@dataclass(frozen=True, slots=True)  # slots: a million examples without a million __dict__s
class Example:
    """One text to distill on. ``gold`` is None for unlabeled rows; ``where`` is 'file:line' for messages."""

    id: str
    text: str
    gold: str | None
    where: str


def _raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row) pairs, read as the file is (never the whole file at once); numbers are 1-based
    lines for JSONL/CSV and 1-based rows for Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
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
                yield n, row
        return
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells but the header has "
                        f"{len(reader.fieldnames or [])} columns; quote cells that contain commas"
                    )
                yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
        except DataError:
            raise
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        return
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


@functools.lru_cache(maxsize=8)
def _file_columns(path: Path, size: int, mtime_ns: int, limit: int | None) -> tuple[int, frozenset[str]]:
    """(rows, every column) of the first ``limit`` rows of a data file; cached for the file's size and
    modification time, so the passes of one run read the columns once."""
    columns: set[str] = set()
    count = 0
    for _, row in itertools.islice(_raw_rows(path), limit):  # islice(..., None): all
        columns.update(row)
        count += 1
    return count, frozenset(columns)


def _is_dataset(path: Path) -> bool:
    """Whether ``path`` names a Hugging Face dataset: an 'hf:' Hub id or a save_to_disk directory."""
    return hub_dataset_id(path) is not None or (path.is_dir() and any((path / f).is_file() for f in _SAVED_DATASET))


def _load_dataset(path: Path, cfg: DataConfig, setting: str) -> tuple[Dataset, str, str]:
    """(the dataset, its name for messages, the stem of default row ids) of a save_to_disk directory or a Hub id;
    a DatasetDict gives the split named by data.<setting> ('split' or 'eval_split')."""
    try:
        import datasets
    except ImportError:
        raise MissingExtra("datasets", "datasets", f"reading the Hugging Face dataset {str(path)!r}") from None
    hub = hub_dataset_id(path)
    if hub is None:
        name, stem = str(path), path.name
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable save_to_disk directory ({e}); write it again") from None
    else:
        name, stem = str(path) + (f"[{cfg.subset}]" if cfg.subset else ""), hub.rsplit("/", 1)[-1]
        call = f"datasets.load_dataset({hub!r}" + (f", {cfg.subset!r})" if cfg.subset else ")")
        try:
            loaded = datasets.load_dataset(hub, cfg.subset)
        except ConnectionError as e:  # offline (HF_HUB_OFFLINE) or no network, and not in the local cache
            raise DataError(
                f"{name}: the Hub dataset is not in the local cache and the Hub cannot be reached ({e}); run "
                f"{call} once where the Hub is reachable, or save_to_disk it and point data.path at the directory"
            ) from None
        except (OSError, ValueError) as e:  # no such dataset, subset or access
            raise DataError(f"{name}: {call} failed ({e}); check data.path and data.subset") from None
    chosen = getattr(cfg, setting)
    if isinstance(loaded, datasets.DatasetDict):
        if chosen not in loaded:
            what = f"has no split {chosen!r}" if chosen else "is a DatasetDict, so a split must be picked"
            raise DataError(f"{name} {what} (splits: {list(loaded)}); set data.{setting} to one of them")
        return loaded[chosen], f"{name}[{chosen}]", f"{stem}/{chosen}"
    if chosen is not None:
        raise DataError(f"{name} is a single dataset without splits; remove data.{setting} {chosen!r}")
    return loaded, name, stem


def _class_label_names(dataset: Dataset, column: str, name: str, labels: tuple[str, ...] | None) -> list[str] | None:
    """The names of a ``ClassLabel`` column, which its int ids index; None for any other column. Every name must
    be one of ``labels`` (when given), so a recipe and its data cannot disagree on what a label id means."""
    from datasets import ClassLabel

    feature = dataset.features.get(column)
    if not isinstance(feature, ClassLabel):
        return None
    names = list(feature.names)
    missing = [x for x in names if labels is not None and x not in labels]
    if missing:
        raise DataError(
            f"{name}: column {column!r} is a ClassLabel with names {missing} that are not among task.labels "
            f"{list(labels or ())}; set task.labels to the ClassLabel's names {names} (or a superset of them)"
        )
    return names


def _dataset_rows(dataset: Dataset, name: str, label_col: str | None, names: list[str] | None
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) pairs, read a batch at a time; ClassLabel ids become their names (-1: no label)."""
    n = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for values in zip(*batch.values()):
            n += 1
            row = dict(zip(batch, values))
            if names is not None and row[label_col] is not None:
                idx = row[label_col]
                if not -1 <= idx < len(names):
                    raise DataError(f"{name}:{n}: label id {idx} is not one of the ClassLabel's {len(names)} ids")
                row[label_col] = names[idx] if idx >= 0 else None
            yield n, row


def read_examples(path: Path, cfg: DataConfig, labels: tuple[str, ...] | None, split: str = "") -> list[Example]:
    """Every row of ``path`` as an example (:func:`iter_examples`, in a list)."""
    return list(iter_examples(path, cfg, labels, split))


def iter_examples(path: Path, cfg: DataConfig, labels: tuple[str, ...] | None, split: str = "") -> Iterator[Example]:
    """Read and validate the rows of ``path`` one at a time; raise DataError naming the file, line and fix.

    ``labels`` is the label set gold labels must come from; None for a generation task, whose label column
    holds free-text reference answers.
    Without an id column, a row's id is ``[split:]stem:line``. A Hugging Face dataset (a save_to_disk directory
    or 'hf:owner/name') is read from data.split, or data.eval_split for the held-out side (``split`` 'eval:'),
    and its rows are numbered from 1 (id ``[split:]name/dataset split:row``).
    """
    dataset = None
    if _is_dataset(path):
        dataset, source, stem = _load_dataset(path, cfg, "eval_split" if split else "split")
        columns = set(dataset.column_names)
        if cfg.limit is not None and cfg.limit < len(dataset):
            dataset = dataset.select(range(cfg.limit))
        if len(dataset) == 0:
            raise DataError(f"{source} has no rows; add data or pick another split")
    else:
        if not path.exists():
            raise DataError(f"data file {str(path)!r} does not exist; check data.path (or data.eval_path)")
        if path.is_dir():
            raise DataError(
                f"data path {str(path)!r} is a directory; point it at a {'/'.join(SUFFIXES)} file or at a directory "
                "written by datasets' save_to_disk"
            )
        # two passes over the file, a row at a time: its columns first (once per version of the file), then the rows
        count, columns = _file_columns(path, path.stat().st_size, path.stat().st_mtime_ns, cfg.limit)
        if not count:
            raise DataError(f"data file {str(path)!r} has no rows; add data or fix the path")
        rows: Iterable[tuple[int, dict[str, Any]]] = itertools.islice(_raw_rows(path), cfg.limit)
        source, stem = str(path), path.stem

    if cfg.text_column not in columns:
        raise DataError(
            f"{source}: no {cfg.text_column!r} column (columns: {sorted(columns)}); set data.text_column"
        )
    label_col = cfg.label_column or ("label" if "label" in columns else None)
    if label_col is not None and label_col not in columns:
        raise DataError(f"{source}: no {label_col!r} column (columns: {sorted(columns)}); set data.label_column")
    id_col = cfg.id_column or ("id" if "id" in columns else None)
    if id_col is not None and id_col not in columns:
        raise DataError(f"{source}: no {id_col!r} column (columns: {sorted(columns)}); set data.id_column")
    if dataset is not None:
        names = _class_label_names(dataset, label_col, source, labels) if label_col else None
        dataset = dataset.select_columns([c for c in dict.fromkeys((cfg.text_column, label_col, id_col)) if c])
        rows = _dataset_rows(dataset, source, label_col, names)

    folded = {name.casefold(): name for name in labels or ()}
    seen_ids: dict[str, int] = {}
    for n, row in rows:
        where = f"{source}:{n}"
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
        ex_id = str(row[id_col]) if id_col and row.get(id_col) is not None else f"{split}{stem}:{n}"
        if ex_id in seen_ids:
            raise DataError(f"{where}: id {ex_id!r} repeats line {seen_ids[ex_id]}; ids must be unique")
        seen_ids[ex_id] = n
        yield Example(ex_id, text, gold if gold is None else sys.intern(gold), where)


def _rank(seed: int, ex_id: str) -> str:
    return hashlib.sha256(f"{seed}:{ex_id}".encode()).hexdigest()


def stream_splits(cfg: DataConfig, labels: tuple[str, ...] | None, seed: int
                  ) -> tuple[Callable[[], Iterator[Example]], int, list[Example]]:
    """(a function that reads the training rows anew, a row at a time; how many there are; the eval rows): the
    same split as :func:`load_splits`, without holding the training rows in memory (two passes over the data:
    the ids first, which fix the eval split, then the rows)."""
    if cfg.eval_path is not None or cfg.eval_split is not None:
        held = read_examples(cfg.eval_path or cfg.path, cfg, labels, split="eval:")
        held_ids = {e.id for e in held}
        n, clash = 0, []
        for e in iter_examples(cfg.path, cfg, labels):
            n += 1
            if e.id in held_ids:
                clash.append(e.id)
        if clash:
            other = "data.eval_path" if cfg.eval_path is not None else "data.eval_split"
            raise DataError(
                f"{len(clash)} ids appear in both data.path and {other} (e.g. {sorted(clash)[0]!r}); "
                "a held-out row must not be trained on"
            )

        def train_rows() -> Iterator[Example]:
            return iter_examples(cfg.path, cfg, labels)

        return train_rows, n, held
    ids = [e.id for e in iter_examples(cfg.path, cfg, labels)]
    n_eval = _eval_count(cfg, len(ids))
    held_ids = set(sorted(ids, key=lambda i: _rank(seed, i))[:n_eval])
    n_train = len(ids) - n_eval
    del ids
    held = [e for e in iter_examples(cfg.path, cfg, labels) if e.id in held_ids]

    def train() -> Iterator[Example]:
        return (e for e in iter_examples(cfg.path, cfg, labels) if e.id not in held_ids)

    return train, n_train, held


def _eval_count(cfg: DataConfig, rows: int) -> int:
    n_eval = round(rows * cfg.eval_fraction)
    if n_eval < 1 or n_eval >= rows:
        raise DataError(
            f"{cfg.path}: {rows} rows with data.eval_fraction={cfg.eval_fraction} leaves "
            f"{n_eval} for evaluation and {rows - n_eval} for training; add rows or change the fraction"
        )
    return n_eval


def load_splits(cfg: DataConfig, labels: tuple[str, ...] | None, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval). The eval split is fixed by the seed and row ids, before anything is trained."""
    train = read_examples(cfg.path, cfg, labels)
    if cfg.eval_path is not None or cfg.eval_split is not None:
        # a held-out file, or a held-out split of data.eval_path's (else data.path's) Hugging Face dataset
        held = read_examples(cfg.eval_path or cfg.path, cfg, labels, split="eval:")
        clash = {e.id for e in train} & {e.id for e in held}
        if clash:
            other = "data.eval_path" if cfg.eval_path is not None else "data.eval_split"
            raise DataError(
                f"{len(clash)} ids appear in both data.path and {other} (e.g. {sorted(clash)[0]!r}); "
                "a held-out row must not be trained on"
            )
        return train, held
    n_eval = _eval_count(cfg, len(train))
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
