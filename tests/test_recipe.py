"""The recipe: defaults, YAML errors that name file/line/field, label shorthands, overrides, path resolution,
a save/load round trip, and settings the chosen task would ignore refused at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from protege.errors import RecipeError
from protege.recipe import Recipe, build_recipe, load_recipe


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate(tmp_path, monkeypatch):
    r = Recipe()
    assert r.teacher.model == "hf:smollm2-135m-instruct"
    assert r.task.label_names == ("negative", "positive")
    assert r.training.alpha == 0.9 and r.training.temperature == 2.0
    assert build_recipe(r.model_dump()).model_dump() == r.model_dump()

    monkeypatch.chdir(tmp_path)
    loaded = load_recipe()
    assert loaded.output_dir == tmp_path / "runs" / "protege"
    assert loaded.output_dir.is_absolute()
    assert loaded.data.path == tmp_path / "data.jsonl"
    assert loaded.store_path == tmp_path / "runs" / "protege" / "protege.db"


def test_out_of_range_value_names_file_line_field_and_value(tmp_path):
    path = _write(tmp_path, "task:\n  instruction: Classify.\ntraining:\n  epochs: 2\n  alpha: 1.5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"{path}:5" in msg
    assert "recipe.yaml" in msg
    assert "training.alpha" in msg
    assert "1.5" in msg


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, "trainig:\n  alpha: 0.5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "trainig" in msg and "unknown setting" in msg
    assert f"{path}:1" in msg


def test_unknown_nested_key_is_named(tmp_path):
    path = _write(tmp_path, "training:\n  alpah: 0.5\n")
    with pytest.raises(RecipeError, match=r"training\.alpah: unknown setting"):
        load_recipe(path)


def test_duplicate_labels_rejected_ignoring_case(tmp_path):
    path = _write(tmp_path, "task:\n  labels: [Billing, shipping, billing]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "duplicate label" in str(e.value)
    assert "task.labels" in str(e.value)
    with pytest.raises(RecipeError, match="duplicate label"):
        build_recipe({"task": {"labels": ["a", " A "]}})


def test_single_label_rejected():
    with pytest.raises(RecipeError, match="at least two labels"):
        build_recipe({"task": {"labels": ["only"]}})


def test_label_shorthands_agree(tmp_path):
    names = ("billing", "shipping", "other")
    forms = {
        "list": "task:\n  labels: [billing, shipping, other]\n",
        "dicts": "task:\n  labels:\n"
        + "".join(f"    - name: {n}\n      description: about {n}\n" for n in names),
        "map": "task:\n  labels:\n    billing: about billing\n    shipping: about shipping\n    other:\n",
    }
    results = {}
    for key, text in forms.items():
        r = load_recipe(_write(tmp_path, text, f"{key}.yaml"))
        results[key] = r
        assert r.task.label_names == names, key
    assert [lab.description for lab in results["dicts"].task.labels] == [f"about {n}" for n in names]
    assert [lab.description for lab in results["map"].task.labels] == ["about billing", "about shipping", ""]
    assert all(lab.description == "" for lab in results["list"].task.labels)


def test_overrides_win_and_paths_resolve_against_recipe_dir(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "project"
    recipe_dir.mkdir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    path = _write(
        recipe_dir,
        "data:\n  path: texts/train.jsonl\n  eval_path: texts/eval.jsonl\ntraining:\n  alpha: 0.8\n  epochs: 3\n"
        "output_dir: out\n",
    )
    monkeypatch.chdir(other)
    r = load_recipe(path, {"training.alpha": 0.3, "teacher.batch_size": 2})
    assert r.training.alpha == 0.3
    assert r.training.epochs == 3  # untouched settings keep the file's value
    assert r.teacher.batch_size == 2
    assert r.data.path == recipe_dir.resolve() / "texts" / "train.jsonl"
    assert r.data.eval_path == recipe_dir.resolve() / "texts" / "eval.jsonl"
    assert r.output_dir == recipe_dir.resolve() / "out"
    # an invalid override is reported like a file value
    with pytest.raises(RecipeError, match=r"training\.alpha"):
        load_recipe(path, {"training.alpha": -1})
    # a path given as an override (a command-line flag) is relative to where the caller is, not to the file
    r = load_recipe(path, {"output_dir": "runs/try2", "data.eval_path": "held.jsonl"})
    assert r.output_dir == other / "runs" / "try2" and r.data.eval_path == other / "held.jsonl"
    assert r.data.path == recipe_dir.resolve() / "texts" / "train.jsonl"  # the file's own: still the file's
    assert load_recipe(path, {"output_dir": str(tmp_path / "abs")}).output_dir == tmp_path / "abs"
    assert str(load_recipe(path, {"data.path": "hf:owner/name"}).data.path) == "hf:owner/name"  # a Hub id, no path


def test_absolute_data_path_kept(tmp_path):
    target = tmp_path / "abs" / "d.csv"
    path = _write(tmp_path, f"data:\n  path: {target}\n")
    assert load_recipe(path).data.path == target


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    path = _write(tmp_path, "output_dir: out\n")
    with pytest.raises(RecipeError, match="is a file"):
        load_recipe(path)


def test_teacher_without_known_prefix_is_rejected(tmp_path):
    path = _write(tmp_path, "teacher:\n  model: gpt4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "teacher.model" in msg and "gpt4" in msg and "'hf:'" in msg
    with pytest.raises(RecipeError, match="no known prefix"):
        build_recipe({"teacher": {"model": "mistral:large"}})
    for model in ("hf:some/model", "openai:gpt-4o", "anthropic:claude-haiku-4-5"):
        assert build_recipe({"teacher": {"model": model}}).teacher.model == model


def test_scratch_student_heads_must_divide_hidden():
    with pytest.raises(RecipeError, match="not divisible"):
        build_recipe({"student": {"init": "scratch", "hidden_size": 30, "num_heads": 4}})
    ok = build_recipe({"student": {"init": "scratch", "hidden_size": 32, "num_heads": 4}})
    assert ok.student.hidden_size == 32
    # a pretrained student has its model's sizes: the scratch-only ones would be ignored, so they are refused
    with pytest.raises(RecipeError, match=r"student\.hidden_size shapes a student\.init: scratch encoder"):
        build_recipe({"student": {"init": "pretrained", "hidden_size": 30, "num_heads": 4}})


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "training:\n  alpha: 0.5\n  epochs: 2: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"{path}:3: not valid YAML" in str(e.value)
    # an unclosed bracket is reported at some line after it opens
    path = _write(tmp_path, "training:\n  alpha: 0.5\n  epochs: [1, 2\n", "unclosed.yaml")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "not valid YAML" in msg
    line = msg.split(f"{path}:", 1)[1].split(":", 1)[0]
    assert line.isdigit() and int(line) >= 3


def test_top_level_list_rejected(tmp_path):
    path = _write(tmp_path, "- task\n- data\n")
    with pytest.raises(RecipeError, match="YAML mapping") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_empty_file_gives_defaults_and_missing_file_is_an_error(tmp_path):
    r = load_recipe(_write(tmp_path, ""))
    assert r.training.alpha == 0.9 and r.output_dir == tmp_path.resolve() / "runs" / "protege"
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_save_load_round_trip_and_section_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(
        None,
        {"task.labels": {"billing": "money", "shipping": "parcels"}, "training.alpha": 0.4, "data.limit": 10},
    )
    path = tmp_path / "saved" / "recipe.yaml"
    r.save(path)
    back = load_recipe(path)
    assert back.model_dump() == r.model_dump()
    assert back.section_hash("task", "training") == r.section_hash("task", "training")
    h = r.section_hash("training")
    assert h == r.section_hash("training") and len(h) == 16

    changed = build_recipe({**r.model_dump(), "training": {**r.model_dump()["training"], "epochs": 7}})
    assert changed.section_hash("training") != h
    assert changed.section_hash("task", "data") == r.section_hash("task", "data")  # other sections unaffected


# -- every setting works or is refused -------------------------------------------------------------------------

GEN = {"task": {"kind": "generation"}, "teacher": {"model": "hf:some/lm"}}  # the student: the teacher's layers
GEN_API = {"task": {"kind": "generation"}, "teacher": {"model": "openai:gpt-4o-mini"}, "student": {"model": "gpt2"}}


def _with(base: dict, **sections: dict) -> dict:
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}


UNUSED = [
    # classification: the language-model settings
    ({"training": {"loss_chunk_size": 256}}, "training.loss_chunk_size", "set task.kind: generation"),
    ({"training": {"divergence": "jsd"}}, "training.divergence", "set task.kind: generation"),
    ({"training": {"jsd_beta": 0.3}}, "training.jsd_beta", "set task.kind: generation"),
    ({"training": {"distill": "logits"}}, "training.distill", "set task.kind: generation"),
    ({"training": {"rationale_weight": 0.5}}, "training.rationale_weight", "set task.kind: generation"),
    ({"student": {"lora_r": 8}}, "student.lora_r", "set task.kind: generation"),
    ({"student": {"lora_dropout": 0.2}}, "student.lora_dropout", "set task.kind: generation"),
    ({"student": {"keep_layers": [0, 2]}}, "student.keep_layers", "set student.init: teacher_layers"),
    ({"student": {"layer_stride": 2}}, "student.layer_stride", "set student.init: teacher_layers"),
    ({"student": {"num_layers": 4}}, "student.num_layers", "set student.init: scratch"),
    # generation: the classification settings
    (_with(GEN, task={"labels": ["yes", "no", "maybe"]}), "task.labels", "task.metric"),
    (_with(GEN, training={"use_gold": False}), "training.use_gold", "remove it"),
    (_with(GEN, training={"select_fraction": 0.1}), "training.select_fraction", "remove it"),
    (_with(GEN, teacher={"score_temperature": 0.1}), "teacher.score_temperature", "remove it"),
    (_with(GEN, training={"hard_label_baseline": False}), "training.hard_label_baseline", "remove it"),
    (_with(GEN, teacher={"calibrate": False}), "teacher.calibrate", "remove it"),
    (_with(GEN_API, teacher={"rationale": True}), "teacher.rationale", "set task.answer_format: rationale"),
    (_with(GEN_API, teacher={"label_method": "samples"}), "teacher.label_method", "remove it"),
    (_with(GEN_API, teacher={"n_samples": 4}), "teacher.n_samples", "remove it"),
    (_with(GEN_API, teacher={"sample_temperature": 0.7}), "teacher.sample_temperature", "remove it"),
    (_with(GEN_API, student={"init": "scratch"}), "student.init: scratch", "set student.model to a causal LM"),
    (_with(GEN_API, student={"hidden_size": 64}), "student.hidden_size", "set student.init: scratch"),
    # generation: a setting of a mode that is not chosen
    (_with(GEN, training={"divergence": "reverse_kl"}), "training.divergence", "set training.distill: logits"),
    (_with(GEN, training={"distill": "topk", "divergence": "jsd"}), "training.divergence", "training.distill: logits"),
    (_with(GEN, training={"distill": "logits", "jsd_beta": 0.2}), "training.jsd_beta", "set training.divergence: jsd"),
    (_with(GEN, student={"lora_alpha": 32}), "student.lora_alpha", "set student.lora_r"),
    (_with(GEN_API, student={"keep_layers": [0, 3]}), "student.keep_layers", "set student.init: teacher_layers"),
]


@pytest.mark.parametrize(("sections", "setting", "fix"), UNUSED, ids=[f"{c[1]}-{i}" for i, c in enumerate(UNUSED)])
def test_a_setting_the_task_would_ignore_is_refused_with_the_reason_and_the_fix(sections, setting, fix):
    kind = sections.get("task", {}).get("kind", "classification")
    with pytest.raises(RecipeError) as e:
        build_recipe(sections)
    msg = str(e.value)
    assert f"in a {kind} task these settings would be ignored" in msg
    line = next(x for x in msg.splitlines() if x.strip().startswith(setting + " "))
    assert "Fix: " in line and fix in line.split("Fix: ", 1)[1]
    assert line.split("Fix: ", 1)[0].strip() != setting  # it says what the setting is for


def test_every_ignored_setting_is_named_at_once_with_its_yaml_line(tmp_path):
    path = _write(tmp_path, "training:\n  epochs: 2\n  divergence: jsd\n  loss_chunk_size: 64\nstudent:\n  lora_r: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg
    assert all(f"\n    {name} " in msg for name in ("training.divergence", "training.loss_chunk_size", "student.lora_r"))
    assert "training.epochs" not in msg


def test_the_same_settings_are_accepted_where_they_apply():
    gen = build_recipe(_with(GEN, training={"distill": "logits", "divergence": "jsd", "jsd_beta": 0.3,
                                            "loss_chunk_size": 256, "max_steps": 10, "gradient_accumulation_steps": 2,
                                            "checkpoint_every": 5},
                             student={"keep_layers": [0, 2], "lora_r": 4, "lora_alpha": 8}))
    assert gen.training.jsd_beta == 0.3 and gen.student.init == "teacher_layers" and gen.student.lora_alpha == 8
    api = build_recipe(_with(GEN_API, teacher={"max_tokens": 64, "top_logprobs": 5}, training={"distill": "topk"}))
    assert api.teacher.top_logprobs == 5
    clf = build_recipe({"training": {"use_gold": False, "hard_label_baseline": False, "max_steps": 10,
                                     "gradient_accumulation_steps": 2, "checkpoint_every": 5},
                        "teacher": {"calibrate": False},
                        "student": {"init": "scratch", "hidden_size": 64, "num_layers": 4, "num_heads": 4}})
    assert clf.training.gradient_accumulation_steps == 2 and clf.student.num_layers == 4
    rationale = build_recipe({"teacher": {"model": "openai:gpt-4o-mini", "rationale": True, "label_method": "samples",
                                          "n_samples": 4}})
    assert rationale.teacher.n_samples == 4


def test_defaults_written_out_are_never_refused(tmp_path, monkeypatch):
    """A saved recipe (beside every artifact) writes every setting, defaults included; it loads again, for
    either task kind. A default written by hand is accepted too: it changes nothing."""
    monkeypatch.chdir(tmp_path)
    for sections in ({}, GEN, GEN_API):
        r = build_recipe(sections)
        path = tmp_path / "saved.yaml"
        r.save(path)
        sections_of = ("task", "teacher", "student", "training")
        assert load_recipe(path).section_hash(*sections_of) == r.section_hash(*sections_of)
        assert build_recipe(r.model_dump()).model_dump() == r.model_dump()
    assert build_recipe({"training": {"loss_chunk_size": 1024, "divergence": "forward_kl"}}).training.jsd_beta == 0.5


# -- the teacher-side levers of issue 12: settings that are refused with the reason ------------------------------

@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"teacher": {"model": "ensemble:mean"}}, "at least two teacher.members"),
        ({"teacher": {"model": "ensemble:median", "members": [{"model": "hf:a"}, {"model": "hf:b"}]}},
         "'ensemble:mean' or 'ensemble:accuracy'"),
        ({"teacher": {"model": "ensemble:mean", "members": [{"model": "hf:a"}, {"model": "ensemble:mean"}]}},
         "cannot themselves be ensembles"),
        ({"teacher": {"model": "hf:a", "members": [{"model": "hf:a"}, {"model": "hf:b"}]}}, "is not one"),
        ({"task": {"labels": ["a", "b"], "examples": [{"text": "x", "label": "c"}]}}, "is not one of task.labels"),
        ({"training": {"sweep_alpha": [0.5, 1.0]}}, "set training.select_fraction"),
        ({"training": {"patience": 2}}, "set training.select_fraction"),
        ({"training": {"select_fraction": 0.1, "sweep_alpha": [1.5]}}, "every alpha is in [0, 1]"),
        (_with(GEN, data={"augment": {"per_text": 2}}), "data.augment makes new texts"),
        (_with(GEN, teacher={"model": "embed:all-minilm-l6-v2"}), "cannot write answers"),
        ({"student": {"init": "teacher_layers"}, "teacher": {"model": "embed:all-minilm-l6-v2"}}, "no layers to copy"),
    ],
)
def test_a_lever_set_where_it_cannot_work_is_refused_with_the_fix(sections, needle):
    with pytest.raises(RecipeError) as e:
        build_recipe(sections)
    assert needle in str(e.value)


def test_an_ensemble_recipe_keeps_each_member_as_a_teacher_section_of_its_own():
    r = build_recipe({"teacher": {"model": "ensemble:accuracy", "members": [
        {"model": "embed:all-minilm-l6-v2", "score_temperature": 0.1}, {"model": "hf:smollm2-135m-instruct"}]}})
    assert r.teacher.kind == "ensemble"
    assert [m.kind for m in r.teacher.members] == ["local", "local"]
    assert r.teacher.members[0].score_temperature == 0.1
    assert build_recipe(r.model_dump(mode="json")) == r  # the saved recipe reads back the same
