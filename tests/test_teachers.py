"""Local teachers on tiny real models: the cached label scoring equals scoring each full sequence."""

from __future__ import annotations

import pytest
import torch

from protege.demo_data import LABELS, make_examples
from protege.errors import ProtegeError
from protege.labeling.prompts import render_request
from protege.recipe import TaskConfig, TeacherConfig
from protege.teachers import make_teacher
from protege.teachers.hf import HFCausalLMTeacher, HFClassifierTeacher

TASK = TaskConfig(instruction="Classify the customer support message by its intent.", labels=LABELS)


@torch.no_grad()
def _brute_force(teacher: HFCausalLMTeacher, req) -> torch.Tensor:
    """log P(label + end-of-turn | prompt) by running every full sequence on its own."""
    prompt = teacher._prompt_ids(req)
    out = []
    for ids in teacher._label_token_ids(req.labels):
        x = torch.tensor([prompt + ids])
        logp = torch.log_softmax(teacher.model_and_tokenizer()[0](x).logits.float()[0], -1)
        out.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ids)))
    return torch.stack(out)


def test_causal_teacher_matches_full_sequence_scoring(tiny_lm_dir):
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", batch_size=3, calibrate=False))
    assert isinstance(teacher, HFCausalLMTeacher)
    rows = make_examples(7, seed=5)  # 7 texts of different lengths -> left padding and a ragged last batch
    reqs = [render_request(TASK, r["text"]) for r in rows]
    sigs = teacher.signals(reqs)
    # the word-level tokenizer makes 'cancellation' one token; the end-of-turn token is always appended
    assert all(ids[-1] == teacher._tokenizer.eos_token_id for ids in teacher._label_token_ids(TASK.label_names))
    for req, sig in zip(reqs, sigs):
        lp = _brute_force(teacher, req)
        expect = torch.softmax(lp, -1)
        torch.testing.assert_close(torch.tensor(sig.distribution.probs, dtype=torch.float32), expect, atol=1e-5, rtol=1e-4)
        assert sig.distribution.covered_mass == pytest.approx(float(lp.exp().sum()), rel=1e-4)
        assert sig.distribution.method == "label_logprobs"


def test_multi_token_labels_are_summed(tiny_lm_dir):
    task = TaskConfig(labels=["late delivery", "refund request", "app crash"])  # two tokens each + end-of-turn
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", calibrate=False))
    req = render_request(task, "my parcel is late again")
    (sig,) = teacher.signals([req])
    assert [len(x) for x in teacher._label_token_ids(task.label_names)] == [3, 3, 3]
    torch.testing.assert_close(
        torch.tensor(sig.distribution.probs, dtype=torch.float32), torch.softmax(_brute_force(teacher, req), -1), atol=1e-5, rtol=1e-4
    )


def test_contextual_calibration_divides_by_content_free_distribution(tiny_lm_dir):
    rows = make_examples(4, seed=2)
    reqs = [render_request(TASK, r["text"]) for r in rows]
    raw = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", calibrate=False)).signals(reqs)
    cal_teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", calibrate=True))
    cal = cal_teacher.signals(reqs)
    prior = cal_teacher._content_free[TASK.label_names]
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    for r, c in zip(raw, cal):
        expect = torch.tensor(r.distribution.probs) / prior.double()
        expect = expect / expect.sum()
        assert c.distribution.calibrated and c.distribution.raw_probs == pytest.approx(r.distribution.probs, abs=1e-6)
        assert c.distribution.probs == pytest.approx(expect.tolist(), abs=1e-5)
    # calibration changes the cache key: a calibrated answer is a different answer
    assert cal_teacher.identity != make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}", calibrate=False)).identity


def test_classifier_teacher_uses_its_logits_in_task_label_order(tiny_classifier_dir):
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_classifier_dir}"))
    assert isinstance(teacher, HFClassifierTeacher)
    reversed_task = TaskConfig(labels=list(reversed(list(LABELS))))
    texts = [r["text"] for r in make_examples(3, seed=4)]
    fwd = teacher.signals([render_request(TASK, t) for t in texts])
    rev = teacher.signals([render_request(reversed_task, t) for t in texts])
    for a, b in zip(fwd, rev):
        assert a.distribution.method == "logits"
        assert a.distribution.probs == pytest.approx(tuple(reversed(b.distribution.probs)), abs=1e-6)
        assert a.distribution.probs == pytest.approx(torch.softmax(torch.tensor(a.logits[0]), -1).tolist(), abs=1e-6)


def test_classifier_teacher_refuses_other_labels(tiny_classifier_dir):
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_classifier_dir}"))
    with pytest.raises(ProtegeError, match="name task.labels as the classifier does"):
        teacher.signals([render_request(TaskConfig(labels=["spam", "ham"]), "hello")])


def test_local_teachers_declare_their_kind_and_hand_out_the_loaded_model(tiny_lm_dir, tiny_classifier_dir):
    lm = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}"))
    assert (lm.kind, lm.method) == ("local", "label_logprobs")
    model, tok = lm.model_and_tokenizer()  # loads the weights
    assert model.can_generate() and not model.training  # a causal LM, ready to time
    assert lm.num_parameters == sum(p.numel() for p in model.parameters()) > 0
    ids = tok("my parcel is late", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)
    clf = make_teacher(TeacherConfig(model=f"hf:{tiny_classifier_dir}"))
    assert (clf.kind, clf.method) == ("local", "logits")
    clf.load()
    assert clf.num_parameters == sum(p.numel() for p in clf.model_and_tokenizer()[0].parameters())


def test_identity_is_computed_without_loading_weights(tiny_lm_dir):
    teacher = make_teacher(TeacherConfig(model=f"hf:{tiny_lm_dir}"))
    assert teacher._model is None and "model.safetensors" in teacher.identity["weights"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ProtegeError, match="not a directory or .gguf file"):
        make_teacher(TeacherConfig(model=f"hf:{tmp_path}/nope"))


def test_a_rerun_answered_from_the_store_never_imports_transformers(tiny_classifier_dir, tmp_path):
    # the teacher's cache key needs its architecture, read from config.json; the weights load on the first call
    import json
    import subprocess
    import sys

    import yaml

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(12, seed=2)))
    recipe = {"task": {"instruction": "Classify the message.", "labels": list(LABELS)},
              "data": {"path": "data.jsonl", "eval_fraction": 0.25},
              "teacher": {"model": f"hf:{tiny_classifier_dir}"}, "output_dir": "out"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    script = (
        "import sys\n"
        "from protege.labeling.labeler import label\n"
        "from protege.recipe import load_recipe\n"
        f"stats = label(load_recipe({str(tmp_path / 'recipe.yaml')!r}), quiet=True)\n"
        "print(stats.called, stats.cached, 'transformers' in sys.modules)\n"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           check=False)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert [r.stdout.split() for r in runs] == [["12", "0", "True"], ["0", "12", "False"]]
