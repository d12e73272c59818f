"""Hugging Face datasets as data: save_to_disk directories (a Dataset, or a DatasetDict and its splits) and Hub
ids read into the same Examples as the files, ClassLabel ids as their names, and the errors that name the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from click.testing import CliRunner

from protege.cli import cli
from protege.demo_data import LABELS, make_examples
from protege.errors import DataError, MissingExtra, RecipeError
from protege.labeling.data import load_splits, read_examples
from protege.recipe import DataConfig, build_recipe, load_recipe

NAMES = ("billing", "shipping", "other")
ROWS = [  # gold as ClassLabel ids: -1 is the ClassLabel's "no label"
    {"text": "I was charged twice", "label": 0},
    {"text": "Where is my parcel?", "label": 1},
    {"text": "Hello there", "label": -1},
    {"text": "Refund my card, please", "label": 0},
    {"text": "Just saying hi", "label": 2},
]


def _dataset(rows: list[dict], names=NAMES, **extra: list) -> datasets.Dataset:
    features = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))}
    features.update({k: datasets.Value("string") for k in extra})
    columns = {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows], **extra}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _saved(obj, path: Path) -> Path:
    obj.save_to_disk(str(path))
    return path


def test_a_saved_dataset_reads_as_texts_ids_and_label_names(tmp_path):
    path = _saved(_dataset(ROWS), tmp_path / "tickets")
    got = read_examples(path, DataConfig(path=path), NAMES)
    assert [(e.id, e.text, e.gold) for e in got] == [
        ("tickets:1", "I was charged twice", "billing"),
        ("tickets:2", "Where is my parcel?", "shipping"),
        ("tickets:3", "Hello there", None),
        ("tickets:4", "Refund my card, please", "billing"),
        ("tickets:5", "Just saying hi", "other"),
    ]
    assert got[2].where == f"{path}:3"
    # an id column gives the ids; data.limit the first rows; a generation task gets the names as references
    with_ids = _saved(_dataset(ROWS, id=[f"r{i}" for i in range(5)]), tmp_path / "with-ids")
    got = read_examples(with_ids, DataConfig(path=with_ids, limit=2), None)
    assert [(e.id, e.gold) for e in got] == [("r0", "billing"), ("r1", "shipping")]


def test_load_splits_holds_out_by_the_fraction_over_a_saved_dataset(tmp_path):
    rows = [{"text": f"ticket number {i}", "label": i % 3} for i in range(20)]
    path = _saved(_dataset(rows), tmp_path / "d")
    train, held = load_splits(DataConfig(path=path, eval_fraction=0.25), NAMES, seed=0)
    assert (len(train), len(held)) == (15, 5)
    assert {e.id for e in train}.isdisjoint(e.id for e in held)
    gold = {r["text"]: NAMES[r["label"]] for r in rows}
    assert all(e.gold == gold[e.text] for e in train + held)


def test_a_dataset_dicts_splits_train_and_evaluate(tmp_path):
    rows = [{"text": f"ticket number {i}", "label": i % 3} for i in range(12)]
    path = _saved(datasets.DatasetDict(train=_dataset(rows[:9]), test=_dataset(rows[9:])), tmp_path / "dd")

    # data.eval_split alone: the held-out split of data.path's dataset
    train, held = load_splits(DataConfig(path=path, split="train", eval_split="test"), NAMES, seed=0)
    assert (len(train), len(held)) == (9, 3)
    assert [e.text for e in held] == [r["text"] for r in rows[9:]]
    assert [e.id for e in held] == ["eval:dd/test:1", "eval:dd/test:2", "eval:dd/test:3"]
    assert train[0].id == "dd/train:1" and train[0].where == f"{path}[train]:1"
    assert [e.gold for e in held] == ["billing", "shipping", "other"]

    # the same directory as data.path and data.eval_path
    cfg = DataConfig(path=path, split="train", eval_path=path, eval_split="test")
    assert [len(x) for x in load_splits(cfg, NAMES, seed=0)] == [9, 3]


def test_a_class_label_name_outside_the_task_labels_is_refused_by_name(tmp_path):
    path = _saved(_dataset(ROWS, names=("billing", "shipping", "refund")), tmp_path / "d")
    with pytest.raises(DataError) as e:
        read_examples(path, DataConfig(path=path), NAMES)
    msg = str(e.value)
    assert "['refund']" in msg and "not among task.labels" in msg
    assert "set task.labels to the ClassLabel's names ['billing', 'shipping', 'refund']" in msg


def test_a_missing_split_is_refused_naming_the_splits_there_are(tmp_path):
    path = _saved(datasets.DatasetDict(train=_dataset(ROWS), test=_dataset(ROWS[:2])), tmp_path / "dd")
    with pytest.raises(DataError, match=r"has no split 'validation' \(splits: \['train', 'test'\]\); set "
                                        r"data.eval_split to one of them"):
        load_splits(DataConfig(path=path, split="train", eval_split="validation"), NAMES, seed=0)
    with pytest.raises(DataError, match=r"is a DatasetDict, so a split must be picked \(splits: \['train', 'test'\]\); "
                                        r"set data.split"):
        load_splits(DataConfig(path=path), NAMES, seed=0)
    one = _saved(_dataset(ROWS), tmp_path / "one")
    with pytest.raises(DataError, match="is a single dataset without splits; remove data.split 'train'"):
        read_examples(one, DataConfig(path=one, split="train"), NAMES)


def test_split_settings_on_a_file_and_a_bare_prefix_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.split picks a split of a Hugging Face dataset, and data.path "
                                         "'d.jsonl' is a file; remove data.split"):
        DataConfig(path="d.jsonl", split="train")
    with pytest.raises(ValueError, match="data.eval_split .* data.eval_path 'e.csv' is a file"):
        DataConfig(path="dd", eval_path="e.csv", eval_split="test")
    with pytest.raises(ValueError, match="data.subset picks a subset of a Hub dataset"):
        DataConfig(path="dd", subset="sst2")
    with pytest.raises(ValueError, match="is the training split"):
        DataConfig(path="dd", split="train", eval_split="train")
    with pytest.raises(ValueError, match="needs a Hub dataset id after it"):
        DataConfig(path="hf:")
    with pytest.raises(RecipeError, match="data.eval_split picks a split"):
        build_recipe({"data": {"path": "d.jsonl", "eval_split": "test"}})


def test_a_hub_id_stays_a_hub_id_and_one_not_cached_fails_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"data": {"path": "hf:protege-tests/never-cached", "subset": "main", "split": "train"}}
    ))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert str(recipe.data.path) == "hf:protege-tests/never-cached"  # not made a path under the recipe's folder
    with pytest.raises(DataError) as e:
        load_splits(recipe.data, NAMES, seed=0)
    msg = str(e.value)
    assert msg.startswith("hf:protege-tests/never-cached[main]: the Hub dataset is not in the local cache")
    assert "datasets.load_dataset('protege-tests/never-cached', 'main') once where the Hub is reachable" in msg


def test_a_directory_that_is_no_saved_dataset_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a directory; point it at a .jsonl/.csv/.parquet file or at a directory "
                                        "written by datasets' save_to_disk"):
        read_examples(tmp_path / "plain", DataConfig(path=tmp_path / "plain"), NAMES)


def test_a_recipe_over_a_dataset_dict_runs_end_to_end_through_the_cli(tiny_recipe, tiny_classifier_dir):
    """label, train, eval with the tiny classifier teacher on the demo texts saved as a DatasetDict."""
    root = tiny_recipe.parent
    rows = make_examples(60, seed=3)
    names = list(LABELS)
    features = datasets.Features(
        {"id": datasets.Value("string"), "text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    split = {
        name: datasets.Dataset.from_list([{**r, "label": names.index(r["label"])} for r in part], features=features)
        for name, part in (("train", rows[:45]), ("test", rows[45:]))
    }
    _saved(datasets.DatasetDict(split), root / "tickets")
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["data"] = {"path": "tickets", "split": "train", "eval_split": "test"}
    recipe["teacher"] = {"model": f"hf:{tiny_classifier_dir}", "batch_size": 8}
    tiny_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))

    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    out = root / "out"
    read = lambda name: [json.loads(x) for x in (out / "signals" / name).read_text().splitlines() if x]  # noqa: E731
    train, held = read("train.jsonl"), read("eval.jsonl")
    assert [r["id"] for r in train] == [r["id"] for r in rows[:45]]
    assert [(r["id"], r["text"], r["gold"]) for r in held] == [(r["id"], r["text"], r["label"]) for r in rows[45:]]
    report = json.loads((out / "report.json").read_text())
    assert report["eval_examples"] == 15
    card = (out / "student" / "README.md").read_text()
    assert "training data: `tickets` (split `train`), labelled by the teacher; held out for evaluation: its split " \
        "`test`" in card
    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 0 and "label: 0 teacher calls" in res.output, res.output


def test_without_the_datasets_package_a_saved_dataset_asks_for_the_extra(tmp_path, monkeypatch):
    path = _saved(_dataset(ROWS), tmp_path / "d")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(MissingExtra, match=r"Install it with: pip install 'protege\[datasets\]'"):
        read_examples(path, DataConfig(path=path), NAMES)


def test_a_cached_hub_dataset_reads_offline_with_its_subset_and_splits(tmp_path, monkeypatch):
    """A Hub download's cache, laid out as datasets writes it (<owner>___<name>/<subset>/<version>/<hash>/ with
    <name>-<split>.arrow), built here from Parquet files: read with the Hub unreachable."""
    cache = tmp_path / "cache"
    for split in ("train", "validation"):
        _dataset(ROWS).rename_column("text", "sentence").to_parquet(str(tmp_path / f"{split}.parquet"))
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")}
    datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(cache / "build")).download_and_prepare()
    (built,) = (f.parent for f in (cache / "build").glob("parquet/*/*/*/dataset_info.json"))
    target = cache / "someone___tickets" / "support" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    built.rename(target)
    for split in files:
        (target / f"parquet-{split}.arrow").rename(target / f"tickets-{split}.arrow")
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "support", "dataset_name": "tickets"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    cfg = DataConfig(path="hf:someone/tickets", subset="support", split="train", eval_split="validation",
                     text_column="sentence")
    train, held = load_splits(cfg, NAMES, seed=0)
    assert [(e.id, e.text, e.gold) for e in held[:3]] == [
        ("eval:tickets/validation:1", "I was charged twice", "billing"),
        ("eval:tickets/validation:2", "Where is my parcel?", "shipping"),
        ("eval:tickets/validation:3", "Hello there", None),
    ]
    assert len(train) == 5 and train[4].where == "hf:someone/tickets[support][train]:5" and train[4].gold == "other"
