"""Reading data: the three formats agree, errors name file:line and the setting to fix, and the split is
deterministic, disjoint and sized by the fraction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from protege.errors import DataError
from protege.labeling.data import Example, load_splits, read_examples, stream_splits
from protege.recipe import DataConfig

LABELS = ("billing", "shipping", "other")
ROWS = [
    {"text": "I was charged twice", "label": "billing"},
    {"text": "Where is my parcel?", "label": "shipping"},
    {"text": "Hello there", "label": ""},
    {"text": "Refund my card, please", "label": "billing"},
    {"text": "Just saying hi"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


def _parquet(path: Path, rows: list[dict], columns: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=path, **kw)


def _read(path: Path, **kw) -> list[Example]:
    return read_examples(path, _cfg(path, **kw), LABELS)


def test_three_formats_give_the_same_examples(tmp_path):
    j = _read(_jsonl(tmp_path / "d.jsonl", ROWS))
    c = _read(_csv(tmp_path / "d.csv", ROWS, ["text", "label"]))
    p = _read(_parquet(tmp_path / "d.parquet", ROWS, ["text", "label"]))
    expected = [(r["text"], r.get("label") or None) for r in ROWS]
    for exs in (j, c, p):
        assert [(e.text, e.gold) for e in exs] == expected
    assert [e.gold for e in j] == ["billing", "shipping", None, "billing", None]
    # without an id column the id is '<stem>:<line>' (1-based lines; the CSV header is line 1)
    assert [e.id for e in j] == [f"d:{n}" for n in range(1, 6)]
    assert [e.id for e in c] == [f"d:{n}" for n in range(2, 7)]
    assert [e.id for e in p] == [f"d:{n}" for n in range(1, 6)]
    assert j[0].where == f"{tmp_path / 'd.jsonl'}:1"
    assert c[0].where == f"{tmp_path / 'd.csv'}:2"


def test_ids_come_from_the_id_column(tmp_path):
    rows = [{**r, "id": f"row-{i}"} for i, r in enumerate(ROWS)]
    cols = ["id", "text", "label"]
    for path in (
        _jsonl(tmp_path / "a.jsonl", rows),
        _csv(tmp_path / "a.csv", rows, cols),
        _parquet(tmp_path / "a.parquet", rows, cols),
    ):
        assert [e.id for e in _read(path)] == [f"row-{i}" for i in range(5)], path.suffix
    # integer ids become strings; a custom id column is honoured
    p = _jsonl(tmp_path / "b.jsonl", [{"key": 7, "text": "x"}, {"key": 8, "text": "y"}])
    assert [e.id for e in _read(p, id_column="key")] == ["7", "8"]


def test_custom_columns(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"body": "hi", "y": "other"}, {"body": "money", "y": "billing"}])
    exs = _read(p, text_column="body", label_column="y")
    assert [(e.text, e.gold) for e in exs] == [("hi", "other"), ("money", "billing")]


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [e.id for e in _read(p)] == ["b:1", "b:3"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match=r"file\.jsonl:3: not valid JSON"):
        _read(p)


def test_non_object_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n["c"]\n')
    with pytest.raises(DataError, match=r"file\.jsonl:3: expected a JSON object.*list"):
        _read(p)


def test_missing_text_column(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"body": "a"}])
    with pytest.raises(DataError) as e:
        _read(p)
    assert "'text'" in str(e.value) and "data.text_column" in str(e.value) and "body" in str(e.value)


def test_missing_explicit_label_column(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "billing"}])
    with pytest.raises(DataError) as e:
        _read(p, label_column="gold")
    assert "'gold'" in str(e.value) and "data.label_column" in str(e.value)


def test_missing_explicit_id_column(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="data.id_column"):
        _read(p, id_column="uid")


def test_empty_text_is_rejected_with_line(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "   "}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: 'text' is empty"):
        _read(p)


def test_unknown_gold_label_names_line_and_label(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "billing"}, {"text": "b", "label": "refunds"}])
    with pytest.raises(DataError) as e:
        _read(p)
    msg = str(e.value)
    assert "d.jsonl:2" in msg and "'refunds'" in msg and "task.labels" in msg
    assert "did you mean" not in msg


def test_case_only_mismatch_suggests_spelling(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "Billing"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: label 'Billing'.*did you mean 'billing'\?"):
        _read(p)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        _read(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        _read(blank)
    with pytest.raises(DataError, match="does not exist"):
        _read(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        _read(tmp_path)


def test_unsupported_suffix_lists_supported_types(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("text\nhello\n")
    with pytest.raises(DataError) as e:
        _read(p)
    msg = str(e.value)
    assert "'.txt'" in msg and ".jsonl" in msg and ".csv" in msg and ".parquet" in msg


def test_corrupt_parquet_is_a_data_error(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Parquet"):
        _read(p)


def test_duplicate_ids_rejected(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "a"}, {"id": "y", "text": "b"}, {"id": "x", "text": "c"}])
    with pytest.raises(DataError) as e:
        _read(p)
    assert "d.jsonl:3" in str(e.value) and "'x'" in str(e.value) and "line 1" in str(e.value)


def test_csv_row_with_too_many_cells_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,billing\na,b,c\n")
    with pytest.raises(DataError) as e:
        _read(p)
    msg = str(e.value)
    assert "d.csv:3" in msg and "3 cells" in msg and "2 columns" in msg


def _numbered(tmp_path: Path, n: int, name: str = "train.jsonl", prefix: str = "r") -> Path:
    return _jsonl(tmp_path / name, [{"id": f"{prefix}{i}", "text": f"text {i}"} for i in range(n)])


@pytest.mark.parametrize("n, fraction", [(50, 0.2), (37, 0.3), (10, 0.25), (9, 0.3)])
def test_split_is_deterministic_disjoint_and_sized(tmp_path, n, fraction):
    cfg = _cfg(_numbered(tmp_path, n), eval_fraction=fraction)
    train, held = load_splits(cfg, LABELS, seed=0)
    train2, held2 = load_splits(cfg, LABELS, seed=0)
    assert [e.id for e in train] == [e.id for e in train2] and [e.id for e in held] == [e.id for e in held2]
    ids_t, ids_h = {e.id for e in train}, {e.id for e in held}
    assert not ids_t & ids_h
    assert ids_t | ids_h == {f"r{i}" for i in range(n)}
    assert len(held) == round(n * fraction)
    assert len(train) == n - round(n * fraction)
    # both splits keep file order
    assert [e.id for e in train] == sorted((e.id for e in train), key=lambda i: int(i[1:]))


def test_different_seed_gives_different_split(tmp_path):
    cfg = _cfg(_numbered(tmp_path, 50))
    held = {seed: {e.id for e in load_splits(cfg, LABELS, seed)[1]} for seed in (0, 1, 2)}
    assert len(held[0]) == len(held[1]) == 10
    assert held[0] != held[1] and held[0] != held[2]


def test_split_that_leaves_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match="eval_fraction"):
        load_splits(_cfg(_numbered(tmp_path, 2), eval_fraction=0.1), LABELS, 0)


def test_eval_path_is_used_and_overlap_rejected(tmp_path):
    train_p = _numbered(tmp_path, 6, "train.jsonl", "t")
    eval_p = _numbered(tmp_path, 3, "eval.jsonl", "e")
    train, held = load_splits(_cfg(train_p, eval_path=eval_p), LABELS, 0)
    assert [e.id for e in train] == [f"t{i}" for i in range(6)]
    assert [e.id for e in held] == ["e0", "e1", "e2"]

    clash = _jsonl(tmp_path / "clash.jsonl", [{"id": "t3", "text": "again"}, {"id": "new", "text": "n"}])
    with pytest.raises(DataError) as e:
        load_splits(_cfg(train_p, eval_path=clash), LABELS, 0)
    assert "'t3'" in str(e.value) and "data.eval_path" in str(e.value)


def test_limit_keeps_first_rows(tmp_path):
    p = _numbered(tmp_path, 20)
    assert [e.id for e in _read(p, limit=4)] == ["r0", "r1", "r2", "r3"]
    train, held = load_splits(_cfg(p, limit=10, eval_fraction=0.2), LABELS, 0)
    assert len(train) + len(held) == 10 and len(held) == 2
    assert {e.id for e in train + held} == {f"r{i}" for i in range(10)}


def test_eval_file_with_same_name_and_no_id_column_is_not_an_overlap(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "eval").mkdir()
    train_p = _jsonl(tmp_path / "train" / "data.jsonl", [{"text": f"train text {i}"} for i in range(4)])
    eval_p = _jsonl(tmp_path / "eval" / "data.jsonl", [{"text": f"eval text {i}"} for i in range(2)])
    train, held = load_splits(_cfg(train_p, eval_path=eval_p), LABELS, 0)
    assert len(train) == 4 and len(held) == 2
    assert not {e.id for e in train} & {e.id for e in held}


def test_byte_order_mark_is_tolerated(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("text,label\nhello there,".encode("utf-8-sig") + LABELS[0].encode() + b"\n")
    (ex,) = read_examples(p, DataConfig(path=p), LABELS)
    assert ex.text == "hello there" and ex.gold == LABELS[0]


@pytest.mark.parametrize("held_out_file", [False, True])
def test_streamed_splits_are_the_splits_in_memory(tmp_path, held_out_file):
    """stream_splits reads the training rows anew a row at a time; the split is load_splits' exactly."""
    rows = [{"id": f"r{i}", "text": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(50)]
    kw = {"path": _jsonl(tmp_path / "d.jsonl", rows), "eval_fraction": 0.2}
    if held_out_file:
        kw["eval_path"] = _jsonl(tmp_path / "e.jsonl", [{"id": f"e{i}", "text": f"other {i}"} for i in range(7)])
    cfg = DataConfig(**kw)
    train, held = load_splits(cfg, ("pos", "neg"), seed=3)
    rows_of, n, streamed_held = stream_splits(cfg, ("pos", "neg"), seed=3)
    assert streamed_held == held and n == len(train)
    assert list(rows_of()) == train == list(rows_of())  # each call reads the file again


def test_streamed_splits_refuse_ids_in_both_files(tmp_path):
    d = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    e = _jsonl(tmp_path / "e.jsonl", [{"id": "b", "text": "z"}])
    with pytest.raises(DataError, match="1 ids appear in both data.path and data.eval_path"):
        stream_splits(DataConfig(path=d, eval_path=e), None, seed=0)
