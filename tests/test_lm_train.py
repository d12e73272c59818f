"""Causal LM students: each distillation mode trains end to end, the loss sees only answer tokens, teacher-layer
and LoRA students, accumulation normalization, and the refusals. Tiny random Llamas; seconds each."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import CORPUS, make_llama, make_recipe, make_rows, make_tokenizer, save_model, teacher_token_logprobs

from protege.errors import ProtegeError
from protege.students.lm import build_lm_student, default_keep_layers, load_lm_student
from protege.training.lm import LMRow, _collate, _encode, _StudentLoss, train_lm

OTHER_CORPUS = CORPUS + ["Zebras and yaks graze quietly while xylophones play.", "Quick brown foxes jump over lazy dogs."]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    return make_llama(tok, layers=4, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok, teacher) -> Path:
    return save_model(tmp_path_factory.mktemp("teacher"), teacher, tok)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# -- each mode, end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sequence", "logits", "topk"])
def test_each_mode_learns_and_saves_a_plain_transformers_model(tmp_path, tok, teacher, teacher_dir, mode):
    from transformers import AutoModelForCausalLM

    rows = make_rows(8, teacher_token_logprobs(teacher, tok, make_rows(8), k=5) if mode == "topk" else None)
    recipe = make_recipe(
        teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 3]}, distill=mode, epochs=20,
        learning_rate=1e-2, alpha=0.5, temperature=2.0,
    )
    out = tmp_path / "student"
    summary = train_lm(recipe, rows, out, quiet=True)

    log = _log(out)
    assert len(log) == summary["steps"] == 40  # 8 rows, batch 4, 20 epochs
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], [r["loss"] for r in log]
    if mode == "sequence":
        assert all(r["kd_loss"] == 0 for r in log) and log[0]["ce_loss"] == pytest.approx(log[0]["loss"])
    else:  # the mix: (1 - alpha) CE + alpha KD, logged apart
        assert log[0]["kd_loss"] > 0
        assert log[0]["loss"] == pytest.approx(0.5 * log[0]["ce_loss"] + 0.5 * log[0]["kd_loss"], rel=1e-5)
    if mode == "topk":  # same tokenizer: the teacher's ids are used directly, every answer token aligned
        assert summary["topk"]["aligned_share"] == 1.0 and summary["topk"]["rows_by_id"] == 8

    meta = json.loads((out / "protege.json").read_text())
    assert meta["kind"] == "causal_lm" and meta["distill"] == mode and meta["layers"] == 2
    assert (out / "recipe.yaml").is_file() and not (out.parent / "student.checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    assert model.config.num_hidden_layers == 2
    _, tok2, meta2 = load_lm_student(out)
    assert meta2.summary["final_loss"] == log[-1]["loss"] and len(tok2) == len(tok)


# -- the loss sees only answer tokens -----------------------------------------------------------------------


def test_loss_is_on_answer_tokens_only(tok, teacher_dir):
    recipe = make_recipe(teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 1]})
    model, _ = build_lm_student(recipe)
    rows = [LMRow(({"role": "user", "content": "What do cats say?"},), "Cats say meow."),
            LMRow(({"role": "user", "content": "Which animal barks?"},), "A dog barks.")]
    examples, _ = _encode(recipe, rows, tok)
    batch = _collate(examples, tok.pad_token_id, with_kd=False)

    for b, r in enumerate(rows):
        target = tok(r.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = tok(tok.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        assert examples[b].ids == prompt + target and examples[b].n_prompt == len(prompt)
        # exactly the positions that predict a target token are selected
        picked = batch["select"][b].nonzero().flatten().tolist()
        assert picked == list(range(len(prompt) - 1, len(prompt) + len(target) - 1))
    assert batch["targets"].tolist() == [t for e in examples for t in e.ids[e.n_prompt :]]

    # the chunked loss equals cross-entropy over the full logits at those positions and nowhere else
    loss_sum, _, _ = _StudentLoss(model, recipe)(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    ref = F.cross_entropy(logits[batch["select"]], batch["targets"], reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-5)
    everywhere = F.cross_entropy(logits[:, :-1][batch["attention_mask"][:, 1:].bool()],
                                 batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:].bool()], reduction="sum")
    assert everywhere > ref + 1.0  # the prompt positions would have counted


def test_prompt_cut_from_its_start_and_too_long_targets_reported(tmp_path, tok, teacher_dir):
    recipe = make_recipe(teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 1], "max_length": 24})
    long_prompt = "Answer the question briefly. " * 6 + "What is two plus two?"
    rows = [LMRow(({"role": "user", "content": long_prompt},), "Four."),
            LMRow(({"role": "user", "content": "Name a red fruit."},), "An apple is red. " * 8)]
    examples, stats = _encode(recipe, rows, tok)
    assert stats["rows_too_long"] == 1 and stats["prompts_cut"] == 1 and len(examples) == 1
    e = examples[0]
    full = tok(tok.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    target = tok("Four.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(e.ids) == 24 and e.ids[e.n_prompt :] == target and e.ids[: e.n_prompt] == full[-e.n_prompt :]

    summary = train_lm(recipe, rows, tmp_path / "s", quiet=True)
    assert summary["rows_too_long"] == 1 and summary["train_examples"] == 1
    with pytest.raises(ProtegeError, match="student.max_length"):
        train_lm(recipe, rows[1:], tmp_path / "t", quiet=True)


def test_rationale_gives_answer_and_explain_examples(tok, teacher_dir):
    recipe = make_recipe(
        teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 1]}, {"answer_format": "rationale"}, rationale_weight=0.5
    )
    row = LMRow(({"role": "user", "content": "What is two plus two?"},), "Two and two make four.\nAnswer: Four.",
                answer="Four.", rationale="Two and two make four.")
    examples, stats = _encode(recipe, [row], tok)
    assert stats["train_examples"] == 2
    answer, explain = examples
    assert tok.decode(answer.ids[: answer.n_prompt]).count("[answer] What is two") == 1
    assert tok.decode(explain.ids[: explain.n_prompt]).count("[explain] What is two") == 1
    assert tok.decode(answer.ids[answer.n_prompt : -1]) == "Four."
    assert tok.decode(explain.ids[explain.n_prompt : -1]) == "Two and two make four."
    assert (answer.weight, explain.weight) == (1.0, 0.5)
    # the explain tokens count with weight 0.5 in the step's loss sum (and in the count it is divided by)
    model, _ = build_lm_student(recipe)
    loss_fn = _StudentLoss(model, recipe)
    both = loss_fn(_collate(examples, tok.pad_token_id, False))[0]
    a, e = (loss_fn(_collate([replace(x, weight=1.0)], tok.pad_token_id, False))[0] for x in examples)
    torch.testing.assert_close(both, a + 0.5 * e)


# -- teacher-layer and LoRA students ------------------------------------------------------------------------


def test_default_keep_layers():
    assert default_keep_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert default_keep_layers(7, 3) == [0, 3, 6]
    assert default_keep_layers(4, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("tie", [False, True])
def test_teacher_layers_keep_the_teachers_weights_and_generate(tmp_path, tok, tie):
    teacher = make_llama(tok, layers=4, seed=3, tie=tie)
    tdir = save_model(tmp_path / "t", teacher, tok)
    student, _ = build_lm_student(make_recipe(tdir, {"init": "teacher_layers", "keep_layers": [0, 2]}))

    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2]):
        for name, value in student.model.layers[new].state_dict().items():
            torch.testing.assert_close(value, t_sd[f"model.layers.{old}.{name}"], rtol=0, atol=0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(s_sd[name], t_sd[name], rtol=0, atol=0)
    tied = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied == tie

    # generation with the KV cache (indexed by the renumbered layers) equals generation without it
    prompt = torch.tensor([tok(tok.apply_chat_template([{"role": "user", "content": "Name a red fruit."}],
                                                       tokenize=False, add_generation_prompt=True))["input_ids"]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with_cache = student.generate(prompt, use_cache=True, **kw)
    without = student.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == prompt.shape[1] + 8 and torch.equal(with_cache, without)

    with pytest.raises(ProtegeError, match="keep_layers"):
        build_lm_student(make_recipe(tdir, {"init": "teacher_layers", "keep_layers": [0, 4]}))


def test_lora_trains_only_adapters_and_saves_merged(tmp_path, tok, teacher_dir):
    from transformers import AutoModelForCausalLM

    student = {"init": "teacher_layers", "keep_layers": [0, 3], "lora_r": 4, "lora_dropout": 0.0}
    recipe = make_recipe(teacher_dir, student, epochs=3, learning_rate=1e-2)
    model, _ = build_lm_student(recipe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # 'all-linear' leaves out the LM head

    out = tmp_path / "lora"
    summary = train_lm(recipe, make_rows(8), out, quiet=True)
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 4
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = build_lm_student(make_recipe(teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 3]}))[0].state_dict()
    assert set(merged) == set(base)  # no adapter tensors left: a plain Llama
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(n.split(".")[-2] in linear for n in changed)  # embeddings, norms, head untouched


def test_scratch_lm_student_is_refused(teacher_dir):
    with pytest.raises(ProtegeError, match="scratch"):
        build_lm_student(make_recipe(teacher_dir, {"model": str(teacher_dir), "init": "scratch"}))


# -- gradient clipping ----------------------------------------------------------------------------------------


def test_max_grad_norm_clips_the_lm_step_and_logs_the_norm_before_clipping(tmp_path, tok, teacher_dir):
    from safetensors.torch import load_file

    student = {"init": "teacher_layers", "keep_layers": [0, 3], "max_length": 64}
    runs = {}
    for name, clip in (("free", None), ("loose", 1e9), ("tight", 1e-6)):
        recipe = make_recipe(teacher_dir, student, max_steps=2, learning_rate=1e-2, max_grad_norm=clip)
        train_lm(recipe, make_rows(8), tmp_path / name, quiet=True)
        runs[name] = (_log(tmp_path / name), load_file(tmp_path / name / "model.safetensors"))
    assert all("grad_norm" not in r for r in runs["free"][0])
    # the norm before clipping, the same with any threshold (the first step starts from the same weights)
    assert runs["tight"][0][0]["grad_norm"] == pytest.approx(runs["loose"][0][0]["grad_norm"], rel=1e-5)
    assert all(r["grad_norm"] > 1e-3 for name in ("loose", "tight") for r in runs[name][0])
    # a threshold above the norm changes nothing; one far below it changes the steps (AdamW's eps makes a
    # gradient scaled to 1e-6 of its norm move the weights less)
    for k, v in runs["free"][1].items():
        torch.testing.assert_close(runs["loose"][1][k], v, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(runs["tight"][1][k], v, rtol=1e-4, atol=1e-6) for k, v in runs["free"][1].items())


# -- normalization over the whole accumulated batch ---------------------------------------------------------


def test_accumulation_normalizes_by_the_whole_batch(tmp_path, tok, teacher_dir):
    from safetensors.torch import load_file

    # rows of very different lengths, so a mean of per-micro-batch means would weigh tokens unequally
    rows = [LMRow(({"role": "user", "content": q},), a) for q, a in [
        ("What is two plus two?", "Four."),
        ("Where does the sun rise?", "The sun rises in the east, every morning. " * 3),
        ("Which animal barks?", "A dog barks."),
        ("What colour is the sky?", "The sky is blue on a clear day. The sky is blue."),
        ("Name a red fruit.", "An apple."),  # the second step has this row alone: 3 of 4 micro-batches are empty
    ]]
    student = {"init": "teacher_layers", "keep_layers": [0, 3], "max_length": 128}
    runs = {}
    for acc in (1, 2, 4):
        recipe = make_recipe(teacher_dir, student, batch_size=4, gradient_accumulation_steps=acc, max_steps=2,
                             learning_rate=1e-2)
        train_lm(recipe, rows, tmp_path / f"acc{acc}", quiet=True)
        runs[acc] = (_log(tmp_path / f"acc{acc}"), load_file(tmp_path / f"acc{acc}" / "model.safetensors"))
    assert [r["target_tokens"] for r in runs[1][0]][1] < 10  # one short row
    for acc in (2, 4):
        assert [r["loss"] for r in runs[acc][0]] == pytest.approx([r["loss"] for r in runs[1][0]], rel=1e-6, abs=1e-6)
        for name, value in runs[1][1].items():
            torch.testing.assert_close(runs[acc][1][name], value, rtol=1e-5, atol=1e-5)

    # and the test can fail: with the rows' lengths this uneven, a mean of per-micro-batch means is another loss
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(teacher_dir, student)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "acc1")  # trained: token losses differ
    examples, _ = _encode(recipe, rows, tok)
    fn = _StudentLoss(trained, recipe)
    with torch.no_grad():
        sums = [float(fn(_collate(examples[i : i + 2], tok.pad_token_id, False))[0]) for i in (0, 2)]
    counts = [sum(len(e.ids) - e.n_prompt for e in examples[i : i + 2]) for i in (0, 2)]
    assert max(counts) > 2 * min(counts)
    naive, whole = (sums[0] / counts[0] + sums[1] / counts[1]) / 2, sum(sums) / sum(counts)
    assert abs(naive - whole) > 1e-3  # a thousand times the tolerance the losses above agree to


# -- refusals and tokenizer mapping -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [400, 380])
def test_logits_mode_refuses_a_student_with_another_tokenizer(tmp_path, teacher_dir, vocab):
    other = make_tokenizer(vocab, corpus=OTHER_CORPUS)  # 400: same size, other tokens; 380: other size too
    sdir = save_model(tmp_path / "s", make_llama(other, layers=2, seed=1), other)
    recipe = make_recipe(teacher_dir, {"model": str(sdir)}, distill="logits")
    with pytest.raises(ProtegeError, match="tokenizers differ.*topk. or .sequence"):
        train_lm(recipe, make_rows(4), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_topk_maps_teacher_strings_onto_another_tokenizer(tmp_path, tok, teacher, teacher_dir):
    other = make_tokenizer(400, corpus=OTHER_CORPUS)
    sdir = save_model(tmp_path / "s", make_llama(other, layers=2, seed=1), other)
    rows = make_rows(8, teacher_token_logprobs(teacher, tok, make_rows(8), k=5))
    recipe = make_recipe(teacher_dir, {"model": str(sdir)}, distill="topk", epochs=4, learning_rate=1e-2)
    summary = train_lm(recipe, rows, tmp_path / "out", quiet=True)
    fig = summary["topk"]
    assert fig["rows_by_string"] == 8 and fig["rows_by_id"] == 0
    assert 0.6 < fig["aligned_share"] < 1.0 and 0.0 < fig["unmapped_mass"] < 0.5
    log = _log(tmp_path / "out")
    assert log[0]["kd_loss"] > 0 and log[-1]["loss"] < log[0]["loss"]


def test_topk_strings_only_with_the_same_tokenizer_align_fully(tmp_path, tok, teacher, teacher_dir):
    # an API teacher gives strings, no ids: mapped back onto the very same vocabulary, everything lines up
    rows = make_rows(8, teacher_token_logprobs(teacher, tok, make_rows(8), k=5, with_ids=False))
    recipe = make_recipe(teacher_dir, {"init": "teacher_layers", "keep_layers": [0, 3]}, distill="topk", max_steps=1)
    fig = train_lm(recipe, rows, tmp_path / "out", quiet=True)["topk"]
    assert fig["rows_by_string"] == 8 and fig["aligned_share"] == 1.0
    # what is lost is only alternatives that are a fragment of a character (byte-level pieces decode to U+FFFD,
    # which names no single token)
    tops = [top for r in rows for top in r.token_logprobs.top]
    lost = sum(math.exp(lp) for top in tops for s, lp in top.items() if "\ufffd" in s)
    assert fig["unmapped_mass"] == pytest.approx(lost / sum(math.exp(lp) for top in tops for lp in top.values()))


def test_topk_refused_when_tokens_do_not_line_up(tmp_path, tok, teacher, teacher_dir):
    chars = make_tokenizer(262)  # bytes and a handful of merges: almost no teacher token is a student token
    sdir = save_model(tmp_path / "s", make_llama(chars, layers=2, seed=1), chars)
    rows = make_rows(8, teacher_token_logprobs(teacher, tok, make_rows(8), k=5))
    recipe = make_recipe(teacher_dir, {"model": str(sdir)}, distill="topk")
    with pytest.raises(ProtegeError, match=r"\d+% of the \d+ answer tokens line up.*training.distill: sequence"):
        train_lm(recipe, rows, tmp_path / "out", quiet=True)


def test_lm_head_folds_logit_scales_and_refuses_softcapping():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    from protege.students.lm import lm_head

    small = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, eos_token_id=1, bos_token_id=1, pad_token_id=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    for model in (CohereForCausalLM(CohereConfig(logit_scale=0.25, **small)),  # logits * 0.25
                  GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **small))):  # logits / 4
        h = model.get_decoder()(input_ids=ids).last_hidden_state  # (1, 4, H)
        w, b = lm_head(model)
        torch.testing.assert_close(F.linear(h, w, b), model(input_ids=ids).logits)
    gemma = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **small))
    with pytest.raises(ProtegeError, match="final_logit_softcapping"):
        lm_head(gemma)
