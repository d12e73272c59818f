"""The signal files a labeling run writes and training reads: ``signals/{split}.jsonl``, one JSON object per row
(readable by ``datasets.load_dataset("json", ...)``), and for a classification task ``signals/{split}.parquet``
beside it with the same rows (readable by pandas, polars, DuckDB and ``datasets`` alike).

Both are written in batches as rows arrive (:class:`SignalWriter`) into temporary files renamed into place
together at the end, so a reader never sees half a file and a run that stops writes neither; they are read back
a row at a time (:func:`iter_signals`), so no stage has to hold a split's rows in memory twice.

The Parquet file keeps the classification columns below, ``teacher_probs`` as float64 lists: a distribution
round-trips exactly. A generation task's rows (conversations, token log-probabilities) are JSONL only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ProtegeError

__all__ = ["PARQUET_SCHEMA", "SignalWriter", "iter_signals", "parquet_path", "read_parquet_signals",
           "remove_signals", "write_signals"]


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("gold", pa.string()), ("teacher_label", pa.string()),
        ("teacher_probs", pa.list_(pa.float64())), ("method", pa.string()), ("label_mass", pa.float64()),
        ("call_key", pa.string()), ("augmented_from", pa.string()),
    ])


PARQUET_SCHEMA = _schema()


def parquet_path(jsonl: Path) -> Path:
    return jsonl.with_suffix(".parquet")


class SignalWriter:
    """Streams signal rows to ``path`` (JSONL) and, with ``parquet``, to the ``.parquet`` beside it; :meth:`commit`
    puts both in place, :meth:`abort` (or leaving the ``with`` block by an exception) removes what was written."""

    def __init__(self, path: Path, parquet: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._jsonl = os.fdopen(fd, "w", encoding="utf-8")
        self._pq_tmp: str | None = None
        self._pq: Any = None
        if parquet:
            import pyarrow.parquet as pq

            fd, self._pq_tmp = tempfile.mkstemp(prefix=f".{parquet_path(self.path).name}.", suffix=".tmp",
                                                dir=self.path.parent)
            os.close(fd)
            self._pq = pq.ParquetWriter(self._pq_tmp, PARQUET_SCHEMA, compression="zstd")

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self._jsonl.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if self._pq is not None:
            import pyarrow as pa

            columns = {f.name: [r.get(f.name) for r in rows] for f in PARQUET_SCHEMA}
            self._pq.write_table(pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA))
        self.rows += len(rows)

    def commit(self) -> None:
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self._jsonl.close()
        if self._pq is not None:
            self._pq.close()
            os.replace(self._pq_tmp, parquet_path(self.path))
        else:
            parquet_path(self.path).unlink(missing_ok=True)  # a stale one from another task would mislead
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._jsonl.close()
        if self._pq is not None:
            with contextlib.suppress(Exception):
                self._pq.close()
        for tmp in (self._tmp, self._pq_tmp):
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def __enter__(self) -> SignalWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()


def write_signals(path: Path, rows: Iterable[dict[str, Any]], parquet: bool, batch: int = 4096) -> int:
    """Write ``rows`` as a signal file (and its Parquet twin); returns the number of rows."""
    with SignalWriter(path, parquet) as w:
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                w.write(chunk)
                chunk = []
        w.write(chunk)
        w.commit()
        return w.rows


def iter_signals(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a signal file, one at a time."""
    path = Path(path)
    if not path.is_file():
        raise ProtegeError(f"{str(path)!r} does not exist; run `protege label` first")
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_parquet_signals(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet signal file as dicts (the Parquet columns)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def remove_signals(signals_dir: Path, splits: Iterable[str] = ("train", "eval")) -> None:
    for split in splits:
        for suffix in (".jsonl", ".parquet"):
            (signals_dir / f"{split}{suffix}").unlink(missing_ok=True)
