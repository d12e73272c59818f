"""Issue 12's training levers for classifier students, on tiny models: model selection on a held-out slice of the
teacher-labelled rows (the slice and its augmented texts are never trained on; the saved weights are those of the
best evaluation; patience stops early; a killed run resumes to the same choice), the alpha/tau sweep through
``pipeline.train``, and students cut from an 'hf:' encoder teacher (teacher_layers)."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import sql, write_jsonl

from protege.demo_data import LABELS, make_examples
from protege.errors import ProtegeError, RecipeError
from protege.recipe import build_recipe
from protege.training.classifier import TrainRow, train_student
from protege.training.select import Selection, improves, selection_split, slice_scores

NAMES = list(LABELS)


def _student_dir(path: Path, tokenizer: Any, layers: int = 2, dropout: float = 0.0, names: list[str] = NAMES) -> Path:
    """A small BERT sequence classifier over ``names``, saved with its tokenizer (a student, or a teacher)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(n: int, augmented: int = 0) -> list[TrainRow]:
    """``n`` demo texts whose teacher puts 0.92 on the gold label, ids r0..; then ``augmented`` texts made from
    each (ids rI~augJ, augmented_from rI)."""
    rows: list[TrainRow] = []
    texts = dict.fromkeys(ex["text"] for ex in make_examples(3 * n, seed=5))  # distinct texts, in order
    gold = {ex["text"]: ex["label"] for ex in make_examples(3 * n, seed=5)}
    for i, text in enumerate(list(texts)[:n]):
        p = [0.02] * len(NAMES)
        p[NAMES.index(gold[text])] = 1 - 0.02 * (len(NAMES) - 1)
        rows.append(TrainRow(text, tuple(p), NAMES.index(gold[text]), id=f"r{i}"))
    for row in list(rows):
        for j in range(augmented):
            rows.append(TrainRow("please " * (j + 1) + row.text, row.teacher_probs, row.target,
                                 id=f"{row.id}~aug{j}", augmented_from=row.id))
    return rows


def _recipe(student: Path, **training: Any) -> Any:
    train = {"epochs": 1, "batch_size": 8, "learning_rate": 0.3, "warmup_fraction": 0.0, "weight_decay": 0.0,
             "seed": 0, "select_fraction": 0.25, "eval_every": 1}
    return build_recipe(
        {"task": {"labels": NAMES}, "student": {"model": str(student), "max_length": 32}, "training": train | training}
    )


@contextlib.contextmanager
def crash_in_step(n: int) -> Iterator[None]:
    """The block must fail with RuntimeError('killed'), raised as AdamW's n-th step starts (a crash mid-run)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = 0

    def crash(opt, args, kwargs):
        nonlocal steps
        if type(opt) is torch.optim.AdamW:
            steps += 1
            if steps == n:
                raise RuntimeError("killed")

    handle = register_optimizer_step_pre_hook(crash)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield
    finally:
        handle.remove()


def _slice_kl_agreement(student_dir: Path, rows: list[TrainRow]) -> tuple[float, float]:
    """The saved student's mean KL(teacher || student) and top-label agreement on ``rows``, evaluated afresh."""
    from protege.students.classifier import load_student

    model, tok, _ = load_student(student_dir)
    enc = tok([r.text for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # (N, C)
    kl, agree = slice_scores(logits, torch.tensor([r.teacher_probs for r in rows]))
    return kl.item() / len(rows), agree.item() / len(rows)


# -- the slice --------------------------------------------------------------------------------------------------


def test_the_slice_is_original_rows_by_seed_and_id_and_takes_their_augmented_texts_out_of_training():
    rows = _rows(40, augmented=2)
    ids, sources = [r.id for r in rows], [r.augmented_from for r in rows]
    train, held = selection_split(ids, sources, 0.25, seed=0)
    held_ids = {ids[i] for i in held}
    assert len(held) == 10 and all(sources[i] is None for i in held)  # a quarter of the 40 originals
    assert set(train) | set(held) < set(range(len(rows)))  # the held rows' 20 augmented texts are in neither
    assert not set(train) & set(held)
    for i, (row_id, src) in enumerate(zip(ids, sources)):
        in_train = i in train
        assert in_train == ((src or row_id) not in held_ids), row_id  # augmented texts go with their source
    assert len(train) == 30 * 3

    # by id and seed, not by position: the same ids whatever the order, another slice for another seed
    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    _, held2 = selection_split([ids[i] for i in order], [sources[i] for i in order], 0.25, seed=0)
    assert {ids[order[i]] for i in held2} == held_ids
    _, held3 = selection_split(ids, sources, 0.25, seed=1)
    assert {ids[i] for i in held3} != held_ids


def test_a_slice_that_leaves_nothing_to_train_or_rows_that_share_an_id_are_refused():
    with pytest.raises(ProtegeError, match="select_fraction 0.1 of 1 original training rows leaves none"):
        selection_split(["a", "a~x"], [None, "a"], 0.1, seed=0)
    with pytest.raises(ProtegeError, match="two training rows share one.*data.id_column"):
        selection_split(["a", "a", "b"], [None, None, None], 0.3, seed=0)


def test_slice_scores_are_the_kl_from_the_teacher_and_top_label_agreement():
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [0.1, 0.1, 0.8]])
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5]])
    kl, agree = slice_scores(logits, teacher)
    want = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="sum")
    torch.testing.assert_close(kl, want)
    # rows 0 and 1 agree (argmax 0, and 1: the first of the teacher's tied 0.5s); row 2 does not
    assert agree.item() == 2
    same, agree = slice_scores(teacher.clamp_min(1e-12).log(), teacher)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and agree.item() == 3


def test_improves_lower_kl_or_higher_agreement_with_kl_breaking_ties():
    assert improves("kl", 0.5, 0.1, None, None)
    assert improves("kl", 0.4, 0.1, 0.5, 0.9) and not improves("kl", 0.5, 1.0, 0.5, 0.1)
    assert improves("agreement", 0.9, 0.6, 0.1, 0.5) and not improves("agreement", 0.1, 0.5, 0.2, 0.6)
    assert improves("agreement", 0.3, 0.5, 0.4, 0.5) and not improves("agreement", 0.4, 0.5, 0.4, 0.5)


def test_selection_counts_evaluations_since_the_best_and_keeps_its_weights():
    net = torch.nn.Linear(2, 2)
    sel = Selection("kl", patience=2)
    for step, kl in [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.7)]:
        with torch.no_grad():
            net.weight.fill_(step)
        sel.record(step, kl, 0.5, net)
    assert sel.best_step == 2 and sel.should_stop and torch.equal(sel.best_weights["weight"], torch.full((2, 2), 2.0))
    copy = Selection("kl", patience=2)
    copy.load_state_dict(sel.state_dict())
    assert copy.summary(4, 4, True) == sel.summary(4, 4, True)
    assert copy.summary(4, 4, True)["history"][1] == {"step": 2, "kl": 0.5, "agreement": 0.5}


# -- training with selection ------------------------------------------------------------------------------------


def test_the_slice_and_its_augmented_texts_are_never_trained_on(tmp_path, tiny_tokenizer):
    from torch.nn.modules.module import register_module_forward_pre_hook

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    rows = _rows(24, augmented=1)
    _, held = selection_split([r.id for r in rows], [r.augmented_from for r in rows], 0.25, seed=0)
    held_ids = {rows[i].id for i in held}
    never = {r.text for r in rows if (r.augmented_from or r.id) in held_ids}
    trained = {r.text for r in rows} - never
    as_ids = {tuple(tiny_tokenizer(t, truncation=True, max_length=32)["input_ids"]): t for t in trained | never}
    assert len(as_ids) == len(rows)  # every text tokenizes to its own ids
    seen: set[str] = set()
    scored: set[str] = set()

    def watch(module, args):  # the token rows each word-embedding lookup gets, in training or in evaluation
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == len(tiny_tokenizer):
            for row in args[0].tolist():
                text = as_ids[tuple(t for t in row if t != tiny_tokenizer.pad_token_id)]
                (seen if module.training else scored).add(text)

    handle = register_module_forward_pre_hook(watch)
    try:
        summary = train_student(_recipe(student, epochs=2, eval_every=3), rows, tmp_path / "out", alpha=0.9, quiet=True)
    finally:
        handle.remove()
    assert len(held) == 6 and len(never) == 12
    assert seen == trained  # every training row, and not one held-out or augmented-from-held-out text
    assert scored == {rows[i].text for i in held}  # the evaluations saw the slice's original rows only
    assert summary["examples"] == len(trained) and summary["selection"]["rows"] == 6

    # select_rows all: the same training rows, and the slice scores the held-out rows' augmented texts too
    seen.clear()
    scored.clear()
    handle = register_module_forward_pre_hook(watch)
    try:
        summary = train_student(_recipe(student, epochs=2, eval_every=3, select_rows="all"), rows,
                                tmp_path / "out-all", alpha=0.9, quiet=True)
    finally:
        handle.remove()
    assert seen == trained and scored == never
    assert summary["examples"] == len(trained) and summary["selection"]["rows"] == 12
    assert selection_split([r.id for r in rows], [r.augmented_from for r in rows], 0.25, 0, with_copies=True) == (
        selection_split([r.id for r in rows], [r.augmented_from for r in rows], 0.25, 0)[0],
        [i for i, r in enumerate(rows) if (r.augmented_from or r.id) in held_ids])
    with pytest.raises(RecipeError, match="training.select_rows compares students on a held-out slice"):
        _recipe(student, select_fraction=0.0, select_rows="all")


def test_the_saved_student_is_the_best_evaluation_not_the_last(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    rows = _rows(60)
    # a learning rate this high, unclipped, makes the slice KL go up and down; the best evaluation is not the last
    summary = train_student(_recipe(student, max_steps=12, max_grad_norm=None), rows, tmp_path / "out", alpha=0.9,
                            quiet=True)
    sel = summary["selection"]
    assert set(sel) == {"metric", "rows", "best_step", "steps_trained", "stopped_early", "history"}
    assert sel["metric"] == "kl" and sel["rows"] == 15 and sel["steps_trained"] == 12 and not sel["stopped_early"]
    history = sel["history"]
    assert [h["step"] for h in history] == list(range(1, 13))  # eval_every 1
    best = min(history, key=lambda h: h["kl"])
    assert sel["best_step"] == best["step"] < 12 and history[-1]["kl"] > best["kl"] * 1.05
    # the weights saved are those of the best step: evaluated afresh on the slice they give its KL, not the last's
    _, held = selection_split([r.id for r in rows], [None] * len(rows), 0.25, seed=0)
    kl, agreement = _slice_kl_agreement(tmp_path / "out", [rows[i] for i in held])
    assert kl == pytest.approx(best["kl"], rel=1e-4) and agreement == pytest.approx(best["agreement"])
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["select_kl"] for r in log] == [h["kl"] for h in history]
    card = json.loads((tmp_path / "out" / "protege.json").read_text())
    assert card["selection"] == sel and card["init"] == "pretrained" and card["kept_layers"] is None


def test_agreement_selection_picks_the_most_agreeing_step_with_kl_breaking_ties(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    summary = train_student(_recipe(student, max_steps=12, select_metric="agreement"), _rows(60),
                            tmp_path / "out", alpha=0.9, quiet=True)
    history = summary["selection"]["history"]
    top = max(h["agreement"] for h in history)
    want = min((h for h in history if h["agreement"] == top), key=lambda h: (h["kl"], h["step"]))
    assert summary["selection"]["metric"] == "agreement" and summary["selection"]["best_step"] == want["step"]


def test_patience_stops_when_evaluations_stop_improving(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    summary = train_student(_recipe(student, max_steps=40, patience=2), _rows(60), tmp_path / "out", alpha=0.9,
                            quiet=True)
    sel = summary["selection"]
    assert sel["stopped_early"] and sel["steps_trained"] < 40 and summary["steps"] == sel["steps_trained"]
    kls = [h["kl"] for h in sel["history"]]
    assert len(kls) == sel["steps_trained"]
    # it stopped at the second evaluation in a row above the best, and not before
    assert sel["best_step"] == sel["steps_trained"] - 2 and min(kls) == kls[-3] < min(kls[-2:])
    since, best = 0, float("inf")
    for j, kl in enumerate(kls):  # no earlier run of two evaluations without improvement
        since, best = (0, kl) if kl < best else (since + 1, best)
        assert (since == 2) == (j == len(kls) - 1)
    lines = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == sel["steps_trained"]


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_selection(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    # dropout draws random numbers every step: the evaluations must not disturb them, and the resume restores them
    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.1)
    recipe = _recipe(student, max_steps=8, checkpoint_every=4, eval_every=2)
    rows = _rows(40)
    ref = train_student(recipe, rows, tmp_path / "ref", alpha=0.9, quiet=True)
    with crash_in_step(6):  # after the checkpoint of step 4
        train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    assert (tmp_path / "run.checkpoint").is_dir() and not (tmp_path / "run").exists()
    again = train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    assert again["resumed_from_step"] == 4 and ref["resumed_from_step"] == 0
    assert again["selection"] == ref["selection"]  # the evaluations before the kill came back from the checkpoint
    resumed, uninterrupted = (load_file(tmp_path / d / "model.safetensors") for d in ("run", "ref"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)


# -- weight averaging (training.ema_decay) -----------------------------------------------------------------------


def test_the_saved_student_is_the_moving_average_of_the_steps_weights(tmp_path, tiny_tokenizer):
    """Without a slice, the saved weights are the EMA of every step's weights (the first step's weights, then
    decay * average + (1 - decay) * weights); the steps themselves are those of a run without averaging."""
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_post_hook

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    rows, decay = _rows(40), 0.7
    train_student(_recipe(student, max_steps=6, select_fraction=0.0, eval_every=None), rows, tmp_path / "raw",
                  alpha=0.9, quiet=True)
    snapshots: list[list[torch.Tensor]] = []

    def snap(opt, args, kwargs):
        if type(opt) is torch.optim.AdamW:
            snapshots.append([p.detach().to("cpu", copy=True) for g in opt.param_groups for p in g["params"]])

    handle = register_optimizer_step_post_hook(snap)
    try:
        summary = train_student(_recipe(student, max_steps=6, select_fraction=0.0, eval_every=None, ema_decay=decay),
                                rows, tmp_path / "ema", alpha=0.9, quiet=True)
    finally:
        handle.remove()
    assert summary["ema_decay"] == decay and len(snapshots) == 6
    raw, saved = (load_file(tmp_path / d / "model.safetensors") for d in ("raw", "ema"))
    # the last step's weights are the run without averaging's, tensor for tensor: that names them
    names = [next(k for k, v in raw.items() if v.shape == w.shape and torch.equal(v, w)) for w in snapshots[-1]]
    assert len(set(names)) == len(names) == len(snapshots[-1])
    average = snapshots[0]
    for weights in snapshots[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    for name, want in zip(names, average):
        torch.testing.assert_close(saved[name], want, rtol=0, atol=1e-6)
        assert not torch.allclose(saved[name], raw[name])  # six steps at lr 0.3 move every trained tensor
    for name in set(raw) - set(names):  # buffers and anything untrained: as they were
        torch.testing.assert_close(saved[name], raw[name])


def test_with_a_slice_the_averaged_weights_are_scored_and_the_best_average_saved(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    rows = _rows(60)
    plain = train_student(_recipe(student, max_steps=10, max_grad_norm=None), rows, tmp_path / "raw", alpha=0.9,
                          quiet=True)
    summary = train_student(_recipe(student, max_steps=10, max_grad_norm=None, ema_decay=0.5), rows,
                            tmp_path / "out", alpha=0.9, quiet=True)
    sel = summary["selection"]
    kls = [h["kl"] for h in sel["history"]]
    assert kls != [h["kl"] for h in plain["selection"]["history"]]  # not the raw weights' scores
    assert kls[0] == plain["selection"]["history"][0]["kl"]  # after one step the average is that step's weights
    best = min(sel["history"], key=lambda h: h["kl"])
    assert sel["best_step"] == best["step"]
    _, held = selection_split([r.id for r in rows], [None] * len(rows), 0.25, seed=0)
    kl, agreement = _slice_kl_agreement(tmp_path / "out", [rows[i] for i in held])
    assert kl == pytest.approx(best["kl"], rel=1e-4) and agreement == pytest.approx(best["agreement"])


def test_an_averaged_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = _recipe(student, max_steps=8, checkpoint_every=4, eval_every=2, ema_decay=0.8)
    rows = _rows(40)
    ref = train_student(recipe, rows, tmp_path / "ref", alpha=0.9, quiet=True)
    with crash_in_step(6):
        train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    again = train_student(recipe, rows, tmp_path / "run", alpha=0.9, quiet=True)
    assert again["resumed_from_step"] == 4 and again["selection"] == ref["selection"]
    resumed, uninterrupted = (load_file(tmp_path / d / "model.safetensors") for d in ("run", "ref"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)


def test_ema_decay_is_refused_outside_zero_and_one_and_for_a_language_model():
    with pytest.raises(ProtegeError, match="ema_decay"):
        build_recipe({"task": {"labels": NAMES}, "training": {"ema_decay": 1.0}})
    with pytest.raises(ProtegeError, match="training.ema_decay"):
        build_recipe({"task": {"kind": "generation"}, "student": {"model": "gpt2"}, "training": {"ema_decay": 0.99}})


# -- the word-embedding table's own rate (student.embedding_lr) and the logit-distance loss (training.soft_loss) ---


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_embedding_lr_zero_keeps_the_table_as_initialised_and_trains_the_rest(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = build_recipe({**_recipe(student, max_steps=4, select_fraction=0.0, eval_every=None).model_dump(),
                           "student": {"model": str(student), "max_length": 32, "embedding_lr": 0.0}})
    train_student(recipe, _rows(24), tmp_path / "frozen", alpha=0.9, quiet=True)
    before, after = _weights(student), _weights(tmp_path / "frozen")
    table = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(after[table], before[table], rtol=0, atol=0)
    moved = [k for k in before if k != table and not torch.equal(before[k], after[k])]
    assert "classifier.weight" in moved and "bert.embeddings.position_embeddings.weight" in moved


def test_embedding_lr_gives_the_table_its_own_rate_on_the_same_schedule(tmp_path, tiny_tokenizer):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = build_recipe({**_recipe(student, max_steps=2, select_fraction=0.0, eval_every=None).model_dump(),
                           "student": {"model": str(student), "max_length": 32, "embedding_lr": 0.01}})
    seen: list[list[tuple[float, int]]] = []

    def look(opt, args, kwargs):  # (initial lr, parameter count) of every group at each step
        seen.append([(g["initial_lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups])

    handle = register_optimizer_step_pre_hook(look)
    try:
        train_student(recipe, _rows(24), tmp_path / "out", alpha=0.9, quiet=True)
    finally:
        handle.remove()
    vocab_rows = len(tiny_tokenizer) * 16  # the table: vocabulary x hidden 16
    assert (0.01, vocab_rows) in seen[0]  # a decayed group of the table alone, at its rate
    assert {lr for lr, n in seen[0] if n} == {0.3, 0.01}  # the rest at training.learning_rate


def test_logit_mse_trains_the_students_margins_toward_the_teachers(tmp_path, tiny_tokenizer):
    """With training.soft_loss logit_mse the student is fitted to the teacher's centred log-probabilities: after
    training, its logits on the training texts are closer to them than those of the same student before."""
    from transformers import AutoModelForSequenceClassification

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    rows = _rows(16)
    train_student(_recipe(student, max_steps=40, select_fraction=0.0, eval_every=None, soft_loss="logit_mse",
                          learning_rate=0.03), rows, tmp_path / "out", alpha=1.0, quiet=True)

    def distance(path: Path) -> float:
        from protege.training.losses import logit_mse

        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        enc = tiny_tokenizer([r.text for r in rows], padding=True, truncation=True, max_length=32,
                             return_tensors="pt")
        with torch.no_grad():
            return logit_mse(model(**enc).logits, torch.tensor([r.teacher_probs for r in rows]))[0].item()

    assert distance(tmp_path / "out") < 0.5 * distance(student)
    # and the setting is what trained it: the same run with the KL ends elsewhere
    train_student(_recipe(student, max_steps=40, select_fraction=0.0, eval_every=None, learning_rate=0.03),
                  rows, tmp_path / "kl", alpha=1.0, quiet=True)
    assert abs(distance(tmp_path / "kl") - distance(tmp_path / "out")) > 1.0


def test_embedding_lr_and_soft_loss_are_refused_for_a_language_model():
    lm = {"task": {"kind": "generation"}, "student": {"model": "gpt2"}}
    with pytest.raises(ProtegeError, match="student.embedding_lr"):
        build_recipe({**lm, "student": {"model": "gpt2", "embedding_lr": 0.0}})
    with pytest.raises(ProtegeError, match="training.soft_loss"):
        build_recipe({**lm, "training": {"soft_loss": "logit_mse"}})
    with pytest.raises(ProtegeError, match="embedding_lr"):
        build_recipe({"task": {"labels": NAMES}, "student": {"embedding_lr": -1.0}})
    # the logit distance has no temperature: one set, or a sweep over them, would do nothing
    with pytest.raises(ProtegeError, match="training.temperature tempers the KL"):
        build_recipe({"task": {"labels": NAMES}, "training": {"soft_loss": "logit_mse", "temperature": 4.0}})
    with pytest.raises(ProtegeError, match="sweep_temperature: training.soft_loss logit_mse"):
        build_recipe({"task": {"labels": NAMES}, "training": {"soft_loss": "logit_mse", "select_fraction": 0.1,
                                                             "sweep_temperature": [1.0, 2.0]}})
    assert build_recipe({"task": {"labels": NAMES}, "training": {"soft_loss": "logit_mse", "select_fraction": 0.1,
                                                                "sweep_alpha": [0.5, 1.0]}}).training.sweep_alpha


# -- the sweep, through the pipeline ------------------------------------------------------------------------------


def _signals_recipe(tmp_path: Path, student: Path, teacher: Path, **training: Any) -> Any:
    """A recipe over hand-written signals/train.jsonl (40 rows, 20 augmented texts), so train() needs no labeling."""
    rows = _rows(40)
    signal_rows = [{"id": r.id, "text": r.text, "gold": None, "teacher_label": NAMES[r.target],
                    "teacher_probs": list(r.teacher_probs), "method": "logits"} for r in rows]
    signal_rows += [{**s, "id": f"{s['id']}~aug0", "text": "please " + s["text"], "augmented_from": s["id"]}
                    for s in signal_rows[:20]]
    write_jsonl(tmp_path / "out" / "signals" / "train.jsonl", signal_rows)
    train = {"batch_size": 8, "learning_rate": 0.05, "warmup_fraction": 0.0, "select_fraction": 0.25,
             "max_steps": 4, "eval_every": 2, "hard_label_baseline": False}
    return build_recipe({
        "task": {"labels": NAMES}, "teacher": {"model": f"hf:{teacher}"},
        "student": {"model": str(student), "max_length": 32}, "training": train | training,
        "output_dir": str(tmp_path / "out"),
    })


def test_the_sweep_trains_every_pair_and_keeps_the_best_by_the_metric(tmp_path, tiny_tokenizer, tiny_classifier_dir):
    from protege.pipeline import train

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = _signals_recipe(tmp_path, student, tiny_classifier_dir, sweep_alpha=[0.0, 0.5, 1.0],
                             sweep_temperature=[1.0, 4.0], hard_label_baseline=True)
    out = train(recipe, quiet=True)
    s = out["student"]
    sweep = s["sweep"]
    assert set(sweep) == {"metric", "trials", "chosen"} and sweep["metric"] == "kl"
    assert [(t["alpha"], t["temperature"]) for t in sweep["trials"]] == [
        (a, t) for a in (0.0, 0.5, 1.0) for t in (1.0, 4.0)]
    assert all(set(t) == {"alpha", "temperature", "kl", "agreement", "best_step"} for t in sweep["trials"])
    best = min(sweep["trials"], key=lambda t: t["kl"])
    assert sweep["chosen"] == {"alpha": best["alpha"], "temperature": best["temperature"]}
    assert (s["alpha"], s["temperature"]) == (best["alpha"], best["temperature"])
    assert s["selection"]["best_step"] == best["best_step"]
    assert len({t["kl"] for t in sweep["trials"]}) > 1  # the pairs did train different students

    # the winner's weights were kept, not retrained: the saved student scores its trial's KL on the slice
    rows = _rows(40)
    _, held = selection_split([r.id for r in rows], [None] * len(rows), 0.25, seed=0)
    kl, _ = _slice_kl_agreement(recipe.output_dir / "student", [rows[i] for i in held])
    assert kl == pytest.approx(best["kl"], rel=1e-4)
    card = json.loads((recipe.output_dir / "student" / "protege.json").read_text())
    assert card["sweep"] == sweep and card["recipe_hash"] == s["recipe_hash"]
    assert not (recipe.output_dir / "student.sweep").exists()

    # the hard-label baseline is not swept, and is selected on the same slice
    hard = out["student-hard"]
    assert hard["alpha"] == 0.0 and "sweep" not in hard and hard["selection"]["rows"] == s["selection"]["rows"] == 10
    kept_augmented = sum(i not in held for i in range(20))  # the first 20 rows have an augmented text each
    assert 0 < kept_augmented < 20 and hard["examples"] == s["examples"] == 30 + kept_augmented

    # every trial's compute is in the ledger, as the student's; a rerun with nothing changed trains nothing
    ledger = sql(recipe.store_path, "SELECT stage, detail FROM compute ORDER BY id")
    trials = [json.loads(d) for stage, d in ledger if stage == "train:student"]
    assert [(d["alpha"], d["temperature"], d["trial"]) for d in trials] == [
        (t["alpha"], t["temperature"], i) for i, t in enumerate(sweep["trials"])]
    assert [stage for stage, _ in ledger].count("train:student-hard") == 1
    assert train(recipe, quiet=True, force=False) == {"student": {"skipped": True}, "student-hard": {"skipped": True}}


def test_agreement_sweep_breaks_ties_by_kl(tmp_path, tiny_tokenizer, tiny_classifier_dir):
    from protege.pipeline import train

    student = _student_dir(tmp_path / "bert", tiny_tokenizer)
    recipe = _signals_recipe(tmp_path, student, tiny_classifier_dir, sweep_alpha=[0.2, 0.9], select_metric="agreement")
    sweep = train(recipe, quiet=True)["student"]["sweep"]
    top = max(t["agreement"] for t in sweep["trials"])
    want = min((t for t in sweep["trials"] if t["agreement"] == top), key=lambda t: t["kl"])
    assert sweep["metric"] == "agreement" and len(sweep["trials"]) == 2
    assert sweep["chosen"] == {"alpha": want["alpha"], "temperature": 2.0}


# -- students cut from the teacher ---------------------------------------------------------------------------------


def _teacher_layers_recipe(teacher: Path, labels: list[str], training: dict | None = None, **student: Any) -> Any:
    return build_recipe({"task": {"labels": labels}, "teacher": {"model": f"hf:{teacher}"},
                         "student": {"init": "teacher_layers", "max_length": 32, **student},
                         "training": training or {}})


def test_a_teacher_layers_student_is_the_teacher_with_its_kept_layers_and_its_head_in_task_order(
    tmp_path, tiny_tokenizer
):
    from transformers import AutoModelForSequenceClassification

    from protege.students.classifier import build_student

    teacher_names = [n.capitalize() if i % 2 else n for i, n in enumerate(NAMES)]
    teacher_dir = _student_dir(tmp_path / "teacher", tiny_tokenizer, layers=4, names=teacher_names)
    order = [4, 0, 3, 1, 2]  # the teacher's head row of each task label
    task = [teacher_names[i].swapcase() for i in order]  # another order, another case
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    recipe = _teacher_layers_recipe(teacher_dir, task, layer_stride=2)
    model, tok, kept = build_student(recipe.student, recipe.task.label_names, 0, recipe.teacher)
    model.eval()

    assert kept == [0, 2, 3]  # every 2nd layer from the first, plus the last
    assert model.config.num_hidden_layers == 3 and len(model.bert.encoder.layer) == 3
    assert model.config.id2label == dict(enumerate(task)) and tok.get_vocab() == tiny_tokenizer.get_vocab()
    t_sd, s_sd = teacher.state_dict(), model.state_dict()
    for i, k in enumerate(kept):
        prefix, t_prefix = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{k}."
        names = [n for n in s_sd if n.startswith(prefix)]
        assert len(names) == len([n for n in t_sd if n.startswith(t_prefix)]) > 0
        for name in names:
            torch.testing.assert_close(s_sd[name], t_sd[t_prefix + name[len(prefix):]], rtol=0, atol=0)
    for name in [n for n in t_sd if n.startswith(("bert.embeddings.", "bert.pooler."))]:
        torch.testing.assert_close(s_sd[name], t_sd[name], rtol=0, atol=0)
    torch.testing.assert_close(s_sd["classifier.weight"], t_sd["classifier.weight"][order], rtol=0, atol=0)
    torch.testing.assert_close(s_sd["classifier.bias"], t_sd["classifier.bias"][order], rtol=0, atol=0)
    renamed = {"bert.encoder.layer.0.": "bert.encoder.layer.0.", "bert.encoder.layer.2.": "bert.encoder.layer.1.",
               "bert.encoder.layer.3.": "bert.encoder.layer.2."}
    want = {next((new + n[len(old):] for old, new in renamed.items() if n.startswith(old)), n)
            for n in t_sd if not n.startswith("bert.encoder.layer.1.")}
    assert set(s_sd) == want  # nothing but the teacher's tensors, layer 1 left out

    # keeping every layer gives the teacher itself, its logits in the task's label order
    whole, _, _ = build_student(_teacher_layers_recipe(teacher_dir, task, keep_layers=[0, 1, 2, 3]).student,
                                tuple(task), 0, recipe.teacher)
    enc = tok(["my card was charged twice", "the app crashes"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(whole.eval()(**enc).logits, teacher(**enc).logits[:, order])


def test_a_teacher_layers_student_trains_and_records_what_it_kept(tmp_path, tiny_tokenizer):
    teacher_dir = _student_dir(tmp_path / "teacher", tiny_tokenizer, layers=4)
    recipe = _teacher_layers_recipe(teacher_dir, NAMES, {"max_steps": 2, "batch_size": 8}, keep_layers=[1, 3])
    summary = train_student(recipe, _rows(16), tmp_path / "out", alpha=0.9, quiet=True)
    assert summary["init"] == "teacher_layers" and summary["kept_layers"] == [1, 3]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}


def test_a_teacher_that_is_not_a_sequence_classifier_or_names_other_labels_is_refused(
    tmp_path, tiny_tokenizer, tiny_lm_dir
):
    from protege.students.classifier import build_student

    recipe = _teacher_layers_recipe(tiny_lm_dir, NAMES)
    with pytest.raises(ProtegeError, match=r"is LlamaForCausalLM, not a \*ForSequenceClassification\. Use "
                                           r"student.init pretrained .* or scratch"):
        build_student(recipe.student, recipe.task.label_names, 0, recipe.teacher)
    teacher_dir = _student_dir(tmp_path / "teacher", tiny_tokenizer, layers=2)
    recipe = _teacher_layers_recipe(teacher_dir, [*NAMES[:-1], "refund"])
    with pytest.raises(ProtegeError, match=rf"predicts labels \[{NAMES[0]!r}, .* but the task has .*'refund'.*name "
                                           "task.labels as the classifier does"):
        build_student(recipe.student, recipe.task.label_names, 0, recipe.teacher)
    recipe = _teacher_layers_recipe(teacher_dir, NAMES, keep_layers=[0, 5])
    with pytest.raises(ProtegeError, match=r"keep_layers \[0, 5\] must be distinct increasing .* 2 layers"):
        build_student(recipe.student, recipe.task.label_names, 0, recipe.teacher)
