"""Tiny real models built in the test session: a 2-layer Llama teacher, a 2-layer BERT classifier and a
word-level tokenizer over the project's own demo texts. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from protege.demo_data import LABELS, make_examples

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[CLS]", "[SEP]"]
    words = set()
    for row in make_examples(500, seed=0) + make_examples(200, seed=1):
        words.update(re.findall(r"\w+|[^\w\s]", row["text"]))
    prompt_words = "Classify the customer support message by its intent Labels Text Which label fits text Answer with one of N A MASK x".split()
    for name, desc in LABELS.items():
        words.update(re.findall(r"\w+|[^\w\s]", f"{name} {desc}"))
    words.update(prompt_words)
    vocab = {t: i for i, t in enumerate(special + sorted(words - set(special)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer random Llama causal LM (hidden 32) saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer random BERT sequence classifier over the demo labels (hidden 32)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    names = list(LABELS)
    cfg = BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-cls")
    BertForSequenceClassification(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def padded_batch(vocab: int = 120) -> dict:
    """Three rows of 9 random word-piece ids below ``vocab``, the second padded after 5 tokens and the third after
    2 (padding id 0, on the right, as BERT tokenizers pad)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def demo_rows(n: int, seed: int = 3, other: float = 0.05) -> list:
    """Training rows of ``n`` demo tickets whose teacher puts ``other`` on every wrong label and the rest on the
    ticket's own (ids r0, r1, ...)."""
    from protege.training.classifier import TrainRow

    names = list(LABELS)
    rows = []
    for i, ex in enumerate(make_examples(n, seed=seed)):
        p = [other] * len(names)
        p[names.index(ex["label"])] = 1 - other * (len(names) - 1)
        rows.append(TrainRow(ex["text"], tuple(p), names.index(ex["label"]), id=f"r{i}"))
    return rows


def sql(db: Path, q: str, *args) -> list[tuple]:
    """Rows of a query on a store, read directly with sqlite3 (not through protege's Store)."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute(q, args).fetchall()


def served(db: Path) -> list[dict]:
    """The store's served-traffic ledger, oldest first."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM served ORDER BY id")]


def stored_calls(db: Path) -> dict[str, dict]:
    """Every recorded call by key, oldest first: its request and (answered calls, else None) its signal as JSON,
    read through the Store, which keeps them compact (protege._compact)."""
    from protege.store import Store

    keys = [k for (k,) in sql(db, "SELECT key FROM calls ORDER BY rowid")]
    with Store(db) as store:
        requests, signals = store.requests(keys), store.get_signals(keys)
    return {k: {"request": requests[k], "signal": json.loads(json.dumps(signals[k].to_json())) if k in signals
                else None} for k in keys}


def asks(call: dict, text: str) -> bool:
    """Whether a call of :func:`stored_calls` asked about ``text`` (it is in one of the request's messages)."""
    return any(text in m["content"] for m in call["request"]["messages"])


def n_calls(db: Path) -> int:
    return sql(db, "SELECT COUNT(*) FROM calls")[0][0]


@pytest.fixture
def tiny_recipe(tmp_path, tiny_lm_dir, tiny_classifier_dir):
    """A recipe file over 60 demo texts with the tiny teacher and a tiny scratch student."""
    import yaml

    write_jsonl(tmp_path / "data.jsonl", make_examples(60, seed=3))
    recipe = {
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": f"hf:{tiny_lm_dir}", "batch_size": 4},
        "student": {"model": str(tiny_classifier_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2},
        "training": {"epochs": 2, "batch_size": 8},
        "eval": {"latency_samples": 4},
        "output_dir": "out",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def openai_fake(monkeypatch):
    """An in-process OpenAI API (tests/openai_fake.py) that every ``openai:`` teacher protege builds in the test
    sends through, with the engine's exponential backoff off (Retry-After still counts), so retries cost no
    wall time. Configure it through its attributes (``plan``, ``choose``, ``key``, ``latency``, ...)."""
    import protege.labeling.engine as engine
    from openai_fake import FakeOpenAI

    monkeypatch.setattr(engine, "wait_exponential_jitter", lambda **kw: lambda state: 0.0)
    fake = FakeOpenAI().install(monkeypatch)
    yield fake
    fake.close()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: with tiny matrices one thread is fastest, and on a busy 2-core machine
    two threads wait on each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
