"""Selective labeling on SST-2 (issue 13.4): learning curves of teacher.select uncertainty against random, three
seeds, on the same budget of teacher labels.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/active.py            # writes BENCHMARKS.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/active.py --quick    # smoke run, no BENCHMARKS.md

--random-share and --no-diversity set teacher.select_random_share and teacher.select_diversity of the uncertainty
runs; benchmarks/active_tune.py chooses them on the training texts alone (no dev figure).

The teacher and its labels are benchmarks/sst2.py's: the fine-tuned MiniLM in runs/sst2/teacher (fine-tuned here as
sst2.py does when it is missing) and its store runs/sst2/shared.db, copied into each run so answers bought once are
not bought again (a label counts as a teacher call whenever a round picks its text: the curve is about how many
labels a student needs, not about this machine's cache). The student is sst2.py's `+embed` student (scratch BERT,
hidden 64, 1 layer, MiniLM's embeddings projected; alpha 1, tau 4, lr 3e-3, batch 64, 5 epochs), trained on the teacher's
labels only (use_gold false). Each round's student is scored on the 872 dev sentences: quality kept = its gold
accuracy / the teacher's.

Earlier runs of this benchmark lost some round students to a stall: the student predicted the majority label for
every text (50.9% of dev) after all its epochs, in random and uncertainty runs alike (which trainings, the data
order decided). The cause was protege's scratch student starting its weights at BERT's 0.02, a scale for width
768: at hidden 64 its [CLS] state, all the classifier reads, was nearly the same for every text (std 0.0006 across
dev texts in a stalled student, 0.65 in one that learned) and the gradient that would separate them as small.
protege now starts a scratch student at 1 / sqrt(hidden_size) and clips each step's gradient at norm 1
(training.max_grad_norm); the benchmark's settings are unchanged, the same for both strategies. Checked one
training at a time on recorded rounds, by the training loss (no dev figure chose it): the stalled trainings (random
s0 at 5,500 texts, uncertainty s0 at 2,500) and five others of 500 to 1,000 texts leave the plateau within their
first three epochs of five; clipping alone, at 0.02, did not free uncertainty s0's 2,500.

uncertainty: a random seed slice, then rounds of the texts the last student is least sure of (margin, spread by
k-means++ over its pooled hidden states) up to half the training texts (3,460), or to --budget. random: the same
rounds drawn at random, up to half, then on to all 6,920 (its curve beyond half replays the first rounds from the
store); with --random-at-budget only two students, on the budget's first texts of the seeded order and on all.

The goal is judged at half the texts, or at --budget when the budget was fixed before the run (a budget read off an
earlier run's curve is checked on seeds that run did not use).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _classify_bench import (  # noqa: E402
    REPO,
    Settings,
    _commit,
    _copy_db,
    _write_jsonl,
    fine_tune_teacher,
    minilm_path,
    recipe_dict,
)
from sst2 import dataset  # noqa: E402

SECTION = "## Selective labeling on SST-2 (benchmarks/active.py)"
STUDENT_LABELS = (" Uncertainty's students (teacher.select_student_labels) also train on the training texts not sent "
                  "to the teacher, with the probabilities of a first student trained on the teacher's answers "
                  "(self-training: no teacher calls, twice the training); random's train on the teacher's labels "
                  "alone (with all the texts there are none left to label).")


def run_one(ds, select: str, seed: int, max_rows: int, args, st: Settings, sst2: Path, work: Path, minilm: str,
            rounds: tuple[int, int] | None = None) -> dict:
    """One teacher.select run to max_rows (labels through a copy of the shared store); returns selection.json.
    rounds: (seed rows, round rows) instead of --seed-rows and --round-rows."""
    import protege
    from protege.active import label_selected

    d = recipe_dict(ds, "+embed", seed, st, sst2, sst2 / "teacher", minilm)
    d["training"]["hard_label_baseline"] = False
    d["student"]["pooling"] = args.pooling
    if args.select_fraction:  # checkpoint selection on a held-out slice of the labelled rows, once per epoch
        d["training"] |= {"select_fraction": args.select_fraction, "select_metric": "kl"}
    seed_rows, round_rows = rounds or (args.seed_rows, args.round_rows)
    d["teacher"] |= {"select": select, "select_seed_rows": seed_rows, "select_round_rows": round_rows,
                     "select_max_rows": max_rows}
    if select == "uncertainty":
        d["teacher"] |= {"select_metric": args.metric, "select_random_share": args.random_share,
                         "select_diversity": not args.no_diversity, "select_student_labels": args.student_labels}
    out = work / (f"{select}-s{seed}" + (f"-{seed_rows}+{round_rows}" if rounds else ""))
    d["output_dir"] = str(out)
    recipe = protege.Recipe.model_validate(d)
    shared = sst2 / "shared.db"
    if shared.is_file() and not recipe.store_path.is_file():
        _copy_db(shared, recipe.store_path)
    t0 = time.perf_counter()
    stats = label_selected(recipe, quiet=True)
    sel = json.loads((out / "signals" / "selection.json").read_text())
    sel["seconds"] = time.perf_counter() - t0
    sel["new_calls"] = stats.called
    last = sel["rounds"][-1]
    print(f"[{select} s{seed} to {max_rows}] {len(sel['rounds'])} rounds, {last['rows']} labelled, "
          f"{stats.called} new teacher calls, {sel['seconds']:.0f}s: dev accuracy "
          + ", ".join(f"{r['rows']}:{100 * r['eval_accuracy']:.1f}" for r in sel["rounds"]), flush=True)
    return sel


def picks(args, metric: str) -> str:
    """How an uncertainty round picks, in words."""
    from protege.labeling.uncertainty import CANDIDATES_PER_PICK

    share = round(args.random_share * args.round_rows)
    among = f"among the {CANDIDATES_PER_PICK * (args.round_rows - share):,} least sure"
    spread = (f"the least sure by {metric}, taken in turn across the student's predicted labels {among}"
              if args.no_diversity else
              f"the least sure by {metric}, spread by k-means++ over the student's mean-pooled hidden states {among}")
    if not share:
        return f"picks {spread}"
    return (f"takes {share} of each round (teacher.select_random_share {args.random_share:g}) at random (the next "
            f"texts left in its seeded random order) and the other {args.round_rows - share} {spread}")


def curve(sel: dict) -> dict[int, dict]:
    t = sel["teacher_eval_accuracy"]
    return {r["rows"]: {"acc": r["eval_accuracy"], "kept": r["eval_accuracy"] / t, "calls": r["teacher_calls"],
                        "usd": r["usd"]} for r in sel["rounds"] if r.get("eval_accuracy") is not None}


def ms(xs: list[float], scale: float = 100.0) -> str:
    if not xs:
        return ""
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else None
    return f"{scale * m:.1f}" + (f" ± {scale * sd:.1f}" if sd is not None else "")


def plot(curves: dict[str, list[dict[int, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, runs in curves.items():
        points = sorted(set.intersection(*(set(c) for c in runs)))
        for ax, key in ((axes[0], "calls"), (axes[1], "usd")):
            xs = [statistics.fmean(c[p][key] for c in runs) for p in points]
            ys = [statistics.fmean(c[p]["kept"] for c in runs) for p in points]
            sd = [statistics.stdev([c[p]["kept"] for c in runs]) if len(runs) > 1 else 0 for p in points]
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=f"select: {name}")
    axes[0].set_xlabel("teacher calls (training texts labelled)")
    axes[1].set_xlabel("teacher cost (USD: recorded compute at $0.10/h)")
    axes[0].set_ylabel("quality kept (student / teacher dev accuracy)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("SST-2: uncertainty vs random selection (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seed-rows", type=int, default=500)
    p.add_argument("--round-rows", type=int, default=500)
    p.add_argument("--metric", default="margin", choices=("margin", "entropy"))
    p.add_argument("--random-share", type=float, default=0.0,
                   help="teacher.select_random_share: share of each uncertainty round drawn at random")
    p.add_argument("--no-diversity", action="store_true",
                   help="teacher.select_diversity false: the least sure texts in turn across predicted labels, "
                   "not spread by k-means++")
    p.add_argument("--student-labels", action="store_true",
                   help="teacher.select_student_labels of the uncertainty runs: each round's student also trains on "
                   "the texts not sent to the teacher, labelled by a student trained on the teacher's answers")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--temperature", type=float, default=4.0, help="training.temperature of every student")
    p.add_argument("--pooling", default="cls", choices=("cls", "mean"), help="student.pooling")
    p.add_argument("--embeddings", default="projected", choices=("projected", "distilled"), help="student.embeddings")
    p.add_argument("--embeddings-from", default="model", choices=("model", "teacher"), help="student.embeddings_from")
    p.add_argument("--select-fraction", type=float, default=0.0,
                   help="training.select_fraction of every round's student (checkpoint picked once per epoch)")
    p.add_argument("--out", default=None, help="work dir under runs/ (default sst2-active)")
    p.add_argument("--section", default=SECTION, help="BENCHMARKS.md heading")
    p.add_argument("--no-full-random", action="store_true", help="random only to half the texts (not on to all)")
    p.add_argument("--budget", type=int, default=None,
                   help="teacher calls at which the goal is judged, set before the run (at most half; default half): "
                   "uncertainty's rounds stop there")
    p.add_argument("--random-at-budget", action="store_true",
                   help="random trains two students only, at --budget and with all the texts (the same seeded "
                   "order; no curve), instead of a student every round")
    p.add_argument("--quick", action="store_true", help="400 texts, rounds of 50, one seed, 2 epochs; no BENCHMARKS.md")
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line for the section's notes")
    args = p.parse_args(argv)
    started = time.perf_counter()
    ds = dataset()
    sst2 = REPO / "runs" / "sst2"
    work = REPO / "runs" / ((args.out or "sst2-active") + ("-quick" if args.quick else ""))
    st = Settings(epochs=args.epochs, temperature=args.temperature, embeddings=args.embeddings,
                  embeddings_from=args.embeddings_from)
    if args.quick:
        ds.train, ds.eval = ds.train[:400], ds.eval[:200]
        args.seed_rows, args.round_rows, st.epochs = 50, 50, 2
        args.seeds = args.seeds.split(",")[0]
        sst2 = work / "sst2"  # a data dir of its own (the texts are cut); the teacher and store are shared
        sst2.mkdir(parents=True, exist_ok=True)
        for name in ("teacher", "shared.db"):
            src = REPO / "runs" / "sst2" / name
            if src.exists() and not (sst2 / name).exists():
                (sst2 / name).symlink_to(src) if name == "teacher" else shutil.copy(src, sst2 / name)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not (sst2 / "data" / "train.jsonl").is_file() or args.quick:  # the files sst2.py writes
        _write_jsonl(sst2 / "data" / "train.jsonl", [{"id": f"train-{i}", "text": s} for i, (_, s) in enumerate(ds.train)])
        _write_jsonl(sst2 / "data" / "eval.jsonl", [{"id": f"dev-{i}", "text": s, "label": ds.labels[y]}
                                                    for i, (y, s) in enumerate(ds.eval)])
    minilm = minilm_path()
    teacher = fine_tune_teacher(ds, minilm, sst2 / "teacher", epochs=2, max_length=st.max_length)
    n_all = len(ds.train)
    half = n_all // 2
    budget = args.budget or half
    if not 0 < budget <= half:
        raise SystemExit(f"--budget must be between 1 and half the training texts ({half:,}); got {budget:,}")
    if args.random_at_budget and args.no_full_random:
        raise SystemExit("--random-at-budget trains random with all the texts; drop --no-full-random")
    import torch

    print(f"SST-2: {n_all} train, {len(ds.eval)} dev; half = {half}; torch {torch.get_num_threads()} thread(s)",
          flush=True)
    curves: dict[str, list[dict[int, dict]]] = {"uncertainty": [], "random": []}
    secs: dict[str, float] = {}
    results = []
    for seed in seeds:
        u = run_one(ds, "uncertainty", seed, budget, args, st, sst2, work, minilm)
        if args.random_at_budget:  # the budget's texts as the seed slice, then all the others as one round
            r_half = run_one(ds, "random", seed, n_all, args, st, sst2, work, minilm, (budget, n_all - budget))
        else:
            r_half = run_one(ds, "random", seed, half, args, st, sst2, work, minilm)
        r = curve(r_half)
        secs[f"uncertainty s{seed}"], secs[f"random s{seed}"] = u["seconds"], r_half["seconds"]
        if not args.no_full_random and not args.random_at_budget:
            r_all = run_one(ds, "random", seed, n_all, args, st, sst2, work, minilm)
            r |= curve(r_all)
            secs[f"random s{seed}"] += r_all["seconds"]
        curves["uncertainty"].append(curve(u))
        curves["random"].append(r)
        results.append({"seed": seed, "uncertainty": u, "random": r})
        (work / "results.json").write_text(json.dumps({"curves": curves, "teacher": teacher, "seconds": secs},
                                                      indent=1, default=str))
    plot(curves, work / "learning_curves.png")

    # -- the table ------------------------------------------------------------------------------------------------
    t_acc = curves["uncertainty"][0] and results[0]["uncertainty"]["teacher_eval_accuracy"]
    points = sorted(set().union(*(set(c) for runs in curves.values() for c in runs)))
    lines = ["| texts labelled (teacher calls) | random: dev accuracy % | random: quality kept % | uncertainty: dev "
             "accuracy % | uncertainty: quality kept % | teacher cost, USD (random / uncertainty) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pt in points:
        cells = []
        usd = []
        for name in ("random", "uncertainty"):
            have = [c[pt] for c in curves[name] if pt in c]
            full = len(have) == len(curves[name])
            cells += [ms([h["acc"] for h in have]) if full else "", ms([h["kept"] for h in have]) if full else ""]
            usd.append(f"{statistics.fmean(h['usd'] for h in have):.5f}" if full else "–")
        lines.append(f"| {pt:,} | " + " | ".join(cells) + f" | {' / '.join(usd)} |")
    table = "\n".join(lines)
    goal_lines = []
    r_all = [c[n_all]["acc"] for c in curves["random"] if n_all in c]
    u_half = [c[budget]["acc"] for c in curves["uncertainty"] if budget in c]
    if len(r_all) == len(seeds) and len(u_half) == len(seeds):
        diffs = [u - r for u, r in zip(u_half, r_all)]
        m = statistics.fmean(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        # a collapsed student (near the majority class) says nothing about the labels it was given: the verdict
        # is taken over the seeds where neither of the two compared students collapsed
        sound = [d for d, u, r in zip(diffs, u_half, r_all) if min(u, r) >= 0.6]
        met = bool(sound) and statistics.fmean(sound) >= 0
        goal_lines.append(
            f"- Goal (uncertainty with at most half the teacher calls, judged at {budget:,}"
            f"{', set before the run' if args.budget else ''}, reaches random's quality with all "
            f"{n_all:,}): uncertainty at {budget:,} {ms(u_half)}% vs random at {n_all:,} {ms(r_all)}% dev accuracy; "
            f"paired difference {100 * m:+.1f} points (std over seeds {100 * sd:.1f}); over the {len(sound)} seeds "
            f"where neither student collapsed {100 * statistics.fmean(sound) if sound else float('nan'):+.1f} "
            f"-> {'met' if met else 'NOT met'} (the dev set's sampling error is about 1.4 points). Per seed "
            f"(uncertainty at {budget:,} / random at {n_all:,}): "
            + "; ".join(f"s{s} {100 * u:.1f} / {100 * r:.1f} ({100 * (u - r):+.1f})"
                        for s, u, r in zip(seeds, u_half, r_all)))
        smallest = None
        for pt in points:
            us = [c[pt]["acc"] for c in curves["uncertainty"] if pt in c]
            if len(us) == len(seeds) and statistics.fmean(us) >= statistics.fmean(r_all):
                smallest = pt
                break
        goal_lines.append(
            f"- Fewest labels at which uncertainty's mean reaches random-with-all's mean: "
            + (f"{smallest:,} ({100 * smallest / n_all:.0f}% of the calls)" if smallest else "none measured"))
    same = [(pt, [c[pt]["acc"] for c in curves["uncertainty"]], [c[pt]["acc"] for c in curves["random"]])
            for pt in points if all(pt in c for c in curves["uncertainty"] + curves["random"])]
    wins = sum(statistics.fmean(u) > statistics.fmean(r) for _, u, r in same)
    goal_lines.append(f"- Same number of labels: uncertainty's mean above random's at {wins} of {len(same)} points.")
    collapsed = [f"{name} s{seed} at {pt:,} ({100 * c[pt]['acc']:.1f}%)" for name, runs in curves.items()
                 for seed, c in zip(seeds, runs) for pt in sorted(c) if c[pt]["acc"] < 0.6]
    goal_lines.append("- Students that collapsed (below 60% dev accuracy; the majority class alone is 50.9%), kept in "
                      "the means: " + ("; ".join(collapsed) if collapsed else "none"))
    wall = time.perf_counter() - started
    print("\n" + table + "\n\n" + "\n".join(goal_lines) + f"\n\nwall {wall / 60:.1f} min", flush=True)
    if args.quick or args.no_md:
        return 0

    import platform

    import torch

    from _md import write_section

    flags = shlex.join(argv if argv is not None else sys.argv[1:])
    cmd = f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/active.py {flags}".rstrip()
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    per_run = "; ".join(f"{k} {v:.0f}s" for k, v in secs.items())
    first = results[0]["uncertainty"]
    random_rounds = (f"random trains two students, on the first {budget:,} texts of the same seeded random order "
                     f"and on all {n_all:,}." if args.random_at_budget else
                     "random takes the next texts of the same seeded random order.")
    section = f"""{args.section}

teacher.select: uncertainty against random on the same number of teacher labels, SST-2 (issue 13.4). Teacher:
sst2.py's fine-tuned MiniLM-L6 (dev accuracy {100 * t_acc:.1f}%; {'reused from runs/sst2' if teacher.get('reused') else 'fine-tuned in this run'}),
its answers read from sst2.py's store (copied into each run): every text a round picks counts as one teacher call
whether or not this machine had it cached. Dollars: the teacher is a local model, priced as the cascade section
prices it, at its recorded compute time per call (the store's seconds when sst2.py labelled the texts) times
eval.compute_usd_per_hour $0.10; an API teacher's dollars would be its per-call price times the same call counts.
Student: sst2.py's `+embed` student (scratch BERT from the MiniLM tokenizer, hidden {st.hidden_size}, {st.layers}
layer, embeddings {st.embeddings} from {'MiniLM' if st.embeddings_from == 'model' else 'the fine-tuned teacher'}, {'mean' if args.pooling == 'mean' else '[CLS]'} pooling; alpha {st.alpha:g}, temperature {st.temperature:g}, lr {st.lr:g}, batch
{st.batch_size}, {st.epochs} epochs, weights started at 1/sqrt(hidden), gradient clipped at norm 1{f", training.select_fraction {args.select_fraction:g}: the checkpoint of the epoch that agrees best with the teacher (KL) on that share of the labelled rows, held out of training" if args.select_fraction else ", last step kept"}), trained on the teacher's labels only. Rounds: a random seed slice of
{args.seed_rows}, then {args.round_rows} per round, to {budget:,}; uncertainty {picks(args, first['metric'])}; {random_rounds}{STUDENT_LABELS if args.student_labels else ""} A student is trained after every round and scored on the {len(ds.eval)} dev
sentences (gold); quality kept = its accuracy / the teacher's. {len(seeds)} seeds (training.seed: seed slice, order,
initialisation); mean ± standard deviation over seeds (the dev set's own sampling error is about
{100 * math.sqrt(0.16 / len(ds.eval)):.1f} points at 80%).

- Command: `{cmd}`
- Machine: 2-core CPU, no GPU (torch {torch.__version__}, {torch.get_num_threads()} thread, Python {platform.python_version()}), the other core used by another engineer's work
- Date: {date}
- Commit: {_commit()}
- Wall time: {wall / 60:.1f} min; per run (label rounds, training and scoring): {per_run}
- Plot: {work.relative_to(REPO)}/learning_curves.png (not committed; each run's `protege eval` report draws its own curve)

{table}

{chr(10).join(goal_lines)}
"""
    if args.note:
        section += "\nNotes:\n\n" + "\n".join(f"- {n}" for n in args.note) + "\n"
    write_section(REPO / "BENCHMARKS.md", args.section, section)
    print(f"wrote {args.section!r} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
