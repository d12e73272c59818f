"""The classifier student's training loop honours max_steps, gradient_accumulation_steps and checkpoint_every:
accumulation gives one big batch's gradients, max_steps caps the steps and the schedule, and a run killed
after a checkpoint resumes to the weights of one never interrupted. And the one optimizer set-up of both
loops: which parameters get weight decay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lm_fixtures import kill_at_checkpoint, one_thread_env

from protege.demo_data import LABELS, make_examples
from protege.recipe import build_recipe
from protege.training.classifier import TrainRow, train_student

NAMES = list(LABELS)
SCRIPT = Path(__file__)


def _student_dir(path: Path, tokenizer: Any, dropout: float) -> Path:
    """A 2-layer BERT classifier over the demo labels, saved with its tokenizer (a 'pretrained' student)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=len(NAMES), id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)},
        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(n: int) -> list[TrainRow]:
    """``n`` demo texts of different lengths with a fixed, peaked teacher distribution and the gold target."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for ex in make_examples(n, seed=5):
        probs = torch.softmax(3 * torch.randn(len(NAMES), generator=g), -1).tolist()
        rows.append(TrainRow(text=ex["text"], teacher_probs=tuple(probs), target=NAMES.index(ex["label"])))
    return rows


def _recipe(student: Path, **training: Any) -> Any:
    train = dict(epochs=1, batch_size=8, learning_rate=1e-2, warmup_fraction=0.0, weight_decay=0.01, seed=0)
    return build_recipe(
        {"task": {"labels": NAMES}, "student": {"model": str(student), "max_length": 32}, "training": train | training}
    )


def _train(student: Path, out: Path, n: int, **training: Any) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    summary = train_student(_recipe(student, **training), _rows(n), out, alpha=0.7, quiet=True)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return summary, log, load_file(out / "model.safetensors")


@pytest.mark.parametrize("accumulation", [2, 3])  # 8 rows as 4 + 4, and as 2 + 3 + 3 (a mean of means is wrong)
def test_accumulated_micro_batches_give_one_big_batchs_gradients_and_weights(tmp_path, tiny_tokenizer, accumulation):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.0)  # no dropout: the same function
    grads: dict[int, list[list[torch.Tensor]]] = {1: [], accumulation: []}
    runs = {}
    for g in grads:
        def keep(opt, args, kwargs, g=g):  # the gradients the optimizer is about to apply
            if type(opt) is torch.optim.AdamW:
                grads[g].append([p.grad.clone() for group in opt.param_groups for p in group["params"]])

        handle = register_optimizer_step_pre_hook(keep)
        try:
            runs[g] = _train(student, tmp_path / f"g{g}", 16, gradient_accumulation_steps=g, max_steps=2)
        finally:
            handle.remove()

    (one, log1, w1), (acc, log_acc, w_acc) = runs[1], runs[accumulation]
    assert acc["gradient_accumulation_steps"] == accumulation and one["steps"] == acc["steps"] == 2
    assert len(grads[1]) == len(grads[accumulation]) == 2  # one optimizer step per 8 rows, not per micro-batch
    for step_a, step_b in zip(grads[1], grads[accumulation]):
        assert any(a.abs().sum() > 0 for a in step_a)
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(b, a)
    for a, b in zip(log1, log_acc):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-5)
    for name, value in w1.items():
        torch.testing.assert_close(w_acc[name], value)
    from safetensors.torch import load_file

    start = load_file(student / "model.safetensors")
    assert any(not torch.equal(start[k], w1[k]) for k in w1 if k in start)  # the step did change the weights


def test_max_steps_caps_optimizer_steps_and_the_schedule_follows(tmp_path, tiny_tokenizer):
    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.0)
    # 16 rows in steps of 4 for 5 epochs would be 20 steps; max_steps stops at 3, and the linear decay reaches 0
    # at step 3, not at step 20
    summary, log, _ = _train(student, tmp_path / "short", 16, epochs=5, batch_size=4, max_steps=3)
    assert summary["steps"] == 3 and [r["step"] for r in log] == [1, 2, 3]
    assert [r["lr"] for r in log] == pytest.approx([1e-2 * 2 / 3, 1e-2 / 3, 0.0])
    # more steps than the epochs hold: max_steps wins and the data is passed over again
    summary, log, _ = _train(student, tmp_path / "long", 8, epochs=1, batch_size=4, max_steps=5)
    assert summary["steps"] == 5 and [r["epoch"] for r in log] == [0, 0, 1, 1, 2]


def test_max_grad_norm_clips_the_step_gradient_and_logs_its_norm_before_clipping(tmp_path, tiny_tokenizer):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.0)
    applied: dict[str, list[float]] = {}
    runs = {}
    for name, clip in (("free", None), ("clipped", 0.05)):
        def keep(opt, args, kwargs, name=name):  # the total norm of the gradient the optimizer is about to apply
            if type(opt) is torch.optim.AdamW:
                g = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
                applied.setdefault(name, []).append(float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(x) for x in g]))))

        handle = register_optimizer_step_pre_hook(keep)
        try:
            runs[name] = _train(student, tmp_path / name, 16, max_steps=2, max_grad_norm=clip)
        finally:
            handle.remove()
    (_, free_log, _), (_, clip_log, _) = runs["free"], runs["clipped"]
    # unclipped, the gradient is well above 0.05 (so the clip below is not vacuous) and no norm is logged
    assert min(applied["free"]) > 0.2 and all("grad_norm" not in r for r in free_log)
    # clipped: the first step's gradient is the same one (same weights, same rows), its logged norm is the
    # unclipped one, and what the optimizer applies is scaled down to 0.05
    assert clip_log[0]["grad_norm"] == pytest.approx(applied["free"][0], rel=1e-4)
    assert applied["clipped"] == pytest.approx([0.05, 0.05], rel=1e-3)
    assert all(r["grad_norm"] > 0.05 for r in clip_log)
    # clipping is on by default, at 1.0 (as transformers.Trainer and the teacher fine-tuning in benchmarks/ do)
    assert build_recipe({"task": {"labels": NAMES}}).training.max_grad_norm == 1.0


def test_a_step_needs_a_row_for_every_micro_batch(tmp_path, tiny_tokenizer):
    from protege.errors import ProtegeError

    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.0)
    with pytest.raises(ProtegeError, match=r"batch_size 2 .* gradient_accumulation_steps \(4\)"):
        _train(student, tmp_path / "out", 8, batch_size=2, gradient_accumulation_steps=4)
    assert not (tmp_path / "out").exists()


def _run(spec: dict[str, Any], tmp: Path, name: str, wait: bool = True) -> Any:
    """Train as ``spec`` says in a fresh process (this file run as a script), one thread like a busy machine;
    with ``wait=False`` only the command, for :func:`kill_at_checkpoint`."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(SCRIPT), str(path)]
    if wait:
        return subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    return cmd


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    # dropout draws random numbers every step: resuming must restore the RNG state too
    student = _student_dir(tmp_path / "bert", tiny_tokenizer, dropout=0.1)
    spec = {"student": str(student), "rows": 16,
            "training": {"batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 8, "checkpoint_every": 2,
                         "warmup_fraction": 0.25}}
    ref = _run({**spec, "out": str(tmp_path / "ref")}, tmp_path, "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    out, ckpt = tmp_path / "run", tmp_path / "run.checkpoint"
    saved_at = kill_at_checkpoint(_run({**spec, "out": str(out), "slow_s": 0.5}, tmp_path, "slow", wait=False), ckpt)
    assert 2 <= saved_at < 8 and not out.exists()

    again = _run({**spec, "out": str(out)}, tmp_path, "again")
    assert again.returncode == 0, again.stderr[-3000:]
    meta, ref_meta = (json.loads((d / "protege.json").read_text()) for d in (out, tmp_path / "ref"))
    assert meta["resumed_from_step"] == saved_at and ref_meta["resumed_from_step"] == 0
    assert not ckpt.exists()  # removed after the final save
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (out, tmp_path / "ref")]
    assert [r["step"] for r in logs[0]] == list(range(1, 9))  # the log of the steps before the kill came back too
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    resumed, uninterrupted = (load_file(d / "model.safetensors") for d in (out, tmp_path / "ref"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)


# -- the optimizer set-up ------------------------------------------------------------------------------------


def _groups(model: torch.nn.Module, **training: Any) -> tuple[set[str], set[str], Any]:
    from protege.training.optim import make_optimizer

    cfg = build_recipe({"training": {"weight_decay": 0.1, "warmup_fraction": 0.5, **training}}).training
    optimizer, scheduler = make_optimizer(model, cfg, lr=1e-3, total_steps=4)
    name = {id(p): n for n, p in model.named_parameters()}
    decay, plain = ({name[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    return decay, plain, scheduler


def test_optimizer_decays_weights_but_not_biases_or_norms(tiny_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    bert = BertForSequenceClassification(BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    ))
    decay, plain, scheduler = _groups(bert)
    names = {n for n, _ in bert.named_parameters()}
    assert decay | plain == names and not decay & plain
    assert plain == {n for n in names if n.endswith(".bias") or "LayerNorm" in n}
    assert {"bert.embeddings.LayerNorm.weight", "classifier.bias", "bert.pooler.dense.bias"} <= plain
    assert {"bert.embeddings.word_embeddings.weight", "classifier.weight",
            "bert.encoder.layer.0.attention.self.query.weight"} <= decay
    # linear warm-up over half of the 4 steps, then down to 0
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4]) and scheduler.get_last_lr()[0] == 0.0

    # a Llama's RMSNorm (its own class, no 'LayerNorm' in its name); frozen parameters are in no group
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attention_bias=True,
    ))
    llama.model.embed_tokens.weight.requires_grad_(False)
    decay, plain, _ = _groups(llama)
    assert "model.embed_tokens.weight" not in decay | plain
    assert plain == {"model.norm.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.post_attention_layernorm.weight"} | {
                     f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkvo"}
    assert {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= decay


if __name__ == "__main__":  # the subprocess of the resume test: python test_train_classifier.py SPEC.json
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("slow_s"):  # stretch every optimizer step, so the test can kill the run between checkpoints
        step = torch.optim.AdamW.step

        def slow_step(self, *a, **kw):
            time.sleep(spec["slow_s"])
            return step(self, *a, **kw)

        torch.optim.AdamW.step = slow_step
    recipe = _recipe(Path(spec["student"]), **spec["training"])
    train_student(recipe, _rows(spec["rows"]), Path(spec["out"]), alpha=0.7, quiet=True)
