"""Probe, not a feature: would an n-gram bag beside SST-2's student raise what it keeps?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_ngram_bag.py SEED [BUCKETS [LR [EPOCHS]]]

Trains a linear bag of hashed word-piece unigrams and bigrams (fastText without a hidden layer: word-piece ids as
they are, bigrams hashed into BUCKETS - vocabulary further buckets, the mean of their rows is the logits) on the
teacher's labels of runs/sst2/all-SEED (benchmarks/sst2.py's `all` run: same rows, same recipe, same held-out
selection slice), by protege's own train_student with build_student and save_student patched in this process.
Then averages its probabilities with the saved `all` student's, p = w student + (1 - w) bag, and prints for each
w the KL(teacher || mix) on the selection slice (no gold; the way a w would be chosen) and the dev accuracy.

It patches protege's internals and saves nothing; a feature would put the bag in the student's own model (its
size counts: 120,002 parameters at 60,000 buckets and two labels) and its forward (BENCHMARKS.md, SST-2, "an
n-gram bag beside the student").
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import protege.training.classifier as tc
from protege.recipe import load_recipe
from protege.labeling.labeler import read_signals
from protege.lean import encode, classifier_logits
from protege.students.classifier import load_student
from protege.training.select import selection_split

seed = int(sys.argv[1])
BUCKETS = int(sys.argv[2]) if len(sys.argv) > 2 else 60000
LR = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1  # a linear model from zeros: the recipe's 3e-3 left it at 72%
EPOCHS = int(sys.argv[4]) if len(sys.argv) > 4 else None


class Out:
    def __init__(self, logits):
        self.logits = logits


class Bag(nn.Module):
    def __init__(self, vocab, buckets, classes):
        super().__init__()
        self.V, self.buckets = vocab, buckets
        self.bag = nn.EmbeddingBag(buckets, classes, mode="sum")
        nn.init.zeros_(self.bag.weight)
        self.bias = nn.Parameter(torch.zeros(classes))
    def forward(self, input_ids, attention_mask=None, **kw):
        m = attention_mask.float()
        a, b = input_ids[:, :-1], input_ids[:, 1:]
        idx = torch.cat([input_ids, self.V + (a * 1000003 + b) % (self.buckets - self.V)], 1)
        w = torch.cat([m, m[:, :-1] * m[:, 1:]], 1)
        w = w / w.sum(1, keepdim=True).clamp_min(1)
        return Out(self.bag(idx, per_sample_weights=w) + self.bias)

orig_build = tc.build_student
def build(*a, **k):
    model, tok, kept = orig_build(*a, **k)
    return Bag(model.config.vocab_size, BUCKETS, model.config.num_labels), tok, kept
tc.build_student = build
SAVED = {}
tc.save_student = lambda model, tok, tmp, card: SAVED.update(model=model, tok=tok)
tc.write_model_card = lambda tmp: None

over = {}
if LR: over["training"] = {"learning_rate": LR}
if EPOCHS: over.setdefault("training", {})["epochs"] = EPOCHS
r = load_recipe(Path(__file__).resolve().parents[1] / "runs" / "sst2" / f"all-s{seed}" / "recipe.yaml")
if over:
    d = r.model_dump(mode="json"); [d[k].update(v) for k, v in over.items()]; r = type(r).model_validate(d)
torch.set_num_threads(1)
rows = tc.rows_from_signals(r, read_signals(r, "train"))
summary = tc.train_student(r, rows, Path(tempfile.mkdtemp(prefix="probe-bag-")), alpha=1.0, quiet=True)
bag, tok = SAVED["model"].eval(), SAVED["tok"]
student = load_student(r.output_dir / "student")[0].eval()
sf = classifier_logits(student)

def probs(f, texts):
    with torch.inference_mode():
        return np.concatenate([torch.softmax(f(**encode(tok, texts[i:i+64], r.student.max_length)), -1).numpy()
                               for i in range(0, len(texts), 64)])
_, held = selection_split(rows.ids, rows.sources, r.training.select_fraction, r.training.seed)
st = [rows.texts[i] for i in held]; tp = rows.teacher_probs[held]
ev = read_signals(r, "eval"); et = [x["text"] for x in ev]
gold = np.array([r.task.label_names.index(x["gold"]) for x in ev])
res = {"seed": seed, "buckets": BUCKETS, "lr": LR, "bag_params": summary["parameters"], "bag_best_step": summary["selection"]["best_step"]}
ps_s, ps_b = probs(lambda **e: sf(**e), st), probs(lambda **e: bag(**e).logits, st)
pd_s, pd_b = probs(lambda **e: sf(**e), et), probs(lambda **e: bag(**e).logits, et)
kl = lambda p: float(np.mean(np.sum(tp * (np.log(np.clip(tp, 1e-12, 1)) - np.log(np.clip(p, 1e-12, 1))), 1)))
for w in (1.0, 0.0, 0.5, 0.6, 0.7, 0.8):
    res[f"w{w}"] = {"slice_kl": round(kl(w * ps_s + (1 - w) * ps_b), 4),
                    "dev": round(float(((w * pd_s + (1 - w) * pd_b).argmax(1) == gold).mean()), 4)}
print(json.dumps(res))
