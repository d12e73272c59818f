"""Signal files: JSONL and its Parquet twin written in batches, put in place together, read back exactly."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from protege.cli import cli
from protege.labeling.signal_files import (
    SignalWriter,
    iter_signals,
    parquet_path,
    read_parquet_signals,
    write_signals,
)


def _rows(n: int) -> list[dict]:
    # probabilities that do not survive float32 or a decimal rounding: the round trip must be exact
    out = []
    for i in range(n):
        raw = [math.exp(-((i + k) % 7) / 3.1) for k in range(5)]
        total = sum(raw)
        out.append({"id": f"r{i}", "text": f"text {i} é", "gold": None if i % 3 else "a", "teacher_label": "b",
                    "teacher_probs": [x / total for x in raw], "method": "logits", "label_mass": 1.0,
                    "call_key": f"{i:064x}", **({"augmented_from": "r0"} if i % 5 == 4 else {})})
    return out


def test_parquet_twin_round_trips_every_row_exactly(tmp_path):
    rows = _rows(10_000)
    path = tmp_path / "signals" / "train.jsonl"
    assert write_signals(path, rows, parquet=True, batch=777) == len(rows)  # several row groups
    assert list(iter_signals(path)) == rows
    back = read_parquet_signals(parquet_path(path))
    assert back == [{**r, "augmented_from": r.get("augmented_from")} for r in rows]
    assert pq.ParquetFile(parquet_path(path)).metadata.num_row_groups > 1
    assert parquet_path(path).stat().st_size < path.stat().st_size / 2


def test_nothing_is_in_place_until_commit_and_an_error_leaves_the_old_files(tmp_path):
    path = tmp_path / "train.jsonl"
    write_signals(path, _rows(3), parquet=True)
    before = path.read_bytes(), parquet_path(path).read_bytes()
    with pytest.raises(RuntimeError):
        with SignalWriter(path, parquet=True) as w:
            w.write(_rows(10))
            raise RuntimeError("killed mid-write")
    assert (path.read_bytes(), parquet_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "train.parquet"]  # no temporary left
    write_signals(path, _rows(2), parquet=False)  # a generation task's: JSONL only, no stale twin
    assert not parquet_path(path).exists() and len(list(iter_signals(path))) == 2


def test_label_writes_the_parquet_twin_of_each_split(tiny_recipe):
    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    sig = tiny_recipe.parent / "out" / "signals"
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in (sig / f"{split}.jsonl").read_text().splitlines()]
        assert rows and read_parquet_signals(sig / f"{split}.parquet") == [
            {**r, "augmented_from": r.get("augmented_from")} for r in rows]


def test_labelling_a_chunk_at_a_time_writes_what_one_pass_writes(tiny_recipe, monkeypatch):
    import protege.labeling.labeler as labeler

    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    sig = tiny_recipe.parent / "out" / "signals"
    whole = {s: (sig / f"{s}.jsonl").read_text() for s in ("train", "eval")}
    monkeypatch.setattr(labeler, "CHUNK_ROWS", 7)  # 45 training rows: seven chunks, the last short
    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q"])
    assert res.exit_code == 0 and "0 teacher calls" in res.output
    assert {s: (sig / f"{s}.jsonl").read_text() for s in ("train", "eval")} == whole
