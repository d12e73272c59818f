"""The 'embed:' teacher: a sentence-embedding model (the packaged all-MiniLM-L6-v2, run for real) scores each
text against label prototypes made of the label's description and worked examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import n_calls

from protege.demo_data import LABELS
from protege.errors import TeacherError
from protege.labeling.labeler import label
from protege.labeling.prompts import render_request
from protege.recipe import FewShotExample, TaskConfig, TeacherConfig, load_recipe
from protege.sources import ModelSource, resolve_source
from protege.store import call_key
from protege.teachers import make_teacher
from protege.teachers.embed import EmbeddingTeacher, Layout, pool_tokens, read_layout

MINILM = "embed:all-minilm-l6-v2"
TASK = TaskConfig(instruction="Classify the customer support message by its intent.", labels=LABELS)
TEXTS = ["I was charged twice for my order", "where is my parcel? it's a week late", "the app crashes on login"]


@pytest.fixture(scope="module")
def minilm() -> EmbeddingTeacher:
    teacher = make_teacher(TeacherConfig(model=MINILM, batch_size=2))  # batch 2: three texts take two batches
    assert isinstance(teacher, EmbeddingTeacher)
    teacher.load()
    return teacher


def test_construction_loads_no_weights_and_the_identity_holds_what_decides_the_answer():
    teacher = make_teacher(TeacherConfig(model=MINILM))
    assert (teacher.kind, teacher.method) == ("local", "embedding")
    assert teacher._model is None  # weights load on the first call, so a cached run never loads them
    ident = teacher.identity
    weights = resolve_source("all-minilm-l6-v2").fingerprint()
    assert ident["weights"] == weights and weights.startswith("model.safetensors:")
    # the packaged model's sentence-transformers layout: mean pooling, a Normalize module, trained at 256 tokens
    assert (ident["pooling"], ident["normalize"], ident["max_length"]) == ("mean", True, 256)
    assert {"backend", "model", "method", "score_temperature", "dtype", "prototypes"} <= set(ident)
    assert make_teacher(TeacherConfig(model=MINILM, max_length=64)).identity["max_length"] == 64


def test_probabilities_are_a_distribution_over_the_task_labels_in_their_order(minilm):
    signals = minilm.signals([render_request(TASK, t) for t in TEXTS])
    assert len(signals) == len(TEXTS)
    for s in signals:
        d = s.distribution
        assert d.labels == tuple(LABELS) and d.method == "embedding"
        assert math.isclose(sum(d.probs), 1.0, abs_tol=1e-9) and all(0 < p < 1 for p in d.probs)
        cosines = torch.tensor(s.logits[0]) * minilm.cfg.score_temperature
        assert cosines.abs().max() <= 1 + 1e-5  # logits are cosines / T
        assert torch.allclose(torch.softmax(torch.tensor(s.logits[0], dtype=torch.float64), -1), torch.tensor(d.probs, dtype=torch.float64))
    assert [s.distribution.top for s in signals] == ["billing", "shipping", "technical"]
    tok = minilm.model_and_tokenizer()[1]
    assert [s.usage["input_tokens"] for s in signals] == [len(tok(t)["input_ids"]) for t in TEXTS]

    # the same labels in another order: the same numbers, in that order
    reordered = TaskConfig(instruction=TASK.instruction, labels=dict(reversed(list(LABELS.items()))))
    again = minilm.signals([render_request(reordered, TEXTS[0])])[0].distribution
    assert again.labels == tuple(reversed(LABELS))
    assert again.probs == pytest.approx(tuple(reversed(signals[0].distribution.probs)), abs=1e-6)


def test_each_label_description_is_classified_as_its_label(minilm):
    signals = minilm.signals([render_request(TASK, description) for description in LABELS.values()])
    assert [s.distribution.top for s in signals] == list(LABELS)


def test_worked_examples_move_the_prototypes_and_are_part_of_the_cache_key(minilm):
    text = "the app crashes every time I open my invoices"  # two topics: zero-shot says technical
    plain = render_request(TASK, text)
    assert minilm.signals([plain])[0].distribution.top == "technical"
    # the same text given as a worked example of billing: it is now billing's
    shots = [FewShotExample(text=text, label="billing"), FewShotExample(text="my parcel is late", label="shipping")]
    shot = render_request(TASK, text, examples=shots)
    assert minilm.signals([shot])[0].distribution.top == "billing"
    assert call_key(minilm.identity, shot.to_json()) != call_key(minilm.identity, plain.to_json())
    # a label without examples keeps its description's prototype; one with examples does not
    same = torch.nn.functional.cosine_similarity(minilm.prototypes(shot), minilm.prototypes(plain))  # (K,)
    assert same[list(LABELS).index("account")].item() == pytest.approx(1.0, abs=1e-6)
    assert same[list(LABELS).index("billing")].item() < 0.95
    # the description counts as one example: one example that contradicts it does not outvote it ...
    odd = render_request(TASK, text, examples=[FewShotExample(text=text, label="cancellation")])
    assert minilm.signals([odd])[0].distribution.top == "technical"
    # ... but the text's nearest neighbours do, as they accumulate
    three = [FewShotExample(text=t, label="cancellation") for t in (text, f"{text}!", f"so {text}")]
    many = render_request(TASK, text, examples=three)
    assert minilm.signals([many])[0].distribution.top == "cancellation"


def test_score_temperature_is_part_of_the_identity_and_only_sharpens(minilm):
    hot = make_teacher(TeacherConfig(model=MINILM, score_temperature=0.5))
    request = render_request(TASK, TEXTS[1])
    assert hot.identity != minilm.identity and hot.identity["score_temperature"] == 0.5
    assert call_key(hot.identity, request.to_json()) != call_key(minilm.identity, request.to_json())
    cold_d, hot_s = minilm.signals([request])[0].distribution, hot.signals([request])[0]
    assert hot_s.distribution.top == cold_d.top  # the same ranking
    assert max(hot_s.distribution.probs) < max(cold_d.probs)  # a hotter softmax is flatter
    assert hot_s.logits[0][0] * 0.5 == pytest.approx(minilm.signals([request])[0].logits[0][0] * 0.05, abs=1e-5)


def test_a_label_run_records_embedding_signals_and_a_rerun_calls_nothing(tiny_recipe):
    recipe = load_recipe(tiny_recipe, overrides={"teacher.model": MINILM, "teacher.few_shot": 1, "teacher.batch_size": 32})
    first = label(recipe, quiet=True)
    assert first.called > 0 and first.cached == 0
    rows = [json.loads(x) for x in (recipe.output_dir / "signals" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == "embedding" and r["teacher_label"] in LABELS for r in rows)
    assert all(math.isclose(sum(r["teacher_probs"]), 1.0, abs_tol=1e-6) for r in rows)
    calls = n_calls(recipe.store_path)

    teacher = make_teacher(recipe.teacher)
    again = label(recipe, quiet=True, teacher=teacher)
    assert again.called == 0 and again.cached == first.examples
    assert n_calls(recipe.store_path) == calls
    assert teacher._model is None  # a fully cached run never loads the weights


# -- models an 'embed:' teacher cannot use, and layouts it reads -------------------------------------------------


def test_a_causal_lm_is_refused_with_the_fix(tiny_lm_dir):
    teacher = make_teacher(TeacherConfig(model=f"embed:{tiny_lm_dir}"))  # construction reads no weights
    with pytest.raises(TeacherError, match=r"LlamaForCausalLM model, not a sentence-embedding encoder; .*hf:"):
        teacher.load()


def test_a_hub_model_that_cannot_be_reached_is_refused_at_construction_with_the_fix():
    with pytest.raises(TeacherError, match=r"cannot read the layout of embedding model 'nobody/no-such-model' from the "
                       r"Hugging Face hub \(LocalEntryNotFoundError.*download the model to a directory"):
        make_teacher(TeacherConfig(model="embed:nobody/no-such-model"))  # offline in tests (conftest)


def test_nan_embeddings_are_refused_naming_the_model(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, pad_token_id=tiny_tokenizer.pad_token_id)
    model = BertModel(cfg)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.fill_(float("nan"))  # broken weights
    model.save_pretrained(tmp_path / "broken")
    tiny_tokenizer.save_pretrained(tmp_path / "broken")
    teacher = make_teacher(TeacherConfig(model=f"embed:{tmp_path / 'broken'}"))
    with pytest.raises(TeacherError, match=rf"embedding model '{tmp_path / 'broken'}' produced NaN"):
        teacher.signals([render_request(TASK, "my app crashes")])


def _layout_dir(root: Path, pooling: dict[str, bool], extra: list[dict] | None = None) -> ModelSource:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (root / "1_Pooling").mkdir(parents=True)
    (root / "modules.json").write_text(json.dumps(modules + (extra or [])))
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling}))
    return ModelSource(str(root), local=True)


def test_the_layout_is_read_from_sentence_transformers_files_and_refused_where_it_cannot_be_followed(tmp_path):
    assert read_layout(ModelSource(str(tmp_path), local=True), "plain") == Layout()  # no layout: mean pooling
    cls = _layout_dir(tmp_path / "cls", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    assert read_layout(cls, "cls") == Layout(pooling="cls", sentence_transformers=True)
    last = _layout_dir(tmp_path / "last", {"pooling_mode_lasttoken": True},
                       [{"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    assert read_layout(last, "last") == Layout(pooling="last", normalize=True, sentence_transformers=True)
    weighted = _layout_dir(tmp_path / "weighted", {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(TeacherError, match="pools with \\['pooling_mode_weightedmean_tokens'\\]; .*exactly one of"):
        read_layout(weighted, "weighted")
    dense = _layout_dir(tmp_path / "dense", {"pooling_mode_mean_tokens": True},
                        [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(TeacherError, match="has a sentence-transformers 'Dense' module"):
        read_layout(dense, "dense")


def test_pooling_ignores_padding_whichever_side_it_is_on():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]],  # right-padded: two real tokens
                           [[9.0, 9.0], [2.0, 2.0], [0.0, 6.0]]])  # left-padded: two real tokens
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool_tokens(hidden, mask, "mean").tolist() == [[2.0, 2.0], [1.0, 4.0]]
    assert pool_tokens(hidden, mask, "max").tolist() == [[3.0, 4.0], [2.0, 6.0]]
    assert pool_tokens(hidden, mask, "last").tolist() == [[3.0, 4.0], [0.0, 6.0]]
    assert pool_tokens(hidden, mask, "cls").tolist() == [[1.0, 0.0], [9.0, 9.0]]  # the first position, as trained


def test_a_cls_layout_changes_the_identity_and_the_embeddings(tmp_path, minilm):
    packaged = Path(resolve_source("all-minilm-l6-v2").name_or_path)
    copy = tmp_path / "minilm-cls"
    copy.mkdir()
    for p in packaged.iterdir():
        if p.is_file():
            (copy / p.name).symlink_to(p)
    (copy / "1_Pooling").mkdir()
    cfg = json.loads((packaged / "1_Pooling" / "config.json").read_text())
    cfg |= {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    cls = make_teacher(TeacherConfig(model=f"embed:{copy}"))
    assert cls.identity["pooling"] == "cls" and cls.identity["weights"] == minilm.identity["weights"]
    mean_vec, cls_vec = minilm.embed(TEXTS[:1])[0], cls.embed(TEXTS[:1])[0]
    assert torch.nn.functional.cosine_similarity(mean_vec, cls_vec).item() < 0.99
