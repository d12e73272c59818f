"""On-policy distillation (training.distill: on_policy, GKD): the loss of a step against a hand computation (the
student's samples drawn again by hand, the teacher's forward, each divergence over the full vocabulary), a CLI
run that brings the student nearer the teacher on its own samples, the refusals, and kill/resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from lm_fixtures import (
    FIXTURES, kill_at_checkpoint, make_llama, make_recipe, make_rows, make_tokenizer, run_spec, save_model,
)
from test_lm_e2e import sharp_teacher, write_recipe  # noqa: F401 (sharp_teacher is a fixture)

from protege.cli import cli
from protege.students.chat import ChatFormat, prompt_ids
from protege.students.lm import build_lm_student, load_causal_lm
from protege.training.lm import _collate, _encode, _Example, _on_policy_examples, _StudentLoss, train_lm
from protege.training.on_policy import sample_replies, sample_seed, sampled_step
from protege.training.steps import micro_batches

MAX_NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a scaled-up head, so its next-token distributions are peaked (a random model's
    are nearly uniform, and every divergence to them nearly 0)."""
    tok = make_tokenizer()
    model = make_llama(tok, layers=2, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return save_model(tmp_path_factory.mktemp("op-teacher"), model, tok)


def _recipe(teacher: Path, **training):
    settings = dict(distill="on_policy", on_policy_max_tokens=MAX_NEW, max_steps=1, batch_size=2,
                    gradient_accumulation_steps=2, temperature=1.0, seed=3) | training
    return make_recipe(teacher, {"init": "teacher_layers", "keep_layers": [0]}, **settings)


def _hand_sample(model, prompt: list[int], stop_ids: tuple[int, ...], temperature: float, seed: int) -> list[int]:
    """The student's reply drawn by hand: full forward passes (no cache), softmax(logits / T), one generator."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # (V,)
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt) :]


def _hand_divergence(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-token divergence (n,) from student log-probs log_q and teacher log-probs log_p (n, V), written out."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse_kl":  # KL(q || p)
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "forward_kl":  # KL(p || q)
        return (p * (log_p - log_q)).sum(-1)
    m = beta * p + (1 - beta) * q  # generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m)
    return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_one_step_loss_equals_the_hand_computation(tmp_path, teacher_dir, divergence):
    """Step 1 of an on-policy run: the loop's loss is sum over the student's sampled tokens of D(teacher,
    student) over the full vocabulary, divided by the number of sampled tokens of the step; the loss module's
    gradients equal autograd's through the hand-written loss."""
    extra = {} if divergence == "reverse_kl" else {"divergence": divergence}  # reverse KL is the default
    extra |= {"jsd_beta": 0.3} if divergence == "jsd" else {}
    recipe = _recipe(teacher_dir, on_policy_temperature=0.8, **extra)
    assert recipe.training.divergence == divergence
    rows = make_rows(6)
    teacher, tok = load_causal_lm(str(teacher_dir))
    teacher.eval()
    model, _ = build_lm_student(recipe, (teacher, tok))
    model.eval()
    stop_ids = ChatFormat.of(tok, model).stop_ids

    # the step's prompts, one per micro-batch, and the student's reply to each, drawn by hand
    _, _, mine = micro_batches(0, len(rows), recipe.training.seed, 2, 2, 1, 0)
    prompts = [prompt_ids(tok, rows[i].messages) for [i] in mine]
    replies = [_hand_sample(model, p, stop_ids, 0.8, sample_seed(3, 0, j, 0)) for j, p in enumerate(prompts)]
    assert all(1 <= len(r) <= MAX_NEW for r in replies)

    # the loop's sampler draws the very same tokens (through the KV cache)
    examples, _ = _encode(recipe, rows, tok)
    for j, [i] in enumerate(mine):
        [drawn] = _on_policy_examples(model, [examples[i]], stop_ids, 64, recipe.training, sample_seed(3, 0, j, 0))
        assert drawn.ids == prompts[j] + replies[j] and drawn.n_prompt == len(prompts[j])
    assert model.training is False  # sampling puts the mode back

    # by hand: per-token divergence at every student-written position (prompt and padding left out), summed
    # over the step, divided once by the step's number of student tokens
    params = [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight]
    total = torch.zeros(())
    for p, r in zip(prompts, replies):
        ids = torch.tensor([p + r])
        s = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()  # (n, V): predicts each reply token
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, len(p) - 1 : -1].float()  # (n, V)
        total = total + _hand_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), divergence, 0.3).sum()
    n_tokens = sum(map(len, replies))
    ref = total / n_tokens
    ref.backward()
    ref = ref.detach()
    ref_grads = [x.grad.clone() for x in params]
    model.zero_grad(set_to_none=True)

    # the loss module on the same samples (right-padded into one batch): the same sum, the same gradients
    sampled = [_Example(p + r, len(p), 1.0, [], []) for p, r in zip(prompts, replies)]
    batch = _collate(sampled, tok.pad_token_id, False)
    with torch.no_grad():
        th = teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t_out = (th.last_hidden_state[batch["select"]], teacher.lm_head.weight, None)  # (M, H) and the head
    loss_sum, ce_sum, kd_sum = _StudentLoss(model, recipe)(batch, t_out, True)
    assert float(ce_sum) == 0.0  # no cross-entropy with the student's own samples
    torch.testing.assert_close(loss_sum / n_tokens, ref, rtol=1e-5, atol=1e-6)
    (loss_sum / n_tokens).backward()
    for x, g in zip(params, ref_grads):
        torch.testing.assert_close(x.grad, g, rtol=1e-4, atol=1e-7)
    assert ref_grads[0].abs().sum() > 0

    # the whole loop, one optimizer step: the logged loss is the hand value
    summary = train_lm(recipe, rows, tmp_path / "student", quiet=True)
    [rec] = [json.loads(x) for x in (tmp_path / "student/train_log.jsonl").read_text().splitlines()]
    assert rec["on_policy"] is True and rec["target_tokens"] == n_tokens and rec["ce_loss"] == 0.0
    hand = pytest.approx(float(ref), rel=1e-5, abs=1e-6)  # float32 sums in another order
    assert rec["loss"] == hand and rec["kd_loss"] == hand
    assert summary["on_policy"] == {"fraction": 1.0, "temperature": 0.8, "max_tokens": MAX_NEW, "sampled_steps": 1,
                                    "sampled_tokens": n_tokens}
    assert summary["divergence"] == divergence and summary["alpha"] == 1.0


def test_sampling_is_fixed_by_the_seed_and_leaves_the_mode(teacher_dir):
    tok = make_tokenizer()
    model = make_llama(tok, layers=1, seed=1).train()
    prompt = prompt_ids(tok, ({"role": "user", "content": "Name a red fruit."},))
    draw = [sample_replies(model, [prompt, prompt], stop_ids=(tok.eos_token_id,), max_new_tokens=12, temperature=1.0,
                           seed=s) for s in (5, 5, 6)]
    assert draw[0] == draw[1] and draw[0] != draw[2]  # the same seed, the same samples
    assert draw[0][0] != draw[0][1]  # one generator for the batch: the two prompts get their own draws
    assert model.training  # back in train mode after sampling in eval mode
    # at a temperature near 0 sampling is greedy
    greedy = sample_replies(model, [prompt], stop_ids=(), max_new_tokens=5, temperature=1e-4, seed=0)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == ids[len(prompt) :]


def test_lambda_mixes_sampled_and_teacher_written_steps(tmp_path, teacher_dir):
    """on_policy_fraction 0.5: about half the steps sample (which ones fixed by the seed); the others are 'logits'
    steps on the teacher's replies, with their cross-entropy."""
    recipe = _recipe(teacher_dir, on_policy_fraction=0.5, max_steps=8, alpha=0.5)
    expect = [sampled_step(3, s, 0.5) for s in range(8)]
    assert 0 < sum(expect) < 8
    assert all(sampled_step(3, s, 1.0) for s in range(8)) and not any(sampled_step(3, s, 0.0) for s in range(8))
    summary = train_lm(recipe, make_rows(8), tmp_path / "student", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "student/train_log.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in log] == expect
    for r in log:
        assert (r["ce_loss"] == 0.0) == r["on_policy"]  # teacher-written steps: (1 - alpha) CE + alpha D
        if not r["on_policy"]:
            assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
    assert summary["alpha"] == 0.5 and summary["on_policy"]["sampled_steps"] == sum(expect)


def _kl_on_own_samples(model, teacher, tok, rows, seed: int = 0) -> float:
    """Mean per-token KL(student || teacher) over replies the student samples to ``rows``' prompts."""
    stop_ids = ChatFormat.of(tok, model).stop_ids
    total = n = 0.0
    for i, r in enumerate(rows):
        p = prompt_ids(tok, r["messages"])
        [reply] = sample_replies(model, [p], stop_ids=stop_ids, max_new_tokens=16, temperature=1.0, seed=seed + i)
        ids = torch.tensor([p + reply])
        with torch.no_grad():
            log_q = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        total += float((log_q.exp() * (log_q - log_p)).sum())
        n += len(reply)
    return total / n


def test_cli_run_on_policy_nears_the_teacher_and_writes_the_card(tmp_path, sharp_teacher):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from protege.labeling.labeler import read_signals
    from protege.recipe import load_recipe

    path = write_recipe(tmp_path, sharp_teacher, "on_policy", on_policy_max_tokens=16)
    spec = yaml.safe_load(path.read_text())
    del spec["training"]["alpha"]  # every step samples (fraction 1): alpha has nothing to weigh, and is refused
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    recipe = load_recipe(path)
    teacher, tok = load_causal_lm(str(sharp_teacher))
    before_model, _ = build_lm_student(recipe, (teacher, tok))

    res = CliRunner().invoke(cli, ["run", str(path), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    meta = json.loads((out / "student/protege.json").read_text())
    assert meta["distill"] == "on_policy" and meta["divergence"] == "reverse_kl" and meta["alpha"] == 1.0
    assert meta["steps"] == 12 and meta["on_policy"]["sampled_steps"] == 12 and meta["on_policy"]["fraction"] == 1.0
    assert meta["on_policy"]["temperature"] == 1.0 and meta["on_policy"]["max_tokens"] == 16
    assert 0 < meta["on_policy"]["sampled_tokens"] <= 12 * 6 * 16
    card = (out / "student/README.md").read_text()
    assert "on-policy distillation (GKD" in card and "λ = 1" in card and "KL(q_student^τ ‖ p_teacher^τ)" in card

    eval_rows = read_signals(recipe, "eval")
    trained = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    before = _kl_on_own_samples(before_model.eval(), teacher.eval(), tok, eval_rows)
    after = _kl_on_own_samples(trained, teacher, tok, eval_rows)
    assert after < before / 2, (before, after)  # on its own samples, on held-out prompts (measured 0.33 -> 0.06)

    report = json.loads((out / "report.json").read_text())
    s = report["models"]["student"]
    from test_lm_e2e import untrained

    assert s["distill"] == "on_policy" and s["kl_to_teacher"] < untrained(path)["kl_to_teacher"]


def test_refusals(tmp_path, tiny_lm_dir, tiny_recipe):
    from protege.recipe import RecipeError, build_recipe

    def refused(spec: dict) -> str:
        with pytest.raises(RecipeError) as e:
            build_recipe(spec)
        return str(e.value)

    gen = {"task": {"kind": "generation"}, "teacher": {"model": f"hf:{tiny_lm_dir}"}}
    # an API teacher gives only the top-k of its own tokens, not its log-probabilities on the student's tokens;
    # a server that scores given tokens (vLLM, llama.cpp) can (tests/test_teacher_scoring.py)
    msg = refused({**gen, "teacher": {"model": "openai:gpt-4o-mini"}, "student": {"model": str(tiny_lm_dir)},
                   "training": {"distill": "on_policy"}})
    assert "returns only the top-k of its own tokens" in msg and "teacher.provider 'vllm' or 'llamacpp'" in msg
    assert "'hf:' teacher with the student's tokenizer" in msg
    build_recipe({**gen, "teacher": {"model": "openai:m", "provider": "vllm"}, "student": {"model": str(tiny_lm_dir)},
                  "training": {"distill": "on_policy"}})
    # the on-policy settings without on-policy, alpha with every step sampled, samples as long as the context
    msg = refused({**gen, "training": {"on_policy_temperature": 0.7}})
    assert "training.on_policy_temperature configures the student's own samples" in msg and "distill: on_policy" in msg
    msg = refused({**gen, "training": {"distill": "on_policy", "alpha": 0.5}})
    assert "training.alpha" in msg and "on_policy_fraction below 1" in msg
    build_recipe({**gen, "training": {"distill": "on_policy", "alpha": 0.5, "on_policy_fraction": 0.5}})
    long = {"distill": "on_policy", "on_policy_max_tokens": 64}
    msg = refused({**gen, "student": {"max_length": 64}, "training": long})
    assert "on_policy_max_tokens 64 leaves no room for the prompt in student.max_length 64" in msg
    assert build_recipe({**gen, "training": {"distill": "on_policy", "divergence": "jsd"}}).training.divergence == "jsd"

    # a classification task, through the CLI: exit 2 before any work
    spec = yaml.safe_load(tiny_recipe.read_text())
    spec["training"]["distill"] = "on_policy"
    tiny_recipe.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 2 and "training.distill picks what language-model students" in res.output
    assert "set task.kind: generation" in res.output and not (tmp_path / "out").exists()


def test_a_student_with_another_tokenizer_is_refused(tmp_path, tiny_lm_dir):
    """The teacher scores the student's token ids: another vocabulary is refused at start-up, nothing written."""
    tok = make_tokenizer(380)
    other = save_model(tmp_path / "other", make_llama(tok), tok)
    path = write_recipe(tmp_path, tiny_lm_dir, "on_policy", on_policy_fraction=0.5)
    spec = yaml.safe_load(path.read_text())
    spec["student"] = {"init": "pretrained", "model": str(other), "max_length": 96}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = CliRunner().invoke(cli, ["run", str(path), "-q"])
    assert res.exit_code == 2 and "tokenizers differ" in res.output and "cannot be compared one to one" in res.output
    assert not (tmp_path / "out/student").exists()


def test_killed_on_policy_run_resumes_to_the_uninterrupted_result(tmp_path, teacher_dir):
    """The samples of a step are fixed by the seed and the step, so a run killed after a checkpoint and rerun
    draws what the uninterrupted run drew, and ends with the same weights."""
    from safetensors.torch import load_file

    spec = {
        "teacher": str(teacher_dir),
        "student": {"init": "teacher_layers", "keep_layers": [0], "lora_r": 4, "lora_dropout": 0.1},
        "training": {"distill": "on_policy", "on_policy_fraction": 0.75, "on_policy_max_tokens": MAX_NEW,
                     "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 6, "checkpoint_every": 2,
                     "learning_rate": 1e-2, "warmup_fraction": 0.0, "alpha": 0.5, "temperature": 1.0},
        "rows": 8,
    }
    ref = run_spec({**spec, "out": str(tmp_path / "ref")}, tmp_path, "ref", [sys.executable])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, ckpt, path = tmp_path / "run", tmp_path / "run.checkpoint", tmp_path / "slow.json"
    path.write_text(json.dumps({**spec, "out": str(out), "slow_s": 0.5}))
    saved_at = kill_at_checkpoint([sys.executable, str(FIXTURES), str(path)], ckpt)
    assert 2 <= saved_at < 6 and not out.exists()
    again = run_spec({**spec, "out": str(out)}, tmp_path, "again", [sys.executable])
    assert again.returncode == 0, again.stderr[-3000:]

    meta, ref_meta = (json.loads((d / "protege.json").read_text()) for d in (out, tmp_path / "ref"))
    assert meta["resumed_from_step"] == saved_at and meta["on_policy"] == ref_meta["on_policy"]
    assert 0 < meta["on_policy"]["sampled_steps"] < 6  # both kinds of step were in the run
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (out, tmp_path / "ref")]
    assert [(r["on_policy"], r["target_tokens"], r["loss"]) for r in logs[0]] == \
        [(r["on_policy"], r["target_tokens"], r["loss"]) for r in logs[1]]
    resumed, uninterrupted = (load_file(d / "model.safetensors") for d in (out, tmp_path / "ref"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert not math.isnan(meta["final_loss"])


def test_several_prompts_sample_together_as_each_would_alone():
    """Prompts of different lengths decode as one left-padded batch: at a temperature near 0 each reply is the one
    the prompt gets alone (the serving loop), a stop token ends a row (kept, nothing after it), and the rest run on."""
    tok = make_tokenizer()
    model = make_llama(tok, layers=2, seed=4).train()
    texts = ["Name a red fruit.", "What is two plus two? Answer in words, please.", "Hi"]
    prompts = [prompt_ids(tok, ({"role": "user", "content": t},)) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    alone = [sample_replies(model, [p], stop_ids=(), max_new_tokens=10, temperature=1e-4, seed=0)[0] for p in prompts]
    together = sample_replies(model, prompts, stop_ids=(), max_new_tokens=10, temperature=1e-4, seed=0)
    assert together == alone and all(len(r) == 10 for r in together)
    stop = alone[1][3]  # a token the second reply writes at its fourth step: it ends there
    stopped = sample_replies(model, prompts, stop_ids=(stop,), max_new_tokens=10, temperature=1e-4, seed=0)
    for reply, whole in zip(stopped, alone):
        cut = whole.index(stop) + 1 if stop in whole else len(whole)
        assert reply == whole[:cut]
    assert stopped[1] == alone[1][:4] and model.training
