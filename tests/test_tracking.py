"""Experiment tracking (training.report_to): both loops log every optimizer step to TensorBoard under
<output_dir>/runs/<student dir>, the figures equal train_log.jsonl's, a resumed run continues the numbering, and a
tracker whose package is missing is refused before any work with the install command. Tiny models; seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from lm_fixtures import (
    FIXTURES, kill_at_checkpoint, make_llama, make_recipe, make_rows, make_tokenizer, run_spec, save_model,
)
from test_train_levers import _recipe, _rows, _student_dir, crash_in_step

from protege.cli import cli
from protege.errors import ProtegeError, RecipeError
from protege.recipe import build_recipe
from protege.training import tracking
from protege.training.classifier import train_student
from protege.training.lm import train_lm

STEP_TAGS = {"loss", "kd_loss", "ce_loss", "lr", "epoch"}


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``logdir``: tag -> [(step, value)], earlier runs' purged points gone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores a scalar as float32


def _assert_matches_log(points: dict[str, list[tuple[int, float]]], log: list[dict], tags: set[str]) -> None:
    for tag in tags:
        assert points[tag] == [(r["step"], _f32(r[tag])) for r in log], tag


def _hparams(logdir: Path) -> dict:
    """The run's configuration as Accelerate's TensorBoard tracker stores it (hparams.yml in a subdirectory)."""
    (path,) = logdir.glob("*/hparams.yml")
    return yaml.safe_load(path.read_text())


# -- the classifier loop ----------------------------------------------------------------------------------------


def test_the_classifier_logs_every_step_and_each_selection_evaluation(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = _recipe(student, max_steps=6, eval_every=2, report_to="tensorboard")
    recipe.output_dir = tmp_path / "out"
    summary = train_student(recipe, _rows(40), tmp_path / "out" / "student", alpha=0.9, quiet=True)
    baseline = train_student(recipe, _rows(40), tmp_path / "out" / "student-hard", alpha=0.0, quiet=True)

    for name, s in [("student", summary), ("student-hard", baseline)]:
        points, log = _scalars(tmp_path / "out" / "runs" / name), _log(tmp_path / "out" / name)
        assert set(points) == STEP_TAGS | {"examples_per_s", "grad_norm", "select_kl", "select_agreement"}
        assert len(points["loss"]) == s["steps"] == len(log) == 6  # one point per optimizer step, steps 1..6
        _assert_matches_log(points, log, STEP_TAGS | {"examples_per_s", "grad_norm"})
        history = s["selection"]["history"]
        assert [h["step"] for h in history] == [2, 4, 6]
        assert points["select_kl"] == [(h["step"], _f32(h["kl"])) for h in history]
        assert points["select_agreement"] == [(h["step"], _f32(h["agreement"])) for h in history]
    # the two students' runs do not mix, and each records the alpha it trained with (the recipe says 0.9)
    runs = tmp_path / "out" / "runs"
    distilled, hard = _scalars(runs / "student"), _scalars(runs / "student-hard")
    assert hard["loss"] == hard["ce_loss"] and distilled["loss"] != distilled["ce_loss"]  # alpha 0: CE alone
    config = _hparams(runs / "student")
    assert config["training.alpha"] == 0.9 and _hparams(runs / "student-hard")["training.alpha"] == 0
    assert config["training.learning_rate"] == 0.3 and config["training.report_to"] == '["tensorboard"]'
    assert config["student.max_length"] == 32 and config["task.kind"] == "classification"


def test_a_resumed_run_continues_the_step_numbering(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = _recipe(student, max_steps=8, checkpoint_every=4, eval_every=2, report_to="tensorboard")
    recipe.output_dir = tmp_path
    rows = _rows(40)
    with crash_in_step(6):  # after the checkpoint of step 4, and step 5 was logged
        train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    before = _scalars(tmp_path / "runs" / "run")
    assert [s for s, _ in before["loss"]][:4] == [1, 2, 3, 4]  # flushed with the checkpoint; 5 too, or lost
    again = train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    assert again["resumed_from_step"] == 4

    points, log = _scalars(tmp_path / "runs" / "run"), _log(tmp_path / "run")
    assert [s for s, _ in points["loss"]] == list(range(1, 9))  # 1..4 from the first run, 5..8 from the resume, once
    _assert_matches_log(points, log, {"loss", "kd_loss", "ce_loss", "lr"})
    assert points["select_kl"] == [(h["step"], _f32(h["kl"])) for h in again["selection"]["history"]]

    # training the student again from the start replaces its curves: TensorBoard shows the saved student's
    recipe.training.max_steps = 3
    train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    points, log = _scalars(tmp_path / "runs" / "run"), _log(tmp_path / "run")
    assert [s for s, _ in points["loss"]] == [1, 2, 3]
    _assert_matches_log(points, log, {"loss", "lr"})


def test_no_tracker_by_default_writes_no_runs_directory(tmp_path, tiny_tokenizer):
    recipe = _recipe(_student_dir(tmp_path / "bert", tiny_tokenizer), max_steps=2)
    recipe.output_dir = tmp_path
    assert recipe.training.report_to == []
    train_student(recipe, _rows(20), tmp_path / "student", alpha=0.9, quiet=True)
    assert (tmp_path / "student" / "train_log.jsonl").is_file() and not (tmp_path / "runs").exists()


# -- the LM loop ------------------------------------------------------------------------------------------------


def test_the_lm_loop_logs_every_step_with_tokens_per_second(tmp_path):
    tok = make_tokenizer()
    teacher = save_model(tmp_path / "teacher", make_llama(tok, layers=2), tok)
    recipe = make_recipe(teacher, {"init": "teacher_layers", "keep_layers": [0]}, max_steps=3,
                         report_to=["tensorboard"])
    recipe.output_dir = tmp_path / "out"
    summary = train_lm(recipe, make_rows(8), tmp_path / "out" / "student", quiet=True)

    points, log = _scalars(tmp_path / "out" / "runs" / "student"), _log(tmp_path / "out" / "student")
    assert set(points) == STEP_TAGS | {"target_tokens", "tokens_per_s", "grad_norm"}
    assert len(points["loss"]) == summary["steps"] == 3
    _assert_matches_log(points, log, STEP_TAGS | {"target_tokens", "tokens_per_s", "grad_norm"})
    assert all(v > 0 for _, v in points["tokens_per_s"])
    assert _hparams(tmp_path / "out" / "runs" / "student")["training.distill"] == "sequence"


def test_a_killed_lm_run_keeps_its_points_up_to_the_checkpoint_and_resumes_the_numbering(tmp_path):
    tok = make_tokenizer()
    teacher = save_model(tmp_path / "teacher", make_llama(tok, layers=2), tok)
    spec = {"teacher": str(teacher), "student": {"init": "teacher_layers", "keep_layers": [0]}, "rows": 8,
            "training": {"max_steps": 8, "checkpoint_every": 2, "report_to": "tensorboard"},
            "out": str(tmp_path / "run"), "output_dir": str(tmp_path)}
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({**spec, "slow_s": 0.5}))
    saved_at = kill_at_checkpoint([sys.executable, str(FIXTURES), str(path)], tmp_path / "run.checkpoint")
    assert 2 <= saved_at < 8
    # kill -9 closes nothing: the points up to the checkpoint were written before it
    assert [s for s, _ in _scalars(tmp_path / "runs" / "run")["loss"]][:saved_at] == list(range(1, saved_at + 1))

    again = run_spec(spec, tmp_path, "again", [sys.executable])
    assert again.returncode == 0, again.stderr[-3000:]
    points, log = _scalars(tmp_path / "runs" / "run"), _log(tmp_path / "run")
    assert [s for s, _ in points["loss"]] == list(range(1, 9))
    _assert_matches_log(points, log, {"loss", "kd_loss", "ce_loss", "lr", "target_tokens"})


def test_under_two_processes_only_the_main_one_logs(tmp_path):
    tok = make_tokenizer()
    teacher = save_model(tmp_path / "teacher", make_llama(tok, layers=2), tok)
    spec = {"teacher": str(teacher), "student": {"init": "teacher_layers", "keep_layers": [0]}, "rows": 8,
            "training": {"max_steps": 3, "report_to": "tensorboard"}, "out": str(tmp_path / "two"),
            "output_dir": str(tmp_path)}
    two = run_spec(spec, tmp_path, "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "two").glob("events.out.tfevents.*"))) == 1
    points, log = _scalars(tmp_path / "runs" / "two"), _log(tmp_path / "two")
    assert len(points["loss"]) == 3
    _assert_matches_log(points, log, {"loss", "lr", "target_tokens"})


# -- refusals and the setting -----------------------------------------------------------------------------------


@pytest.fixture
def no_wandb(monkeypatch):
    """wandb is not installed, whatever this machine has."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, tiny_tokenizer, no_wandb):
    recipe = _recipe(_student_dir(tmp_path / "bert", tiny_tokenizer), max_steps=2, report_to=["tensorboard", "wandb"])
    recipe.output_dir = tmp_path
    with pytest.raises(ProtegeError, match=r"report_to 'wandb' needs the 'wandb' package.*pip install wandb") as e:
        train_student(recipe, _rows(20), tmp_path / "student", alpha=0.9, quiet=True)
    assert e.value.exit_code == 2
    assert not (tmp_path / "student").exists() and not (tmp_path / "runs").exists()


def test_the_cli_refuses_a_missing_tracker_before_labeling(tiny_recipe, no_wandb):
    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q", "--training.report_to", "wandb"])
    assert res.exit_code == 2, res.output
    assert "pip install wandb" in res.output and "Traceback" not in res.output
    assert not (tiny_recipe.parent / "out" / "protege.db").exists()  # no teacher call was made


def test_report_to_takes_one_name_a_list_or_none():
    def trackers(value):
        return build_recipe({"training": {"report_to": value}}).training.report_to

    assert trackers("tensorboard") == ["tensorboard"]
    assert trackers(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert trackers("none") == trackers(["none"]) == trackers(None) == trackers([]) == []
    with pytest.raises(RecipeError, match="training.report_to: 'none' turns tracking off"):
        trackers(["none", "wandb"])
    with pytest.raises(RecipeError, match=r"training.report_to.0: Input should be 'tensorboard', 'wandb' or 'trackio'"):
        trackers("mlflow")


def test_the_logged_configuration_is_flat_plain_and_holds_no_credentials():
    recipe = build_recipe({
        "task": {"labels": ["a", "b"]},
        "teacher": {"model": "openai:gpt-4o-mini", "base_url": "https://me:s3cret@llm.example:8443/v1"},
        "training": {"report_to": "tensorboard"},
    })
    config = tracking.run_config(recipe, **{"training.alpha": 0.0})
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in config.values())
    assert config["teacher.base_url"] == "https://llm.example:8443/v1" and "s3cret" not in json.dumps(config)
    assert config["training.alpha"] == 0.0 and config["training.temperature"] == 2.0
    assert json.loads(config["task.labels"])[1]["name"] == "b"
