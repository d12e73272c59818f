"""student.ngram_buckets: an n-gram bag beside a mean-pooled scratch student. Its rows and weights by hand, the
mixture a distribution with the members at its ends, the lean forward and a saved-and-loaded student equal to the
model's own forward, training that fits each member and picks the bag's share that agrees with the teacher best
on the held-out slice, the bag's own learning rate, its parameters counted, and the settings it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protege.demo_data import LABELS, make_examples
from protege.errors import RecipeError
from protege.lean import classifier_logits
from protege.recipe import build_recipe
from protege.students.classifier import build_student, count_parameters, load_student
from protege.students.mean_pool import (
    PAIR_HASH,
    MeanPoolBertConfig,
    MeanPoolBertForSequenceClassification,
    mix_logits,
    ngram_rows,
    register,
)
from protege.training.classifier import TrainRow, train_student
from protege.training.optim import make_optimizer

NAMES = list(LABELS)


def _model(buckets: int = 80, vocab: int = 50, share: float = 0.3, seed: int = 0):
    register()  # the Auto classes load a saved protege-bert
    torch.manual_seed(seed)
    cfg = MeanPoolBertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, num_labels=3, ngram_buckets=buckets)
    model = MeanPoolBertForSequenceClassification(cfg)
    with torch.no_grad():
        model.ngrams.weight.normal_()
        model.ngram_bias.normal_()
        model.ngram_share.fill_(share)
    return model.eval()


def test_rows_are_the_pieces_then_hashed_pairs_and_weights_average_the_unpadded_ones():
    ids = torch.tensor([[5, 7, 9], [4, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rows, w = ngram_rows(ids, mask, vocab_size=50, buckets=80)
    pair = lambda a, b: 50 + (a * PAIR_HASH + b) % 30  # noqa: E731
    assert rows.tolist() == [[5, 7, 9, pair(5, 7), pair(7, 9)], [4, 6, 0, pair(4, 6), pair(6, 0)]]
    # text 1: 3 pieces + 2 pairs; text 2: 2 pieces + 1 pair (the padding and the pair that touches it weigh 0)
    assert torch.allclose(w, torch.tensor([[0.2] * 5, [1 / 3, 1 / 3, 0, 1 / 3, 0]]))
    assert bool((rows[:, 3:] >= 50).all()) and bool((rows < 80).all())


def test_the_mixture_is_a_distribution_with_each_member_at_its_end():
    enc, bag = torch.randn(4, 3), torch.randn(4, 3)
    for share in (0.0, 0.25, 1.0):
        mixed = mix_logits(enc, bag, torch.tensor(share))
        want = (1 - share) * enc.softmax(-1) + share * bag.softmax(-1)
        assert torch.allclose(mixed.exp(), want, atol=1e-6)
    assert torch.allclose(mix_logits(enc, bag, torch.tensor(0.0)), enc.log_softmax(-1), atol=1e-6)
    assert torch.allclose(mix_logits(enc, bag, torch.tensor(1.0)), bag.log_softmax(-1), atol=1e-6)


def test_model_lean_forward_and_a_saved_student_answer_the_same(tmp_path):
    model = _model()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    enc, bag = out.member_logits
    assert torch.allclose(out.logits, mix_logits(enc, bag, torch.tensor(0.3)), atol=1e-6)
    assert torch.allclose(bag, model.ngram_logits(ids, mask))
    # the bag reads only the unpadded pieces: padding the short text further changes nothing
    longer = torch.cat([ids, torch.zeros(3, 2, dtype=ids.dtype)], 1)
    longer_mask = torch.cat([mask, torch.zeros(3, 2, dtype=mask.dtype)], 1)
    assert torch.allclose(model.ngram_logits(longer, longer_mask)[1], bag[1], atol=1e-6)
    with torch.inference_mode():
        lean = classifier_logits(model)(input_ids=ids, attention_mask=mask)
        one = classifier_logits(model)(input_ids=ids[:1], attention_mask=mask[:1])  # the unpadded fast path
    assert torch.allclose(lean, out.logits, atol=1e-5) and torch.allclose(one, out.logits[:1], atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert float(again.ngram_share) == pytest.approx(0.3)
    assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, out.logits, atol=1e-6)


def test_buckets_must_exceed_the_vocabulary():
    with pytest.raises(ValueError, match=r"ngram_buckets \(50\) must exceed vocab_size \(50\)"):
        _model(buckets=50)


def _recipe(student_dir: Path, out: Path, **student):
    return build_recipe({
        "task": {"labels": NAMES},
        "student": {"model": str(student_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2,
                    "max_length": 32, "pooling": "mean", **student},
        "training": {"epochs": 6, "batch_size": 16, "learning_rate": 1e-2, "warmup_fraction": 0.0, "seed": 0,
                     "select_fraction": 0.25, "alpha": 1.0, "temperature": 2.0},
        "output_dir": str(out),
    })


def _rows(n: int) -> list[TrainRow]:
    """Demo tickets with a teacher that is sure of their gold label (0.85) and spreads the rest."""
    rows = []
    for i, ex in enumerate(make_examples(n, seed=5)):
        probs = [0.15 / (len(NAMES) - 1)] * len(NAMES)
        probs[NAMES.index(ex["label"])] = 0.85
        rows.append(TrainRow(text=ex["text"], teacher_probs=tuple(probs), target=NAMES.index(ex["label"]),
                             id=f"r{i}"))
    return rows


def test_training_fits_both_members_and_keeps_the_share_that_agrees_best_on_the_slice(tmp_path, tiny_tokenizer):
    from protege.lean import encode
    from protege.training.select import selection_split, slice_scores

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    buckets = len(tiny_tokenizer) + 500
    recipe = _recipe(tmp_path / "tok", tmp_path / "run", ngram_buckets=buckets, ngram_lr=3e-3)
    rows = _rows(160)
    summary = train_student(recipe, rows, tmp_path / "student", alpha=1.0, quiet=True)
    model, tok, _ = load_student(tmp_path / "student")
    model.eval()
    assert summary["parameters"] == count_parameters(model)
    assert float(model.ngrams.weight.detach().abs().sum()) > 0  # the bag learned (it starts at zero)

    # the kept share is the grid point whose mixture has the lowest KL to the teacher on the held-out slice
    ids = [r.id for r in rows]
    _, held = selection_split(ids, [None] * len(rows), 0.25, 0)
    batch = encode(tok, [rows[i].text for i in held], 32)
    teacher = torch.tensor([rows[i].teacher_probs for i in held])
    with torch.no_grad():
        enc, bag = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).member_logits
    kls = [float(slice_scores(mix_logits(enc, bag, torch.tensor(s)), teacher)[0]) / len(held)
           for s in torch.linspace(0, 1, 21).tolist()]
    share = float(model.ngram_share)
    assert 0.0 < share < 1.0  # here both members count: a mixture, not one of them
    assert share == pytest.approx(torch.linspace(0, 1, 21)[min(range(21), key=kls.__getitem__)].item(), abs=1e-6)
    best = summary["selection"]["history"]
    kept = next(h for h in best if h["step"] == summary["selection"]["best_step"])
    assert kept["kl"] == pytest.approx(min(kls), rel=1e-4)
    log = [json.loads(x) for x in (tmp_path / "student" / "train_log.jsonl").read_text().splitlines()]
    for rec in log:  # the bag's own loss is logged apart: the loss is the encoder's (kd at alpha 1) plus it
        assert rec["ngram_loss"] > 0 and rec["loss"] == pytest.approx(rec["kd_loss"] + rec["ngram_loss"], rel=1e-5)

    def mean(key, part):  # over four steps: one batch's loss is noisy
        return sum(r[key] for r in part) / len(part)

    assert len(log) == 48  # 120 training rows, 16 a step, 6 epochs
    for key in ("loss", "ngram_loss"):  # both members' together falls, and the bag's own
        assert mean(key, log[-4:]) < mean(key, log[:4])


def test_the_encoder_trains_exactly_as_it_would_alone(tmp_path, tiny_tokenizer):
    """The members are trained apart: their own losses, their own gradient clipping, no random draw for the bag, so
    the encoder's weights after training are those of the same recipe without the bag."""
    from safetensors.torch import load_file

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rows = _rows(96)
    weights = {}
    for buckets in (0, len(tiny_tokenizer) + 300):
        recipe = _recipe(tmp_path / "tok", tmp_path / "run", ngram_buckets=buckets,
                         **({"ngram_lr": 0.5} if buckets else {}))
        recipe.training.max_grad_norm = 0.05  # clipping on at every step: a shared norm would couple the members
        recipe.training.eval_every = 10_000  # one evaluation, at the last step: both keep the same step
        train_student(recipe, rows, tmp_path / f"s{buckets}", alpha=1.0, quiet=True)
        weights[buckets] = load_file(tmp_path / f"s{buckets}" / "model.safetensors")
    alone, beside = weights.values()
    assert set(beside) - set(alone) == {"ngrams.weight", "ngram_bias", "ngram_share"}
    for name, w in alone.items():
        assert torch.equal(beside[name], w), name


def test_the_bag_learns_at_its_own_rate_on_the_same_schedule(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    recipe = _recipe(tmp_path / "tok", tmp_path / "run", ngram_buckets=len(tiny_tokenizer) + 100, ngram_lr=0.2)
    model, _, _ = build_student(recipe.student, tuple(NAMES), seed=0)
    optimizer, scheduler = make_optimizer(model, recipe.training, 3e-3, 10, {"ngram": 0.2})
    ids = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        names = [ids[id(p)] for p in group["params"]]
        assert all(n.startswith("ngram") for n in names) == (group["lr"] == 0.2) or not names
    bag_groups = [g for g in optimizer.param_groups if g["lr"] == 0.2]
    assert sorted(ids[id(p)] for g in bag_groups for p in g["params"]) == ["ngram_bias", "ngrams.weight"]
    plain = count_parameters(build_student(recipe.student.model_copy(update={"ngram_buckets": 0}),
                                           tuple(NAMES), seed=0)[0])
    assert count_parameters(model) == plain + (len(tiny_tokenizer) + 100) * len(NAMES) + len(NAMES)


@pytest.mark.parametrize("student,training,match", [
    ({"pooling": "cls"}, {"select_fraction": 0.1}, r"mean-pooled scratch classifier .*pooling 'cls'"),
    ({"pooling": "mean"}, {}, r"ngram_buckets chooses how much the n-gram bag counts .*select_fraction"),
])
def test_settings_it_cannot_work_with_are_refused(tmp_path, student, training, match):
    with pytest.raises(RecipeError, match=match):
        build_recipe({"task": {"labels": NAMES},
                      "student": {"init": "scratch", "ngram_buckets": 40000, **student}, "training": training})


def test_a_generation_recipe_refuses_it():
    with pytest.raises(RecipeError, match="ngram_buckets"):
        build_recipe({"task": {"kind": "generation", "instruction": "Answer."}, "student": {"ngram_buckets": 40000}})

