"""Builders for the language-model student tests: tiny byte-level BPE tokenizers with a chat template, tiny
random Llama models, recipes and memorisable rows. Nothing is downloaded; everything takes milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

QUESTIONS = [
    ("What is the capital of France?", "Paris is the capital."),
    ("Name a red fruit.", "An apple is red."),
    ("What do cats say?", "Cats say meow, mostly at night."),
    ("How many legs has a spider?", "Eight legs."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("Which animal barks?", "A dog barks."),
    ("What is two plus two?", "Four."),
    ("Where does the sun rise?", "The sun rises in the east, every morning."),
]
CORPUS = [q + " " + a for q, a in QUESTIONS] + [
    "Answer the question briefly. The answer is short and clear.",
    "Explain step by step, then answer.",
]


def make_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus``; a different ``vocab_size`` gives a different tokenizer
    over the same text (other merges), as two model families have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(tokenizer: Any, layers: int = 2, hidden: int = 32, seed: int = 0, tie: bool = False) -> Any:
    """A random LlamaForCausalLM over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def save_model(path: Path, model: Any, tokenizer: Any) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_student(path: Path, model: Any, tokenizer: Any, recipe: Any = None, **summary: Any) -> Path:
    """``model`` saved as `protege train` saves an LM student (weights, tokenizer, card), its card made for
    ``recipe`` (default: a generation recipe whose teacher is the model itself); ``summary``: training figures."""
    from protege.students.card import StudentCard
    from protege.students.lm import save_lm_student

    save_lm_student(model, tokenizer, path, StudentCard.for_lm(recipe or make_recipe(path), tokenizer, model, summary))
    return path


def make_recipe(
    teacher: Path, student: dict[str, Any] | None = None, task: dict[str, Any] | None = None, **training: Any
) -> Any:
    """A generation recipe with an 'hf:' teacher at ``teacher``; training settings as keywords."""
    from protege.recipe import build_recipe

    train = dict(epochs=1, batch_size=4, learning_rate=3e-3, warmup_fraction=0.0, weight_decay=0.0, seed=0)
    train.update(training)
    return build_recipe(
        {
            "task": {"kind": "generation", **(task or {})},
            "teacher": {"model": f"hf:{teacher}"},
            "student": {"max_length": 64, **(student or {})},
            "training": train,
        }
    )


def make_rows(n: int = 8, token_logprobs: list[Any] | None = None) -> list[Any]:
    """``n`` question -> answer rows (the questions repeat past 8), optionally with the teacher's top-k."""
    from protege.training.lm import LMRow

    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        tl = token_logprobs[i] if token_logprobs else None
        rows.append(LMRow(messages=({"role": "user", "content": q},), target=a, token_logprobs=tl))
    return rows


def teacher_token_logprobs(model: Any, tokenizer: Any, rows: list[Any], k: int = 5, with_ids: bool = True) -> list[Any]:
    """The top-k log-probabilities ``model`` gives each token of every row's target, as an hf teacher records
    them (decoded token strings; ids too when ``with_ids``)."""
    import torch

    from protege.signals import TokenLogprobs

    out = []
    for r in rows:
        prompt = tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(r.target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0]  # (T, V)
        lp = torch.log_softmax(logits[len(p_ids) - 1 : -1].float(), -1)  # (n, V): predicts each target token
        top_v, top_i = lp.topk(k, -1)
        tops = []
        for vs, ids in zip(top_v.tolist(), top_i.tolist()):
            d: dict[str, float] = {}
            for v, i in zip(vs, ids):
                d.setdefault(tokenizer.decode([i]), v)
            tops.append(d)
        out.append(
            TokenLogprobs(
                tokens=tuple(tokenizer.decode([t]) for t in t_ids),
                top=tuple(tops),
                tail_mass=tuple((1 - top_v.double().exp().sum(-1)).clamp_min(0).tolist()),
                tokenizer="hf:teacher",
                temperature=1.0,
                ids=tuple(t_ids) if with_ids else None,
                top_ids=tuple(tuple(x) for x in top_i.tolist()) if with_ids else None,
                top_logprobs=tuple(tuple(x) for x in top_v.tolist()) if with_ids else None,
            )
        )
    return out


def train_from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says: {teacher, out, student, training, rows, slow_s, output_dir}. The subprocess tests
    run this through ``python lm_fixtures.py SPEC.json`` (and under torchrun)."""
    from protege.training.lm import train_lm

    if spec.get("slow_s"):  # stretch every optimizer step, so a test can kill the run between checkpoints
        import time

        import torch

        step = torch.optim.AdamW.step

        def slow_step(self, *a, **kw):
            time.sleep(spec["slow_s"])
            return step(self, *a, **kw)

        torch.optim.AdamW.step = slow_step
    recipe = make_recipe(Path(spec["teacher"]), spec.get("student"), **spec.get("training", {}))
    if spec.get("output_dir"):
        recipe.output_dir = Path(spec["output_dir"])
    return train_lm(recipe, make_rows(spec.get("rows", 8)), Path(spec["out"]), quiet=True)


def split_spec(tmp: Path, max_steps: int) -> dict[str, Any]:
    """A spec for comparing processes: a 4-layer teacher, its layers 0 and 3 as student, 'logits' KD, global batch 4
    in 2 micro-batches (2 rows each on one process, 1 row each on each of two)."""
    tok = make_tokenizer()
    teacher = save_model(tmp / "teacher", make_llama(tok, layers=4, seed=0), tok)
    return {
        "teacher": str(teacher),
        "student": {"init": "teacher_layers", "keep_layers": [0, 3]},
        "training": {"distill": "logits", "alpha": 0.5, "batch_size": 4, "gradient_accumulation_steps": 2,
                     "max_steps": max_steps, "learning_rate": 1e-2},
        "rows": 8,
    }


FIXTURES = Path(__file__)


def run_spec(spec: dict[str, Any], tmp: Path, name: str, launcher: list[str], timeout: int = 300) -> Any:
    """Run :func:`train_from_spec` in a subprocess started by ``launcher`` (python, or torchrun); one thread
    each, as on a busy 2-core machine two threads per process would wait on each other."""
    import json
    import subprocess

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return subprocess.run([*launcher, str(FIXTURES), str(path)], env=one_thread_env(), capture_output=True, text=True,
                          timeout=timeout)


def one_thread_env() -> dict[str, str]:
    """The environment of a training subprocess: one thread, offline."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_at_checkpoint(cmd: list[str], ckpt: Path, timeout_s: float = 240) -> int:
    """Start ``cmd`` (a slowed-down training run), kill -9 it once its first checkpoint is on disk, and return the
    step that checkpoint saved."""
    import json
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not (ckpt / "progress.json").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    return json.loads((ckpt / "progress.json").read_text())["step"]


if __name__ == "__main__":
    import json
    import sys

    train_from_spec(json.loads(Path(sys.argv[1]).read_text()))
