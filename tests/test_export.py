"""`protege export --format onnx`: a tiny classifier and a tiny Llama student exported with torch's ONNX exporter,
run back with onnxruntime from the exported folder alone, and compared with PyTorch."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protege.cli import cli
from protege.demo_data import LABELS, make_examples
from protege.errors import MissingExtra, ProtegeError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from protege.export import export_student  # noqa: E402
from protege.export.common import parity  # noqa: E402
from protege.export.onnx import DEFAULT_ATOL  # noqa: E402

TEXTS = [r["text"] for r in make_examples(6, seed=21)] + ["ok", "refund " * 40]


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its content hash: to see that a failed export changed nothing."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_classifier_dir) -> Path:
    """The tiny BERT classifier saved the way `protege train` saves a student."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from protege.recipe import build_recipe
    from protege.students.card import StudentCard
    from protege.students.classifier import save_student

    path = tmp_path_factory.mktemp("export") / "student"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    card = StudentCard.for_classifier(build_recipe({"task": {"labels": list(LABELS)}}), LABELS, {})
    save_student(model, AutoTokenizer.from_pretrained(tiny_classifier_dir), path, card)
    return path


@pytest.fixture(scope="module")
def exported(classifier) -> tuple[Path, str]:
    """`protege export STUDENT` through the CLI, into the default folder STUDENT/onnx."""
    result = CliRunner().invoke(cli, ["export", str(classifier), "--format", "onnx", "--runs", "10"])
    assert result.exit_code == 0, result.output
    return classifier / "onnx", result.output


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory, tiny_lm_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lm-export") / "onnx"
    return out, export_student(tiny_lm_dir, "onnx", out, runs=10)


def _session(folder: Path):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------------------
# classifier


def test_cli_prints_parity_and_latency(exported):
    folder, output = exported
    report = json.loads((folder / "export_report.json").read_text())
    assert f"to {folder}" in output and "classifier student (BertForSequenceClassification)" in output
    assert f"max |logit difference| {report['parity']['max_abs_diff']:.2g} over 4 texts" in output
    lat = report["latency"]
    assert f"PyTorch {lat['pytorch_ms']['p50']:.2f}/{lat['pytorch_ms']['p95']:.2f} ms" in output
    assert f"onnxruntime {lat['onnxruntime_ms']['p50']:.2f}/{lat['onnxruntime_ms']['p95']:.2f} ms" in output
    assert f"report: {folder / 'export_report.md'}" in output


def test_folder_is_self_contained(exported, classifier):
    """model.onnx, tokenizer, config (the labels) and protege.json; nothing half-written beside it."""
    folder, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "protege.json",
            "export_report.json", "export_report.md"} <= names
    assert not any(p.name.startswith(".") for p in classifier.iterdir())  # no temporary folder left
    assert json.loads((folder / "protege.json").read_text()) == json.loads((classifier / "protege.json").read_text())
    assert json.loads((folder / "protege.json").read_text())["labels"] == list(LABELS)
    report = json.loads((folder / "export_report.json").read_text())
    assert sorted(names) == report["files"]
    onnx.checker.check_model(str(folder / "model.onnx"))


def test_report_fields(exported):
    folder, _ = exported
    r = json.loads((folder / "export_report.json").read_text())
    assert (r["format"], r["kind"], r["architecture"]) == ("onnx", "classifier", "BertForSequenceClassification")
    assert r["exporter"] == "torch.onnx.export(dynamo=True)" and r["threads"] == 1
    p = r["parity"]
    assert p["passed"] is True and p["atol"] == DEFAULT_ATOL["classifier"] == 1e-4
    assert 0 <= p["max_abs_diff"] <= 1e-4 and p["argmax_agreement"] == 1.0 and p["texts"] == p["positions"] == 4
    lat = r["latency"]
    assert lat["runs"] == 10 and lat["warmup"] == 5
    for side in ("pytorch_ms", "onnxruntime_ms"):
        assert 0 < lat[side]["p50"] <= lat[side]["p95"] and lat[side]["mean"] > 0
    assert lat["speedup_p50"] == pytest.approx(lat["pytorch_ms"]["p50"] / lat["onnxruntime_ms"]["p50"])
    assert r["model_bytes"] == (folder / "model.onnx").stat().st_size > 0
    assert r["parameters"] > 0
    md = (folder / "export_report.md").read_text()
    assert f"{lat['pytorch_ms']['p50']:.3f}" in md and f"{lat['onnxruntime_ms']['p95']:.3f}" in md
    assert "**passed**" in md


def test_onnx_equals_pytorch_on_unseen_texts(exported, classifier):
    """New texts and shapes the export never saw (batch 1, batch 8 with padding, one token), read with the
    tokenizer and labels from the exported folder only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, _ = exported
    tok = AutoTokenizer.from_pretrained(folder)
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    sess = _session(folder)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    for batch in (TEXTS, TEXTS[:1], ["refund"]):
        enc = tok(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
        feed = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        (got,) = sess.run(None, feed)
        with torch.inference_mode():
            ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert got.shape == (len(batch), len(LABELS))
        torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-4, rtol=0)
        assert [labels[str(i)] for i in got.argmax(-1)] == [model.config.id2label[int(i)] for i in ref.argmax(-1)]


def test_axes_are_dynamic(exported):
    folder, _ = exported
    graph = onnx.load(str(folder / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == ["batch", len(LABELS)]


def test_parity_failure_writes_nothing_and_keeps_the_previous_export(exported, tmp_path):
    """A tolerance no fp32 export meets: exit 2, the old export untouched, no temporary folder left."""
    folder, _ = exported
    previous = tmp_path / "out"
    shutil.copytree(folder, previous)
    before = _tree(previous)
    result = CliRunner().invoke(cli, ["export", str(folder.parent), "--output", str(previous), "--atol", "1e-12",
                                      "--runs", "1"])
    assert result.exit_code == 2, result.output
    assert "disagrees with PyTorch" in result.output and "tolerance 1e-12" in result.output
    assert _tree(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------------------------
# causal LM


def test_lm_export_parity_and_report(lm_export):
    out, r = lm_export
    assert (r.kind, r.architecture) == ("lm", "LlamaForCausalLM")
    assert r.parity["atol"] == DEFAULT_ATOL["lm"] == 1e-3
    assert r.parity["passed"] and r.parity["max_abs_diff"] <= 1e-4 and r.parity["argmax_agreement"] == 1.0
    assert r.parity["positions"] > r.parity["texts"]  # every real token of every text, not one per text
    lat = r.latency
    assert (lat.runtime, lat.runs, lat.warmup, lat.pytorch.runs, lat.exported.runs) == ("onnxruntime", 10, 5, 10, 10)
    assert 0 < lat.pytorch.p50 <= lat.pytorch.p95 and 0 < lat.exported.p50 <= lat.exported.p95
    assert lat.speedup_p50 == pytest.approx(lat.pytorch.p50 / lat.exported.p50)
    # the file is the typed report, under the keys readers of export_report.json know
    written = json.loads((out / "export_report.json").read_text())
    assert written == r.to_json()
    assert written["latency"]["onnxruntime_ms"] == {"p50": lat.exported.p50, "p95": lat.exported.p95,
                                                    "mean": lat.exported.mean}
    assert (written["exporter"], written["opset"]) == ("torch.onnx.export(dynamo=True)", 18)
    assert {"model.onnx", "tokenizer.json", "config.json", "generation_config.json"} <= set(r.files)


def test_lm_logits_equal_pytorch_at_every_real_token(lm_export, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lm_export
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    enc = tok(TEXTS[:5], padding=True, return_tensors="pt")
    (got,) = _session(out).run(None, {k: enc[k].numpy() for k in ("input_ids", "attention_mask")})
    with torch.inference_mode():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    assert got.shape == (*enc["input_ids"].shape, model.config.vocab_size)  # (B, T, V)
    real = enc["attention_mask"].bool()  # (B, T)
    torch.testing.assert_close(torch.from_numpy(got)[real], ref[real], atol=1e-4, rtol=0)
    assert (got.argmax(-1)[real.numpy()] == ref.argmax(-1)[real].numpy()).all()


# --------------------------------------------------------------------------------------------------------------
# the parity check itself, and bad input


def test_parity_function():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 3)).astype(np.float32)  # (B, C)
    same = parity(ref, ref.copy(), np.ones((4, 1)), "classifier", 1e-4)
    assert same == {"positions": 4, "max_abs_diff": 0.0, "atol": 1e-4, "argmax_agreement": 1.0, "passed": True}
    off = ref.copy()
    off[2, 1] += 3e-4
    bad = parity(ref, off, np.ones((4, 1)), "classifier", 1e-4)
    assert not bad["passed"] and bad["max_abs_diff"] == pytest.approx(3e-4, rel=1e-3)
    tie = np.array([[1.0, 1.0 - 5e-5, 0.0]], np.float32)  # a flip at a near-tie within tolerance passes
    flipped = np.array([[1.0 - 5e-5, 1.0, 0.0]], np.float32)
    t = parity(tie, flipped, np.ones((1, 1)), "classifier", 1e-4)
    assert t["passed"] and t["argmax_agreement"] == 0.0
    lm = rng.normal(size=(2, 3, 5)).astype(np.float32)  # (B, T, V)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    noisy = lm.copy()
    noisy[1, 2] += 100.0  # padding: not compared
    p = parity(lm, noisy, mask, "lm", 1e-4)
    assert p["passed"] and p["positions"] == 5 and p["max_abs_diff"] == 0.0


def test_bad_input_is_exit_2_and_writes_nothing(tmp_path, classifier):
    runner = CliRunner()
    before = sorted(tmp_path.iterdir())
    r = runner.invoke(cli, ["export", str(tmp_path)])
    assert r.exit_code == 2 and "has no config.json" in r.output
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    r = runner.invoke(cli, ["export", str(tmp_path)])
    assert r.exit_code == 2 and "BertModel" in r.output and "ForSequenceClassification" in r.output
    (tmp_path / "config.json").write_text("{not json")
    r = runner.invoke(cli, ["export", str(tmp_path)])
    assert r.exit_code == 2 and "not a JSON object" in r.output
    (tmp_path / "config.json").unlink()
    r = runner.invoke(cli, ["export", str(classifier), "--format", "tflite", "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown export format 'tflite'" in r.output and "onnx" in r.output
    r = runner.invoke(cli, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(ProtegeError, match="at least 2 sample texts"):
        export_student(classifier, output=tmp_path / "x", texts=["one"])
    assert not (tmp_path / "x").exists()


def test_missing_extra_is_an_install_hint(classifier, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'protege\[export\]'"):
        export_student(classifier, output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
