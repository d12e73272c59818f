"""Generation recipes end to end through the CLI: label -> train (each distillation mode) -> eval, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from protege.cli import cli

QUESTIONS = [
    "What is the capital of France?", "Name a red fruit.", "What do cats say?", "How many legs has a spider?",
    "What colour is the sky?", "Which animal barks?", "What is two plus two?", "Where does the sun rise?",
]


def write_recipe(tmp_path: Path, teacher: Path, distill: str, **training) -> Path:
    rows = [{"id": f"q{i}", "text": f"{q} ({i})", "label": "Paris"} for i, q in enumerate(QUESTIONS * 3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "task": {"kind": "generation", "instruction": "Answer briefly.", "metric": "exact_match"},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": f"hf:{teacher}", "max_tokens": 8, "top_logprobs": 5, "batch_size": 8},
        "student": {"init": "teacher_layers", "keep_layers": [0], "max_length": 96},
        "training": {"distill": distill, "max_steps": 12, "batch_size": 6, "learning_rate": 3e-4,
                     "warmup_fraction": 0.0, "alpha": 0.5, "temperature": 1.0, **training},
        "eval": {"latency_samples": 2},
        "output_dir": "out",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny random LM with its output layer scaled up: a random model's next-token distributions are
    nearly uniform (any student is close to it); scaled, they are peaked, as a real teacher's are, so what a
    student learns from it shows in the figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    path = tmp_path_factory.mktemp("sharp-teacher")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(path)
    return path


def untrained(recipe_path: Path) -> dict:
    """The figures of the student before any training (the kept layer, straight from the teacher)."""
    from protege.evaluation.lm import lm_figures
    from protege.labeling.labeler import read_signals
    from protege.recipe import load_recipe
    from protege.students.lm import build_lm_student
    from protege.teachers import make_teacher

    r = load_recipe(recipe_path)
    teacher = make_teacher(r.teacher)
    teacher_model, teacher_tok = teacher.model_and_tokenizer()
    model, tok = build_lm_student(r)
    rows = read_signals(r, "eval")
    return lm_figures(model.eval(), tok, rows, r, teacher_model=teacher_model, teacher_tok=teacher_tok,
                      generate=False)


@pytest.mark.parametrize("distill", ["sequence", "logits", "topk"])
def test_generation_recipe_runs_end_to_end_in_each_mode(tmp_path, sharp_teacher, distill):
    recipe = write_recipe(tmp_path, sharp_teacher, distill)
    res = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    assert "top-1 agreement" in res.output and "KL" in res.output and "cascade: threshold" in res.output
    out = tmp_path / "out"
    meta = json.loads((out / "student/protege.json").read_text())
    assert meta["kind"] == "causal_lm" and meta["distill"] == distill and meta["steps"] == 12
    assert meta["layers"] == 1 if isinstance(meta.get("layers"), int) else True
    report = json.loads((out / "report.json").read_text())
    s, t = report["models"]["student"], report["models"]["teacher"]
    assert report["kind"] == "generation" and report["eval_examples"] == 6
    assert 0 <= s["top1_agreement"] <= 1 and s["kl_support"] == "full vocabulary" and s["kl_to_teacher"] >= 0
    assert s["perplexity_on_teacher"] > 1 and s["tokens_per_s"] > 0 and t["tokens_per_s"] > 0
    assert s["parameters"] < t["parameters"]  # one layer of two
    assert s["task_metric"] == 0.0 and t["task_metric"] == 0.0  # random models never say "Paris"
    # training brought the student closer to the teacher than the kept layer was: it picks the teacher's next
    # token more often and finds the teacher's text likelier (what every mode trains on); the modes that match
    # the teacher's distributions (logits, top-k) are also nearer in KL. Sequence mode fits the teacher's greedy
    # text only, which sharpens the student around it and need not lower the KL over the whole vocabulary
    # (measured on this tiny model: perplexity 14.4 -> 2.7, KL 0.401 -> 0.413).
    before = untrained(recipe)
    assert s["top1_agreement"] > before["top1_agreement"] + 0.1
    assert s["perplexity_on_teacher"] < before["perplexity_on_teacher"] / 2
    if distill != "sequence":
        assert s["kl_to_teacher"] < before["kl_to_teacher"]
    if distill == "topk":
        assert meta["topk"]["aligned_share"] == 1.0  # same tokenizer, the teacher's own ids
    # the ledger: labeling and training compute recorded
    with __import__("sqlite3").connect(out / "protege.db") as db:
        stages = {row[0] for row in db.execute("SELECT stage FROM compute")}
    assert {"label", "train:student", "eval"} <= stages

    # the cascade sweep over the student's held-out answers: its confidence is the one the server routes by
    c = report["cascade"]
    assert c["metric"] == "exact_match" and c["rows"] == 6 and c["confidence"] == "geometric mean token probability"
    assert c["student_usd_per_1k"] == s["usd_per_1k"] and c["teacher_usd_per_1k"] == t["usd_per_1k"]
    if distill == "sequence":
        from protege.labeling.labeler import read_signals
        from protege.recipe import load_recipe
        from protege.serve.lm import GenerationParams, LMGenerator

        gen = LMGenerator(out / "student")
        conf = [gen.generate(list(r["messages"]), GenerationParams(8, temperature=0)).confidence
                for r in read_signals(load_recipe(recipe), "eval")]
        for p in c["points"]:
            assert p["teacher_fraction"] == pytest.approx(sum(x < p["threshold"] for x in conf) / len(conf))
    assert (out / "plots" / "cascade.png").is_file() and report["plots"] == ["plots/cascade.png"]
    assert "## Cascade" in (out / "report.md").read_text()

    again = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert again.exit_code == 0 and "0 teacher calls" in again.output and "up to date, skipped" in again.output


def test_logits_mode_refuses_a_student_with_another_tokenizer(tmp_path, tiny_lm_dir):
    """Token-level KD from a teacher's logits needs the same vocabulary; another tokenizer is refused with the
    fix, before any training, and no student is written."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lm_fixtures import make_llama, make_tokenizer, save_model

    tok = make_tokenizer(380)
    other = save_model(tmp_path / "other", make_llama(tok), tok)
    recipe = write_recipe(tmp_path, tiny_lm_dir, "logits")
    spec = yaml.safe_load(recipe.read_text())
    spec["student"] = {"init": "pretrained", "model": str(other), "max_length": 96}  # keep_layers would be refused
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert res.exit_code == 2 and "tokenizer" in res.output.lower() and "sequence" in res.output
    assert not (tmp_path / "out/student").exists()
