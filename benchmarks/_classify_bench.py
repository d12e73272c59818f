"""Shared harness of the classification benchmarks (benchmarks/sst2.py, benchmarks/trec.py): issue 12's ablation.

1. Teacher: all-MiniLM-L6-v2 + a classification head, fine-tuned here with plain transformers/torch on the
   dataset's labelled training texts; saved to runs/<dataset>/teacher and reused when present.
2. protege labels the training texts (written WITHOUT their labels) once per (augmentation on/off, seed) and
   trains students under each condition (lever off/on); every condition of a seed shares one labelled store.
3. protege evaluates teacher, KD student, hard-label student and the TF-IDF floor on the gold held-out set;
   the harness aggregates the reports over seeds (mean and standard error) into one table.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # ../shared/data, beside the repository


@dataclass
class Dataset:
    """One benchmark task: labelled rows read from ../shared/data, and the task text protege is given."""

    name: str  # runs/<name>, and the section's subject
    title: str  # "SST-2", "TREC"
    section: str  # BENCHMARKS.md heading
    instruction: str
    labels: tuple[str, ...]
    train: list[tuple[int, str]]
    eval: list[tuple[int, str]]
    eval_name: str  # "dev" or "test"
    descriptions: dict[str, str] = field(default_factory=dict)
    command: str = ""


@torch.inference_mode()
def teacher_fit(student_dir: Path, rows: list[dict], max_length: int, batch: int = 256) -> tuple[float, float]:
    """(mean KL(teacher || student), top-label agreement) of a saved protege classifier student on signal rows
    (their ``text`` and ``teacher_probs``), the selection slice's own measure (protege.training.select)."""
    from protege.lean import encode
    from protege.students.classifier import load_student
    from protege.training.select import slice_scores

    model, tokenizer, _ = load_student(student_dir)
    kl = agree = 0.0
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        logits = model(**encode(tokenizer, [r["text"] for r in part], max_length)).logits  # (b, C)
        k, a = slice_scores(logits.float(), torch.tensor([r["teacher_probs"] for r in part]))
        kl, agree = kl + k.item(), agree + a.item()
    return kl / len(rows), agree / len(rows)


# -- 1. teacher ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(model, tok, rows: list[tuple[int, str]], max_length: int, batch: int = 128) -> float:
    model.eval()
    right = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        enc = tok([s for _, s in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        right += int((pred == torch.tensor([y for y, _ in chunk])).sum())
    return right / len(rows)


def fine_tune_teacher(ds: Dataset, base: str, out: Path, *, epochs: int = 2, lr: float = 5e-5,
                      max_length: int = 64, seed: int = 0) -> dict:
    """Plain transformers/torch fine-tuning of MiniLM with a len(labels)-way head; returns a summary (also saved)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    meta_path = out / "teacher.json"
    if meta_path.is_file() and (out / "config.json").is_file():
        meta = json.loads(meta_path.read_text())
        print(f"[teacher] reusing {out} (fine-tuned earlier: {ds.eval_name} accuracy {meta['eval_accuracy']:.4f})")
        return {**meta, "reused": True}

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(ds.labels), id2label=dict(enumerate(ds.labels)),
        label2id={x: i for i, x in enumerate(ds.labels)},
    )
    enc = tok([s for _, s in ds.train], truncation=True, max_length=max_length)
    data = [(enc["input_ids"][i], y) for i, (y, _) in enumerate(ds.train)]

    def collate(batch):
        padded = tok.pad({"input_ids": [b[0] for b in batch]}, return_tensors="pt")
        return {**padded, "labels": torch.tensor([b[1] for b in batch])}

    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate, generator=gen)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    total = epochs * math.ceil(len(data) / 32)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    t0 = time.perf_counter()
    step = 0
    acc = float("nan")
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            if step % 50 == 0:
                print(f"[teacher] epoch {epoch + 1} step {step}/{total} loss {running / 50:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                running = 0.0
        acc = accuracy(model, tok, ds.eval, max_length)
        print(f"[teacher] epoch {epoch + 1}: {ds.eval_name} accuracy {acc:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {
        "base": "all-minilm-l6-v2",
        "epochs": epochs,
        "learning_rate": lr,
        "batch_size": 32,
        "max_length": max_length,
        "train_examples": len(ds.train),
        "train_seconds": seconds,
        "eval_accuracy": acc,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**meta, "reused": False}


def minilm_path() -> str:
    from protege.sources import resolve_source

    return resolve_source("all-minilm-l6-v2").name_or_path


# -- 2. protege: the conditions --------------------------------------------------------------------------------

CONDITIONS = ("kd", "+embed", "+select", "+augment", "+pool", "+sweep", "+bilstm", "all", "all+bilstm",
              "teacher_layers")
SINGLE_LEVER = ("+embed", "+select", "+augment", "+pool", "+sweep", "+bilstm", "teacher_layers")
FULL_SEEDS = ("kd", "all", "all+bilstm")  # the headline rows: every seed of --seeds


@dataclass
class Settings:
    """What every condition shares, and what each lever sets when on."""

    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 64
    alpha: float = 1.0
    temperature: float = 4.0
    hidden_size: int = 64
    layers: int = 1
    heads: int = 2
    intermediate_size: int = 1024
    max_length: int = 64
    latency_samples: int = 200
    per_text: int = 2
    select_fraction: float = 0.1
    select_metric: str = "kl"
    eval_every: int | None = 50
    patience: int | None = 4
    sweep_alpha: tuple[float, ...] = (0.5, 1.0)
    sweep_temperature: tuple[float, ...] = (2.0, 4.0)
    tl_stride: int = 2
    tl_lr: float = 5e-5
    tl_epochs: int = 2
    tl_augment: bool = False
    tl_sweep: bool = False
    all_sweep: bool = False
    embeddings: str = "projected"  # student.embeddings when the embed lever is on: projected or distilled
    embeddings_from: str = "model"  # student.embeddings_from: model (MiniLM) or teacher (the fine-tuned one)
    ngram_buckets: int = 0  # student.ngram_buckets of the conditions with the pool and select levers (0: off)
    bilstm_head: int = 64  # student.intermediate_size of a bilstm student: its ReLU layer's width


def condition_levers(cond: str, st: Settings) -> dict[str, bool]:
    on = {
        "kd": (),
        "+embed": ("embed",),
        "+select": ("select",),
        "+augment": ("augment",),
        "+pool": ("pool",),
        "+sweep": ("select", "sweep"),
        "+bilstm": ("bilstm",),
        # the sweep trains four students per run: measured alone, in `all` only with --all-sweep (3x the time)
        "all": ("embed", "select", "augment", "pool") + (("sweep",) if st.all_sweep else ()),
        # Tang et al.'s student in place of the one-layer encoder (it pools the mean and max itself: no pool lever)
        "all+bilstm": ("embed", "select", "augment", "bilstm") + (("sweep",) if st.all_sweep else ()),
        "teacher_layers": ("select",) + (("augment",) if st.tl_augment else ()) + (("sweep",) if st.tl_sweep else ()),
    }[cond]
    return {k: k in on for k in ("embed", "select", "augment", "pool", "sweep", "bilstm")}


def recipe_dict(ds: Dataset, cond: str, seed: int, st: Settings, work: Path, teacher_dir: Path, minilm: str) -> dict:
    levers = condition_levers(cond, st)
    if cond == "teacher_layers":
        student = {"init": "teacher_layers", "layer_stride": st.tl_stride, "max_length": st.max_length}
    elif levers["bilstm"]:
        student = {"model": minilm, "init": "scratch", "architecture": "bilstm", "hidden_size": st.hidden_size,
                   "intermediate_size": st.bilstm_head, "max_length": st.max_length}
    else:
        student = {
            "model": minilm,
            "init": "scratch",
            "hidden_size": st.hidden_size,
            "num_layers": st.layers,
            "num_heads": st.heads,
            "intermediate_size": st.intermediate_size,
            "max_length": st.max_length,
        }
        if levers["pool"]:
            student["pooling"] = "mean"
            if st.ngram_buckets and levers["select"]:  # the bag's share is chosen on the selection slice
                student["ngram_buckets"] = st.ngram_buckets
    if levers["embed"]:
        student["embeddings"] = st.embeddings
        if st.embeddings_from != "model":
            student["embeddings_from"] = st.embeddings_from
    training: dict = {
        "alpha": st.alpha,
        "temperature": st.temperature,
        "epochs": st.tl_epochs if cond == "teacher_layers" else st.epochs,
        "learning_rate": st.tl_lr if cond == "teacher_layers" else st.lr,
        "batch_size": st.batch_size,
        "seed": seed,
        "use_gold": False,
        "hard_label_baseline": cond == "kd",  # the hard-label student is trained once, beside the kd student
    }
    if levers["select"]:
        training |= {"select_fraction": st.select_fraction, "select_metric": st.select_metric,
                     "eval_every": st.eval_every, "patience": st.patience}
    if levers["sweep"]:
        training |= {"sweep_alpha": list(st.sweep_alpha), "sweep_temperature": list(st.sweep_temperature)}
    data: dict = {"path": str(work / "data" / "train.jsonl"), "eval_path": str(work / "data" / "eval.jsonl")}
    if levers["augment"]:
        data["augment"] = {"per_text": st.per_text}
    return {
        "task": {
            "instruction": ds.instruction,
            "labels": [{"name": x, "description": ds.descriptions.get(x, "")} for x in ds.labels],
        },
        "data": data,
        "teacher": {"model": f"hf:{teacher_dir}", "batch_size": 64, "max_length": st.max_length, "device": "cpu"},
        "student": student,
        "training": training,
        "eval": {"latency_samples": st.latency_samples},
        "output_dir": str(work / f"{cond}-s{seed}"),
    }


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite store (WAL included), through SQLite's backup API."""
    import sqlite3

    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def label_through_shared(recipe, work: Path):
    """Label ``recipe``'s texts through a copy of the dataset's shared store (work/shared.db: only texts it has
    never seen go to the teacher), then write the copy back as the new shared store; returns the label stats."""
    from protege.pipeline import label

    shared = work / "shared.db"
    derived = not shared.is_file() or not recipe.store_path.is_file()
    if shared.is_file() and not recipe.store_path.is_file():
        _copy_db(shared, recipe.store_path)
    stats = label(recipe, quiet=True)
    if derived:  # a superset of what was shared: this recipe's texts added
        _copy_db(recipe.store_path, shared)
    elif stats.called:  # a store of its own from an earlier run: copying it back could drop others' texts
        print(f"[store] {recipe.store_path} predates {shared}; its {stats.called} new answers stay in it", flush=True)
    return stats


def run_condition(ds: Dataset, cond: str, seed: int, st: Settings, work: Path, teacher_dir: Path,
                  minilm: str) -> dict:
    """One (condition, seed): recipe.yaml written, labelled from the dataset's shared store (only texts it has
    never seen go to the teacher), trained and evaluated by protege; returns the report and timings."""
    import yaml

    import protege
    from protege.pipeline import evaluate, train

    out = work / f"{cond}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(ds, cond, seed, st, work, teacher_dir, minilm), sort_keys=False))
    recipe = protege.load_recipe(path)
    t0 = time.perf_counter()
    stats = label_through_shared(recipe, work)
    label_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained = train(recipe, quiet=True, force=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate(recipe, quiet=True, force=False)
    eval_s = time.perf_counter() - t0
    s = report["models"]["student"]
    print(f"[{ds.name} {cond} s{seed}] labelled {stats.examples} ({stats.called} teacher calls, {stats.cached} cached) "
          f"{label_s:.0f}s, train {train_s:.0f}s, eval {eval_s:.0f}s: accuracy {s['accuracy']:.4f}, kept "
          f"{s['quality_kept']:.3f}, agreement {s['agreement_with_teacher']:.3f}", flush=True)
    return {
        "condition": cond,
        "seed": seed,
        "report": report,
        "train": {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str, bool, list, dict))}
                  for k, v in trained.items()},
        "label": {"examples": stats.examples, "called": stats.called, "cached": stats.cached},
        "seconds": {"label": label_s, "train": train_s, "eval": eval_s},
    }


# -- 3. aggregation --------------------------------------------------------------------------------------------


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def pm(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, se = mean_se(xs)
    return f"{scale * m:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")


def model_rows(runs: list[dict], key: str) -> list[dict]:
    """Per seed: the model's figures, with its p50 latency relative to that report's teacher."""
    rows = []
    for r in runs:
        m = r["report"]["models"].get(key)
        if m is None:
            continue
        t = r["report"]["models"]["teacher"]
        rows.append({**m, "seed": r["seed"], "p50_ratio": m["latency_ms_p50"] / t["latency_ms_p50"],
                     "teacher_accuracy": t["accuracy"], "teacher_parameters": t["parameters"]})
    return rows


def summarise(name: str, rows: list[dict]) -> dict:
    acc = [x["accuracy"] for x in rows]
    kept = [x["accuracy"] / x["teacher_accuracy"] for x in rows]
    agree = [x.get("agreement_with_teacher", 1.0) for x in rows]
    ratio = [x["p50_ratio"] for x in rows]
    params = rows[0].get("parameters")
    size = rows[0].get("size_bytes")
    return {"name": name, "seeds": [x["seed"] for x in rows], "acc": acc, "kept": kept, "agree": agree,
            "p50_ratio": ratio, "parameters": params, "size_bytes": size,
            "by_seed": {x["seed"]: x["accuracy"] for x in rows}}


def table(ds: Dataset, summaries: list[dict], missing: dict[str, str]) -> str:
    head = (f"| condition | params | {ds.eval_name} accuracy % | quality kept % | agreement % | p50 vs teacher % | "
            "seeds |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    lines = [head]
    for s in summaries:
        params = f"{s['parameters'] / 1e6:.2f}M" if s.get("parameters") else (
            f"{s['size_bytes'] / 1e3:.0f} KB" if s.get("size_bytes") else "n/a")
        lines.append(f"| {s['name']} | {params} | {pm(s['acc'])} | {pm(s['kept'])} | {pm(s['agree'])} | "
                     f"{pm(s['p50_ratio'])} | {','.join(map(str, s['seeds']))} |")
    for name, why in missing.items():
        lines.append(f"| {name} | | {why} | | | | |")
    return "\n".join(lines)


def paired_margin(a: dict, b: dict) -> tuple[float, float | None, int]:
    """Mean of a - b over the seeds both have, and its standard error (paired by seed)."""
    common = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    diffs = [a["by_seed"][k] - b["by_seed"][k] for k in common]
    if not diffs:
        return float("nan"), None, 0
    m, se = mean_se(diffs)
    return m, se, len(diffs)


def targets(best: dict, teacher: dict, hard: dict | None, floor: dict | None) -> list[str]:
    mark = lambda ok: "met" if ok else "NOT met"
    ratio = teacher["parameters"] / best["parameters"]
    kept, _ = mean_se(best["kept"])
    p50, _ = mean_se(best["p50_ratio"])
    out = [
        (f"- >= 10x fewer parameters than the teacher: {ratio:.1f}x ({best['parameters'] / 1e6:.2f}M vs "
         f"{teacher['parameters'] / 1e6:.2f}M) -> {mark(ratio >= 10)}"),
        f"- keeps >= 95% of the teacher's accuracy: {pm(best['kept'])}% (mean ± se) -> {mark(kept >= 0.95)}",
        f"- p50 latency <= 10% of the teacher's: {pm(best['p50_ratio'])}% -> {mark(p50 <= 0.10)}",
    ]
    for other, what in ((hard, "hard-label student"), (floor, "TF-IDF floor")):
        if other is None:
            out.append(f"- beats the {what} by > 1 se: no {what} in the reports -> NOT met")
            continue
        m, se, n = paired_margin(best, other)
        ok = se is not None and m > se
        se_txt = f"{100 * se:.1f}" if se is not None else "n/a (one seed)"
        out.append(f"- beats the {what} by > 1 se: {100 * m:+.1f} points (paired over {n} seeds, se {se_txt}) "
                   f"-> {mark(ok)}")
    return out


def per_label_lines(ds: Dataset, runs: list[dict]) -> list[str]:
    """Per-class accuracy (recall) of the student, mean over seeds, and of the teacher, from report.json's
    models[*]["per_label"] when present."""
    per: dict[str, list[float]] = {}
    teacher: dict[str, float | None] = {}
    support: dict[str, int] = {}
    for r in runs:
        models = r["report"]["models"]
        for lab, v in (models["student"].get("per_label") or {}).items():
            if v.get("recall") is not None:
                per.setdefault(lab, []).append(v["recall"])
            support[lab] = v.get("support")
        for lab, v in (models["teacher"].get("per_label") or {}).items():
            teacher[lab] = v.get("recall")
    if not per:
        return []
    out = ["| label | support | student accuracy % | teacher accuracy % |", "| --- | ---: | ---: | ---: |"]
    for lab in ds.labels:
        if lab in per:
            t = f"{100 * teacher[lab]:.1f}" if teacher.get(lab) is not None else "n/a"
            out.append(f"| {lab} | {support.get(lab, '')} | {pm(per[lab])} | {t} |")
    return out


# -- 4. the command ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _commit() -> str:
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return head + (" + uncommitted changes" if dirty else "")


def _sweep_pick(student: dict) -> str:
    """The (alpha, tau) the sweep kept, as report.json records it."""
    sw = student["sweep"]
    if isinstance(sw, dict):
        keep = sw.get("chosen") or sw.get("best") or sw.get("kept")
        if keep is not None:
            return json.dumps(keep)
    return json.dumps(sw)[:200]


def parse_args(ds: Dataset, argv: list[str] | None):
    import argparse

    p = argparse.ArgumentParser(description=f"{ds.title} ablation of issue 12's levers (see benchmarks/_classify_bench.py)")
    p.add_argument("--quick", action="store_true", help="smoke run: 400 train rows, 200 eval rows, 1 seed, own teacher; "
                   "no BENCHMARKS.md")
    p.add_argument("--seeds", default="0,1,2", help="seeds of kd and all (the hard-label student and the floor come "
                   "from the kd runs)")
    p.add_argument("--single-seeds", default=None, help="seeds of the single-lever conditions and teacher_layers "
                   "(default: --seeds)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"subset of {','.join(CONDITIONS)}")
    p.add_argument("--missing", action="append", default=[], help="CONDITION=why: a row that says why it was not run")
    p.add_argument("--per-text", type=int, default=2, help="data.augment.per_text of augmented conditions")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--temperature", type=float, default=4.0, help="training.temperature of every distilled student")
    p.add_argument("--intermediate-size", type=int, default=1024, help="student.intermediate_size (scratch students)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="training.eval_every of the select conditions (0: once per epoch, protege's default)")
    p.add_argument("--patience", type=int, default=4,
                   help="training.patience of the select conditions (0: train every epoch, keep the best checkpoint)")
    p.add_argument("--tl-epochs", type=int, default=2, help="epochs of the teacher_layers student")
    p.add_argument("--tl-augment", action="store_true", help="teacher_layers with augmentation too")
    p.add_argument("--tl-sweep", action="store_true", help="teacher_layers with the alpha/tau sweep too")
    p.add_argument("--all-sweep", action="store_true", help="all with the alpha/tau sweep too (four students a run)")
    p.add_argument("--embeddings", default="projected", choices=("projected", "distilled"),
                   help="student.embeddings of the conditions with the embed lever")
    p.add_argument("--embeddings-from", default="model", choices=("model", "teacher"),
                   help="student.embeddings_from of the conditions with the embed lever")
    p.add_argument("--ngram-buckets", type=int, default=0,
                   help="student.ngram_buckets of the conditions with mean pooling and selection (all): an n-gram "
                   "bag beside the student (0: off)")
    p.add_argument("--out", type=Path, default=None, help="work dir (default runs/<dataset>[-quick])")
    p.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    return p.parse_args(argv)


def main(ds: Dataset, argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(ds, argv)
    started = time.perf_counter()
    work = (args.out or REPO / "runs" / (ds.name + ("-quick" if args.quick else ""))).resolve()
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    bad = [c for c in conds if c not in CONDITIONS]
    if bad:
        raise SystemExit(f"--conditions: {', '.join(bad)} unknown; pick from {', '.join(CONDITIONS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    single = [int(x) for x in (args.single_seeds or args.seeds).split(",")]
    missing = dict(m.split("=", 1) for m in args.missing)
    st = Settings(epochs=args.epochs, per_text=args.per_text, temperature=args.temperature,
                  intermediate_size=args.intermediate_size, tl_epochs=args.tl_epochs, tl_augment=args.tl_augment,
                  tl_sweep=args.tl_sweep, all_sweep=args.all_sweep, eval_every=args.eval_every or None,
                  patience=args.patience or None, embeddings=args.embeddings, embeddings_from=args.embeddings_from,
                  ngram_buckets=args.ngram_buckets)
    if args.quick:
        ds.train, ds.eval = ds.train[:400], ds.eval[:200]
        seeds, single = seeds[:1], single[:1]
        st.epochs, st.tl_epochs, st.latency_samples, st.eval_every = 2, 1, 20, 5
    minilm = minilm_path()
    print(f"{ds.title}: {len(ds.train)} train, {len(ds.eval)} {ds.eval_name} texts; work dir {work}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    _write_jsonl(work / "data" / "train.jsonl", [{"id": f"train-{i}", "text": s} for i, (_, s) in enumerate(ds.train)])
    _write_jsonl(work / "data" / "eval.jsonl",
                 [{"id": f"{ds.eval_name}-{i}", "text": s, "label": ds.labels[y]} for i, (y, s) in enumerate(ds.eval)])
    t0 = time.perf_counter()
    teacher = fine_tune_teacher(ds, minilm, work / "teacher", epochs=1 if args.quick else 2, max_length=st.max_length)
    teacher_s = time.perf_counter() - t0

    plan = [(c, s) for c in conds for s in (seeds if c in FULL_SEEDS else single)]
    # kd and the all rows over every seed first (the table's headline rows), then the single levers in the order given
    plan.sort(key=lambda cs: (cs[0] not in FULL_SEEDS, cs[0] != "kd", conds.index(cs[0]), cs[1]))
    runs: list[dict] = []
    (work / "results").mkdir(parents=True, exist_ok=True)
    for cond, seed in plan:
        r = run_condition(ds, cond, seed, st, work, work / "teacher", minilm)
        (work / "results" / f"{cond}-s{seed}.json").write_text(json.dumps(r, indent=1, default=str))
        runs.append(r)
    wall = time.perf_counter() - started

    by = {c: [r for r in runs if r["condition"] == c] for c in conds}
    kd_runs = by.get("kd", [])
    teacher_rows = model_rows(runs[:1], "teacher")
    summaries = [summarise("teacher (MiniLM-L6 fine-tuned)", teacher_rows)] if teacher_rows else []
    hard = floor = None
    if kd_runs:
        hr = model_rows(kd_runs, "student-hard")
        fr = model_rows(kd_runs, "floor")
        hard = summarise("hard-label student (alpha 0, kd settings)", hr) if hr else None
        floor = summarise("TF-IDF + logistic regression floor", fr) if fr else None
        if floor is None:
            missing.setdefault("TF-IDF floor", "not in report.json (evaluation/floor.py not landed)")
    cond_sums = {c: summarise(c, model_rows(by[c], "student")) for c in conds if by[c]}
    summaries += [x for x in (hard, floor) if x] + list(cond_sums.values())
    tbl = table(ds, summaries, missing)
    t_params = teacher["parameters"]
    small = [s for s in cond_sums.values() if s["parameters"] and t_params / s["parameters"] >= 10]
    best = max(small or cond_sums.values(), key=lambda s: mean_se(s["acc"])[0])
    verdict = targets(best, {"parameters": t_params}, hard, floor)
    per_label = per_label_lines(ds, by[best["name"]])
    sweep_picks = {f"{r['condition']} s{r['seed']}": _sweep_pick(r["report"]["models"]["student"]) for r in runs
                   if r["report"]["models"]["student"].get("sweep") is not None}

    print()
    print(tbl)
    print(f"\nbest condition within 10x of the teacher's size: {best['name']}")
    print("\n".join(verdict))
    if per_label:
        print("\nper-class accuracy of " + best["name"] + ":\n" + "\n".join(per_label))
    print(f"\nwall time {wall / 60:.1f} min (teacher {teacher_s / 60:.1f} min"
          f"{', reused' if teacher.get('reused') else ''})")
    (work / "summary.json").write_text(json.dumps(
        {"summaries": summaries, "best": best["name"], "verdict": verdict, "wall_seconds": wall, "teacher": teacher,
         "settings": vars(st), "sweep_picks": sweep_picks,
         "seconds": {f"{r['condition']}-s{r['seed']}": r["seconds"] for r in runs}}, indent=1, default=str))
    if args.quick or args.no_md:
        return 0

    import platform
    import subprocess

    from _md import write_section

    flags = " ".join(argv if argv is not None else sys.argv[1:])
    cmd = f"HF_HUB_OFFLINE=1 .venv/bin/python {ds.command} {flags}".rstrip()
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    n_lab = len(ds.labels)
    run_secs = "; ".join(f"{r['condition']} s{r['seed']} {sum(r['seconds'].values()):.0f}s" for r in runs)
    section = f"""{ds.section}

Teacher: all-MiniLM-L6-v2 with a {n_lab}-way classification head, fine-tuned in the script on the
{len(ds.train):,} {ds.title} training texts with their labels ({teacher['epochs']} epochs, AdamW lr
{teacher['learning_rate']:g}, batch 32, max_length {teacher['max_length']}; {ds.eval_name} accuracy
{100 * teacher['eval_accuracy']:.1f}%). Every student is trained by protege on the same texts WITHOUT their labels
(training.use_gold false) and evaluated by protege on the {len(ds.eval)} {ds.eval_name} texts (gold labels).

Conditions (lever off/on). `kd`: today's KD student, a BERT configured from scratch with the MiniLM tokenizer
(hidden {st.hidden_size}, {st.layers} layer, {st.heads} heads, MLP {st.intermediate_size}), alpha {st.alpha:g},
temperature {st.temperature:g}, lr {st.lr:g}, batch {st.batch_size}, {st.epochs} epochs, last step kept.
`+embed`: student.embeddings projected (the scratch student's word and position embeddings are MiniLM's,
projected to its width by PCA). `+select`: training.select_fraction {st.select_fraction}, select_metric {st.select_metric}, eval_every
{st.eval_every}, patience {st.patience} (checkpoint picked on a held-out slice of teacher-labelled training texts).
`+augment`: data.augment.per_text {st.per_text} (mask_p 0.1, replace_p 0.1, ngram_p 0.25), the teacher labels the
new texts through the store. `+pool`: student.pooling mean (the head reads the mean of the tokens' last states,
not the first token's). `+sweep`: select as above plus training.sweep_alpha {list(st.sweep_alpha)} x
sweep_temperature {list(st.sweep_temperature)}, picked on the same slice. `all`: embed + augment + select + pool{' + sweep' if st.all_sweep else ''} (the sweep, four students per run, is measured
alone: three seeds of `all` with it did not fit the 2-core budget).
`+bilstm`: student.architecture bilstm in place of the BERT (Tang et al.'s student: a forward and a backward LSTM of
width {st.hidden_size} over {st.hidden_size}-wide word embeddings, the mean and max of their states, a ReLU layer of {st.bilstm_head}), kd settings otherwise;
`all+bilstm`: `all` with that student (embed + augment + select; it pools by itself).
`teacher_layers`: student.init teacher_layers, layer_stride {st.tl_stride} (copied from the teacher), lr
{st.tl_lr:g}, {st.tl_epochs} epochs, with select{' + augment' if st.tl_augment else ''}{' + sweep' if st.tl_sweep else ''}.
The hard-label student (alpha 0, kd settings) and the TF-IDF + logistic-regression floor (trained on the teacher's
labels) come from the kd runs' reports. Seeds (training.seed): kd, all and all+bilstm {','.join(map(str, seeds))}; single-lever
conditions and teacher_layers {','.join(map(str, single))} (the compute budget: 2 shared cores, about 25 minutes per
dataset). Figures are mean ± standard error over seeds (no ± with one seed); the se is over seeds only, the
{ds.eval_name} set's own sampling error (about {100 * math.sqrt(0.16 / len(ds.eval)):.1f} points at 80% accuracy) is
not in it. p50 latency is one example at a time relative to the teacher timed in the same report; all runs one
after another on the same shared machine.

- Command: `{cmd}`
- Machine: 2-core CPU, 24 GB, no GPU (torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}), shared with other agents
- Date: {date}
- Commit: {_commit()}
- Wall time: {wall / 60:.1f} min (teacher fine-tune {teacher_s / 60:.1f} min{' (reused from an earlier run: ' + f"{teacher['train_seconds'] / 60:.1f} min then)" if teacher.get('reused') else ''}); per run (label + train + eval): {run_secs}

{tbl}

Best condition with >= 10x fewer parameters than the teacher: `{best['name']}`. Issue 12's targets (beats = the
paired mean margin over seeds exceeds its standard error):

{chr(10).join(verdict)}
"""
    if per_label:
        section += f"\nPer-class {ds.eval_name} accuracy of `{best['name']}`:\n\n" + "\n".join(per_label) + "\n"
    if sweep_picks:
        section += "\nSweep picks (alpha, tau) per run: " + "; ".join(f"{k}: {v}" for k, v in sweep_picks.items()) + "\n"
    write_section(REPO / "BENCHMARKS.md", ds.section, section)
    print(f"wrote {ds.section!r} to {REPO / 'BENCHMARKS.md'}")
    return 0
