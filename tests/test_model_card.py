"""Every saved student carries a Hugging Face Hub model card (README.md): written at training without figures,
rewritten by `protege eval` with the report's; it parses with huggingface_hub and holds no secret."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from test_lm_e2e import write_recipe

from protege.cli import cli
from protege.students.model_card import model_card


def _invoke(*args: str) -> None:
    res = CliRunner().invoke(cli, [*args, "-q"])
    assert res.exit_code == 0, res.output


def _metrics(card: ModelCard) -> dict[str, float]:
    """The card's eval results (its model-index), by metric."""
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def test_a_classifier_students_card_before_and_after_eval(tiny_recipe, tiny_lm_dir, monkeypatch):
    secret = "sk-test-not-a-real-key-0123456789"
    monkeypatch.setenv("PROTEGE_TEST_KEY", secret)  # in the environment while protege runs: it must not leak
    out = tiny_recipe.parent / "out"
    _invoke("label", str(tiny_recipe))
    _invoke("train", str(tiny_recipe))

    # at training: the card says what the student is and how it was made, without figures
    path = out / "student" / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"protege", "knowledge-distillation"} <= set(card.data.tags)
    assert card.data.base_model is None  # init: scratch, from no pretrained weights
    assert card.data.eval_results is None and "Not evaluated yet" in card.text
    meta = json.loads((out / "student" / "protege.json").read_text())
    assert meta["alpha"] == 0.9 and meta["temperature"] == 2.0
    assert "**α = 0.9** and **τ = 2**" in card.text and "KL(p_teacher^τ ‖ q_student^τ)" in card.text
    assert f"`hf:{tiny_lm_dir.name}`" in card.text  # the teacher, named without the user's directories
    assert str(tiny_lm_dir.parent) not in card.text and str(out) not in card.text
    assert "- Signal: `label_logprobs`" in card.text  # the tiny LM teacher scores each label name
    assert f"`{meta['recipe_hash']}`" in card.text and f"`{meta['signals_hash']}`" in card.text
    hard = ModelCard.load(out / "student-hard" / "README.md")
    assert "**α = 0** and **τ = 2**" in hard.text and "hard-label baseline" in hard.text

    # after eval: the report's figures, as metadata and as the body's table
    _invoke("eval", str(tiny_recipe))
    report = json.loads((out / "report.json").read_text())
    for key in ("student", "student-hard"):
        card = ModelCard.load(out / key / "README.md")
        figures, m = _metrics(card), report["models"][key]
        assert figures["accuracy"] == m["accuracy"] and figures["quality_kept"] == m["quality_kept"]
        assert figures["agreement_with_teacher"] == m["agreement_with_teacher"]
        assert figures["latency_ms_p50"] == m["latency_ms_p50"] and figures["usd_per_1k_requests"] == m["usd_per_1k"]
        assert set(card.data.metrics) == set(figures)
        assert {r.dataset_split for r in card.data.eval_results} == {"eval"}
        assert f"| **{m['name']} (this model)** | {100 * m['accuracy']:.1f}% | {100 * m['quality_kept']:.1f}% |" \
            in card.text
        teacher = report["models"]["teacher"]
        assert f"| teacher: hf:{tiny_lm_dir.name} | {100 * teacher['accuracy']:.1f}% | 100.0% |" in card.text
        assert "15 held-out texts (15 with gold labels)" in card.text and "Not evaluated yet" not in card.text
        assert secret not in path.read_text() and "PROTEGE_TEST_KEY" not in path.read_text()
    # the file is what model_card builds from the directory and the report, nothing half-written beside it
    assert path.read_text() == str(model_card(out / "student", report))
    assert not [p.name for p in (out / "student").iterdir() if p.name.startswith(".README")]


def test_an_api_teachers_key_and_url_stay_out_of_the_card(tiny_recipe, openai_fake, monkeypatch):
    """An 'openai:' teacher's card names the model and provider, never the key variable's value or the URL."""
    secret = "sk-live-should-never-appear-42"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    openai_fake.key = secret
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["teacher"] = {"model": "openai:gpt-4o-mini", "base_url": "http://127.0.0.1:9/v1",
                         "api_key_env": "OPENAI_API_KEY"}
    tiny_recipe.write_text(yaml.safe_dump(recipe))
    _invoke("run", str(tiny_recipe))
    text = (tiny_recipe.parent / "out" / "student" / "README.md").read_text()
    assert "`openai:gpt-4o-mini`" in text and "- Signal: `label_logprobs`" in text
    assert secret not in text and "127.0.0.1" not in text and "OPENAI_API_KEY" not in text
    assert os.environ["OPENAI_API_KEY"] == secret  # (the key was there to leak)


def test_a_language_model_students_card(tmp_path, tiny_lm_dir):
    recipe = write_recipe(tmp_path, tiny_lm_dir, "topk")
    _invoke("run", str(recipe))
    out = tmp_path / "out"
    card = ModelCard.load(out / "student" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert {"protege", "knowledge-distillation"} <= set(card.data.tags)
    assert card.data.base_model is None  # layers cut from a teacher in a local directory: no hub id to name
    report = json.loads((out / "report.json").read_text())
    s = report["models"]["student"]
    figures = _metrics(card)
    assert figures["exact_match"] == s["task_metric"] == 0.0  # random tiny models never say "Paris"
    assert figures["top1_agreement"] == s["top1_agreement"] and figures["kl_to_teacher"] == s["kl_to_teacher"]
    assert figures["tokens_per_s"] == s["tokens_per_s"]
    assert "quality_kept" not in figures  # the teacher scores 0: no share of it to keep
    assert "Distill mode `topk`" in card.text and "**α = 0.5**, **τ = 1**" in card.text
    assert "with D = KL(p_teacher^τ ‖ q_student^τ)" in card.text
    assert f"from the teacher `hf:{tiny_lm_dir.name}`, from a copy of the teacher cut to 1 layer." in card.text
    assert f"| **distilled student (this model)** | 0.0% | n/a | {100 * s['top1_agreement']:.1f}% | " in card.text


@pytest.mark.parametrize(
    ("student", "init", "base"),
    [("all-minilm-l6-v2", "pretrained", "sentence-transformers/all-MiniLM-L6-v2"),
     ("org/some-encoder", "pretrained", "org/some-encoder"),
     ("org/some-encoder", "scratch", None)],
)
def test_base_model_is_a_hub_id_or_nothing(student, init, base):
    """base_model names the hub repository the weights started from; a packaged model by its hub id."""
    from protege.demo_data import LABELS
    from protege.recipe import build_recipe
    from protege.students.card import StudentCard
    from protege.students.model_card import _base_model

    r = build_recipe({"task": {"labels": LABELS}, "student": {"model": student, "init": init}})
    card = StudentCard.for_classifier(r, tuple(r.task.label_names), {"alpha": 0.9, "temperature": 2.0, "init": init})
    assert _base_model(r, card) == base


def test_a_local_teacher_is_named_by_its_folder_alone(tmp_path):
    """A teacher or student in a local folder is named by the folder's name: no path of the user's machine."""
    from protege.students.model_card import _teacher_name, _where_from

    (tmp_path / "my-encoder").mkdir()
    assert _teacher_name(f"embed:{tmp_path / 'my-encoder'}") == "embed:my-encoder"
    assert _teacher_name(f"hf:{tmp_path / 'my-encoder'}") == "hf:my-encoder"
    assert _teacher_name("openai:gpt-4o-mini") == "openai:gpt-4o-mini"
    assert _where_from(str(tmp_path / "my-encoder")) == "a local model (`my-encoder`)"
    assert _where_from("all-minilm-l6-v2") == "`sentence-transformers/all-MiniLM-L6-v2` (packaged as `all-minilm-l6-v2`)"
