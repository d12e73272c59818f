"""student.embeddings projected: a scratch student starts from its tokenizer's model's embeddings, projected by PCA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protege.demo_data import LABELS
from protege.errors import ProtegeError, RecipeError
from protege.recipe import build_recipe
from protege.students.classifier import build_student, project_embeddings
from protege.sources import resolve_source

NAMES = tuple(LABELS)


def _pretrained(path: Path, tokenizer, width: int = 32, rank: int = 6, classifier: bool = False, seed: int = 3) -> Path:
    """A BERT whose word embeddings have ``rank`` strong directions (plus a little noise) and whose
    position embeddings are random: a stand-in for a pretrained encoder, with a known principal subspace;
    ``classifier``: a sequence classifier over the demo labels (a stand-in for a fine-tuned 'hf:' teacher)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, pad_token_id=tokenizer.pad_token_id, num_labels=len(NAMES),
                     id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = BertForSequenceClassification(cfg) if classifier else BertModel(cfg)
    with torch.no_grad():
        v = len(tokenizer)
        strong = torch.randn(v, rank) @ torch.randn(rank, width) + 0.01 * torch.randn(v, width) + 0.3
        model.get_input_embeddings().weight.copy_(strong)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(model: Path, **student):
    return build_recipe({"task": {"labels": list(NAMES)},
                         "student": {"model": str(model), "init": "scratch", "num_heads": 2, "max_length": 32,
                                     **student}})


def test_projected_embeddings_are_the_pretrained_ones_on_their_principal_directions(tmp_path, tiny_tokenizer):
    from transformers import BertModel

    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer)
    recipe = _recipe(source_dir, hidden_size=6, embeddings="projected")
    student, tok, _ = build_student(recipe.student, NAMES, seed=0)
    base = BertModel.from_pretrained(source_dir)
    w = base.embeddings.word_embeddings.weight.detach()
    centred = w - w.mean(0, keepdim=True)
    ours = student.bert.embeddings.word_embeddings.weight.detach()

    # the words keep their geometry: the student's Gram matrix is the pretrained one on the top-6 principal
    # subspace (exact SVD here), up to one scale, and that scale puts the words at the config's init std
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = centred @ vh[:6].T
    scale = student.config.initializer_range / float(top.std())
    assert float(ours.std()) == pytest.approx(student.config.initializer_range, rel=1e-4)
    torch.testing.assert_close(ours @ ours.T / scale**2, top @ top.T, rtol=1e-3, atol=1e-3)

    # positions and token types went through the same linear map as the words
    proj = torch.linalg.lstsq(centred, ours).solution  # the map (D x 6) that made the words
    for attr in ("position_embeddings", "token_type_embeddings"):
        theirs = getattr(base.embeddings, attr).weight.detach()
        mine = getattr(student.bert.embeddings, attr).weight.detach()
        n = min(len(theirs), len(mine))
        torch.testing.assert_close(mine[:n], theirs[:n] @ proj, rtol=1e-3, atol=1e-5)

    # the same student every time, and a different one than random embeddings
    again, _, _ = build_student(recipe.student, NAMES, seed=0)
    torch.testing.assert_close(again.bert.embeddings.word_embeddings.weight, ours, rtol=0, atol=0)
    plain, _, _ = build_student(_recipe(source_dir, hidden_size=6).student, NAMES, seed=0)
    assert not torch.allclose(plain.bert.embeddings.word_embeddings.weight, ours)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()


def test_the_projection_reports_the_variance_it_keeps(tmp_path, tiny_tokenizer):
    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer, rank=6)
    recipe = _recipe(source_dir, hidden_size=6, embeddings="projected")
    student, _, _ = build_student(recipe.student, NAMES, seed=0)
    kept = project_embeddings(student, resolve_source(str(source_dir)), str(source_dir))["variance_kept"]
    assert 0.99 < kept <= 1.0 + 1e-6  # six strong directions, six kept
    narrow, _, _ = build_student(_recipe(source_dir, hidden_size=2, num_heads=1).student, NAMES, seed=0)
    assert project_embeddings(narrow, resolve_source(str(source_dir)), str(source_dir))["variance_kept"] < 0.8


def test_a_student_wider_than_its_pretrained_embeddings_or_a_model_without_weights_is_refused(
    tmp_path, tiny_tokenizer
):
    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer, width=8, rank=4)
    for kind in ("projected", "distilled"):  # the message names the kind asked for
        with pytest.raises(ProtegeError, match=rf"student.embeddings {kind}: .*width 8; the student needs .* of "
                                               r"width at most that \(student.hidden_size 16\)"):
            build_student(_recipe(source_dir, hidden_size=16, embeddings=kind).student, NAMES, seed=0)
    tok_only = tmp_path / "tokenizer-only"
    tiny_tokenizer.save_pretrained(tok_only)
    with pytest.raises(ProtegeError, match=r"cannot be loaded: .*Use student.embeddings random"):
        build_student(_recipe(tok_only, hidden_size=8, embeddings="projected").student, NAMES, seed=0)


def test_projected_embeddings_are_refused_for_a_student_that_is_not_built_from_scratch(tmp_path, tiny_tokenizer):
    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer)
    with pytest.raises(RecipeError, match=r"student.embeddings shapes a student.init: scratch encoder.*Fix: remove "
                                          r"it, or set student.init: scratch"):
        build_recipe({"task": {"labels": list(NAMES)},
                      "student": {"model": str(source_dir), "init": "pretrained", "embeddings": "projected"}})


@pytest.mark.parametrize("width", [16, 64])
def test_a_scratch_student_starts_at_one_over_root_width_and_its_cls_state_depends_on_the_text(
    tmp_path, tiny_tokenizer, width
):
    from protege.students.classifier import scratch_init_std

    # the scale: 1/sqrt(width) (BERT's 0.02 is for its width of 768), on the config and on the weights it drew
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    model, tok, _ = build_student(_recipe(tmp_path / "tok", hidden_size=width, num_layers=1,
                                          intermediate_size=4 * width).student, NAMES, seed=0)
    assert scratch_init_std(width) == pytest.approx(width**-0.5)
    assert model.config.initializer_range == pytest.approx(width**-0.5)
    value = model.bert.encoder.layer[0].attention.self.value.weight
    assert float(value.detach().std()) == pytest.approx(width**-0.5, rel=0.1)
    # what that buys: the [CLS] state the classifier reads differs between texts from the first step. The same
    # student at BERT's 0.02 (what protege built before): at width 64 its [CLS] barely moves with the text
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(type(model.config)(**{**model.config.to_dict(), "initializer_range": 0.02}))
    texts = ["the food was great", "the terrible, slow film", "the refund of my order", "the time it is", "the ok"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert len(set(enc["input_ids"][:, 0].tolist())) == 1  # the first token (what the pooler reads) is shared
    spreads = []
    for m in (model, bert):
        m.eval()
        with torch.no_grad():
            cls = m.bert(**enc).last_hidden_state[:, 0]  # (5, width), layer-normed: entries of std ~1
        spreads.append(float(cls.std(0).mean()))  # how much each coordinate differs between the texts
    assert spreads[0] > 0.1 and spreads[0] > 10 * spreads[1]


def _word_states(base, tokenizer) -> torch.Tensor:
    """What student.embeddings distilled reads, computed one word piece at a time: the mean of the encoder's
    output states over [CLS] piece [SEP]."""
    base.eval()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = []
    with torch.no_grad():
        for i in range(len(tokenizer)):
            rows.append(base(input_ids=torch.tensor([[cls, i, sep]])).last_hidden_state[0].mean(0))
    return torch.stack(rows)


def _assert_pca_of(ours: torch.Tensor, states: torch.Tensor, h: int, std: float) -> None:
    """``ours`` is ``states`` centred and put on its top ``h`` principal directions, scaled to ``std``: same Gram
    matrix up to that one scale."""
    centred = states - states.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = centred @ vh[:h].T
    scale = std / float(top.std())
    assert float(ours.std()) == pytest.approx(std, rel=1e-4)
    torch.testing.assert_close(ours @ ours.T / scale**2, top @ top.T, rtol=2e-3, atol=2e-3)


def test_distilled_embeddings_are_the_encoders_outputs_for_each_word_on_their_principal_directions(
    tmp_path, tiny_tokenizer
):
    from transformers import BertModel

    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer, rank=6)
    student, _, _ = build_student(_recipe(source_dir, hidden_size=6, embeddings="distilled").student, NAMES, seed=0)
    base = BertModel.from_pretrained(source_dir)
    ours = student.bert.embeddings.word_embeddings.weight.detach()
    _assert_pca_of(ours, _word_states(base, tiny_tokenizer), 6, student.config.initializer_range)

    # not the input embeddings' projection: the encoder's layers changed what each word is
    projected, _, _ = build_student(_recipe(source_dir, hidden_size=6, embeddings="projected").student, NAMES, seed=0)
    assert not torch.allclose(projected.bert.embeddings.word_embeddings.weight, ours, atol=1e-3)
    # positions: the input embeddings' map, as with projected (the words came through the layers, positions did not)
    torch.testing.assert_close(student.bert.embeddings.position_embeddings.weight,
                               projected.bert.embeddings.position_embeddings.weight)
    again, _, _ = build_student(_recipe(source_dir, hidden_size=6, embeddings="distilled").student, NAMES, seed=0)
    torch.testing.assert_close(again.bert.embeddings.word_embeddings.weight, ours, rtol=0, atol=0)


def test_embeddings_from_the_teacher_read_the_fine_tuned_classifiers_encoder(tmp_path, tiny_tokenizer):
    from transformers import BertForSequenceClassification

    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer, rank=6)
    teacher_dir = _pretrained(tmp_path / "teacher", tiny_tokenizer, rank=6, classifier=True, seed=4)
    teacher = {"model": f"hf:{teacher_dir}"}
    for kind in ("distilled", "projected"):
        recipe = build_recipe({"task": {"labels": list(NAMES)}, "teacher": teacher,
                               "student": {"model": str(source_dir), "init": "scratch", "num_heads": 2,
                                           "hidden_size": 6, "max_length": 32, "embeddings": kind,
                                           "embeddings_from": "teacher"}})
        student, _, _ = build_student(recipe.student, NAMES, seed=0, teacher=recipe.teacher)
        bert = BertForSequenceClassification.from_pretrained(teacher_dir).bert
        states = _word_states(bert, tiny_tokenizer) if kind == "distilled" else bert.embeddings.word_embeddings.weight
        _assert_pca_of(student.bert.embeddings.word_embeddings.weight.detach(), states.detach(), 6,
                       student.config.initializer_range)


def test_embeddings_from_a_teacher_with_another_vocabulary_or_no_encoder_are_refused(
    tmp_path, tiny_tokenizer, tiny_classifier_dir
):
    from transformers import AutoTokenizer, BertTokenizerFast

    source_dir = _pretrained(tmp_path / "base", tiny_tokenizer, rank=6)
    # same size, other words: the teacher's row i is not the student's word i
    other = tmp_path / "other-vocab"
    vocab = dict(tiny_tokenizer.get_vocab())
    a, b = "refund", "password"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    BertTokenizerFast(vocab_file=str(other / "vocab.txt"), do_lower_case=False).save_pretrained(other)
    assert AutoTokenizer.from_pretrained(other).get_vocab() != tiny_tokenizer.get_vocab()
    for f in tiny_classifier_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and "token" not in f.name and f.name != "special_tokens_map.json":
            (other / f.name).write_bytes(f.read_bytes())
    recipe = build_recipe({"task": {"labels": list(NAMES)}, "teacher": {"model": f"hf:{other}"},
                           "student": {"model": str(source_dir), "init": "scratch", "num_heads": 2, "hidden_size": 6,
                                       "embeddings": "distilled", "embeddings_from": "teacher"}})
    with pytest.raises(ProtegeError, match=r"does not use student.model .*'s vocabulary.*embeddings_from: model"):
        build_student(recipe.student, NAMES, seed=0, teacher=recipe.teacher)

    with pytest.raises(RecipeError, match=r"embeddings_from teacher reads the word embeddings of a local encoder "
                                          r"teacher.*Set student.embeddings_from: model"):
        build_recipe({"task": {"labels": list(NAMES)}, "teacher": {"model": "openai:gpt-4o-mini"},
                      "student": {"model": str(source_dir), "init": "scratch", "embeddings": "distilled",
                                  "embeddings_from": "teacher"}})
    with pytest.raises(RecipeError, match=r"student.embeddings_from names where .* Fix: remove it, or set "
                                          r"student.embeddings: projected or distilled"):
        build_recipe({"task": {"labels": list(NAMES)},
                      "student": {"model": str(source_dir), "init": "scratch", "embeddings_from": "teacher"}})


def test_student_dropout_sets_a_scratch_students_hidden_and_attention_dropout(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    model, _, _ = build_student(_recipe(tmp_path / "tok", hidden_size=16, dropout=0.3).student, NAMES, seed=0)
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.3
    assert model.bert.embeddings.dropout.p == 0.3
    default, _, _ = build_student(_recipe(tmp_path / "tok", hidden_size=16).student, NAMES, seed=0)
    assert default.config.hidden_dropout_prob == 0.1  # BERT's, as before the setting
    with pytest.raises(RecipeError, match=r"student.dropout shapes a student.init: scratch encoder"):
        build_recipe({"task": {"labels": list(NAMES)}, "student": {"model": "x", "init": "pretrained", "dropout": 0.2}})
