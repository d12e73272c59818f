"""Pick the teacher: the same gold-labelled sample sent to each candidate teacher, side by side.

Each candidate is the recipe's teacher section with its model replaced (``MODEL``, or ``MODEL,setting=value,...``
for other settings too), asked through labeling's own path (:func:`protege.labeling.labeler.label_examples`):
the run's store as cache (a rerun, or a later ``protege label`` with the chosen teacher, pays nothing for the
sample again), the same budget cap and the same cost records. The sample is drawn by ``training.seed`` from the
rows with a gold label (training and held-out; never the rows drawn as worked examples), in an order that does
not depend on its size, so a bigger sample keeps the smaller one's rows.

Per teacher: accuracy against gold (over the whole sample: a row the teacher failed on is not a right answer),
``label_mass`` (the mean share of probability that fell on a valid label, for the methods that record it:
``label_logprobs`` and ``samples``), cost per 1,000 texts (an API teacher's recorded spend per answered text;
a local one's recorded compute time at ``eval.compute_usd_per_hour``, :func:`protege.evaluation.measure.compute_cost`),
latency p50/p95 of the recorded call seconds and the failure rate. Between teachers: the share of rows both
answered on which their top labels agree. The pick: the cheapest teacher within ``max_distance`` accuracy
points of the best.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .._io import write_json_atomic, write_text_atomic
from ..errors import PermanentError, ProtegeError, RecipeError
from ..labeling.data import Example, load_splits
from ..labeling.labeler import Estimate, estimate_requests, label_examples, requests_for, split_shots, task_labels
from ..recipe import FewShotExample, Recipe, TeacherConfig
from ..store import Store, call_key
from ..teachers import make_teacher
from .measure import compute_cost, summarize_latency
from .report import md_cell

__all__ = ["Candidate", "compare", "compare_estimates", "draw_sample", "parse_teacher"]

MASS_METHODS = ("label_logprobs", "samples")  # the methods whose covered_mass measures something
DEFAULT_SAMPLE = 200
DEFAULT_MAX_DISTANCE = 2.0  # accuracy points


@dataclass(frozen=True)
class Candidate:
    """One teacher to compare: its name (the ``--teacher`` value) and the recipe it labels under."""

    name: str
    recipe: Recipe


def parse_teacher(recipe: Recipe, spec: str, cap_usd: float | None = None) -> Candidate:
    """``MODEL`` or ``MODEL,setting=value,...`` (values read as YAML) -> the recipe with that teacher: its
    teacher section with the model and those settings replaced. ``cap_usd`` replaces ``teacher.budget_usd``."""
    model, *settings = [part.strip() for part in spec.split(",")]
    if model.startswith("ensemble:"):
        raise RecipeError(f"--teacher {spec!r}: compare the members of an ensemble one by one (each as --teacher)")
    data = recipe.teacher.model_dump(exclude_unset=True)
    data.pop("members", None)  # an ensemble's members are not the candidate's
    data["model"] = model
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--teacher {spec!r}: {s!r} is not setting=value; write MODEL,setting=value,... "
                              "(e.g. hf:org/model,calibrate=false)")
        data[key.strip()] = yaml.safe_load(value)
    if cap_usd is not None:
        data["budget_usd"] = cap_usd
    try:
        cfg = TeacherConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"--teacher {spec!r}: teacher.{where}: {err['msg'].removeprefix('Value error, ')}" if where
                          else f"--teacher {spec!r}: {err['msg'].removeprefix('Value error, ')}") from None
    return Candidate(spec, recipe.model_copy(update={"teacher": cfg}))


def draw_sample(recipe: Recipe, n: int) -> tuple[list[Example], list[FewShotExample]]:
    """(up to ``n`` gold-labelled rows drawn by ``training.seed``, the worked examples every request carries)."""
    if recipe.task.kind != "classification":
        raise ProtegeError("`protege compare` scores label accuracy against gold: it compares teachers of "
                           "classification tasks")
    if n < 1:
        raise ProtegeError(f"--sample must be at least 1, not {n}")
    train, held = load_splits(recipe.data, task_labels(recipe), recipe.training.seed)
    shots, train = split_shots(recipe, train)  # as labeling draws them: worked examples are not sampled
    pool = sorted((e for e in train + held if e.gold is not None), key=lambda e: e.id)
    if not pool:
        raise ProtegeError(f"no row of {str(recipe.data.path)!r} has a gold label (data.label_column: "
                           f"{recipe.data.label_column!r}); comparing teachers needs gold-labelled rows")
    random.Random(recipe.training.seed).shuffle(pool)
    return pool[:n], shots


def _candidates(recipe: Recipe, specs: Sequence[str], cap_usd: float | None) -> list[Candidate]:
    if len(specs) < 1:
        raise ProtegeError("name the teachers to compare: --teacher MODEL, once per teacher")
    if len(set(specs)) < len(specs):
        raise ProtegeError(f"--teacher {[s for s in specs if specs.count(s) > 1][0]!r} is given twice")
    return [parse_teacher(recipe, s, cap_usd) for s in specs]


def compare_estimates(recipe: Recipe, specs: Sequence[str], sample: int = DEFAULT_SAMPLE,
                      budget_usd: float | None = None) -> tuple[int, list[tuple[str, Estimate]]]:
    """(sample size, each teacher's :class:`Estimate` for the sample): a dry run that calls nothing and writes
    nothing (a store that does not exist yet is not created)."""
    examples, shots = draw_sample(recipe, sample)
    exists = recipe.store_path.is_file()
    store = Store(recipe.store_path) if exists else None
    try:
        spent = store.spent() if store is not None else 0.0
        out = []
        for c in _candidates(recipe, specs, None if budget_usd is None else spent + budget_usd):
            teacher = make_teacher(c.recipe.teacher)
            out.append((c.name, estimate_requests(c.recipe, teacher, requests_for(c.recipe, examples, shots), store)))
    finally:
        if store is not None:
            store.close()
    return len(examples), out


def compare(
    recipe: Recipe,
    specs: Sequence[str],
    sample: int = DEFAULT_SAMPLE,
    budget_usd: float | None = None,
    max_distance: float = DEFAULT_MAX_DISTANCE,
    out_dir: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Label the sample with every teacher (what the store holds costs nothing), measure, write
    ``compare.json``, ``compare.md`` and ``accuracy_vs_cost.png`` in ``out_dir`` (default
    ``<output_dir>/compare``) and return the report.

    ``budget_usd`` caps what this comparison may spend, all teachers together (else ``teacher.budget_usd``
    caps the store's spend, as for ``protege label``); reaching it stops with :class:`BudgetReached` (exit 3)
    and nothing written: what was answered is in the store, and a rerun with a higher cap continues. A
    teacher that refuses (a wrong model name, a bad key: 400/401/403/404) is reported with its reason, and
    the others are still compared."""
    if not max_distance >= 0:
        raise ProtegeError(f"--max-distance is in accuracy points and must be 0 or more, not {max_distance}")
    examples, shots = draw_sample(recipe, sample)
    candidates = _candidates(recipe, specs, None)
    teachers = [make_teacher(c.recipe.teacher) for c in candidates]
    for t in teachers:  # a missing key fails before anything is written or spent
        if t.kind == "api":
            t.check_key()
    out_dir = Path(out_dir) if out_dir is not None else recipe.output_dir / "compare"
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    with Store(recipe.store_path) as store:
        if budget_usd is not None:  # the engine caps the store's spend: this comparison may add budget_usd to it
            cap = store.spent() + budget_usd
            candidates = [Candidate(c.name, c.recipe.model_copy(update={
                "teacher": c.recipe.teacher.model_copy(update={"budget_usd": cap})})) for c in candidates]
        rows: dict[str, list[str | None]] = {}
        results = []
        for c, t in zip(candidates, teachers):
            keys = [call_key(t.identity, r.to_json()) for r in requests_for(c.recipe, examples, shots)]
            recorded = store.call_usage(keys)
            # a row the teacher failed on is part of the measurement: a rerun does not retry it (`protege label` does)
            todo = [e for e, k in zip(examples, keys) if k not in recorded or recorded[k].status == "ok"]
            error, called = None, 0
            try:
                _, _, stats = label_examples(t, c.recipe, todo, store, quiet, desc=f"compare {c.name}", shots=shots)
                called = stats.called
            except PermanentError as e:  # this teacher refused; the others are still worth comparing
                error = str(e)
            held = store.get_signals(keys)  # what it answered, now or before (before it refused, too)
            signals = [held.get(k) for k in keys]
            labels = [s.distribution.top if s is not None and s.distribution is not None else None for s in signals]
            rows[c.name] = labels
            usage = store.call_usage(keys)
            cached = sum(k in recorded for k in keys)
            results.append(_figures(c, t.kind, examples, signals, keys, labels, usage, called, cached, error))
    report = {
        "sample": len(examples),
        "seed": recipe.training.seed,
        "max_distance": max_distance,
        "budget_usd": budget_usd,
        "compute_usd_per_hour": recipe.eval.compute_usd_per_hour,
        "teachers": results,
        "agreement": _agreement(rows),
        "pick": _pick(results, max_distance),
        "rows": [{"id": e.id, "gold": e.gold, "labels": {n: rows[n][i] for n in rows}}
                 for i, e in enumerate(examples)],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(report, out_dir / "accuracy_vs_cost.png")
    write_json_atomic(out_dir / "compare.json", report)
    write_text_atomic(out_dir / "compare.md", _markdown(report))
    return report


def _figures(c: Candidate, kind: str, examples: list[Example], signals: list[Any], keys: list[str],
             labels: list[str | None], usage: dict[str, Any], called: int, cached: int, error: str | None,
             ) -> dict[str, Any]:
    n = len(examples)
    answered = sum(lab is not None for lab in labels)
    masses = [s.distribution.covered_mass for s in signals
              if s is not None and s.distribution is not None and s.distribution.method in MASS_METHODS]
    ok = {k: usage[k] for k in keys if k in usage and usage[k].status == "ok"}  # identical texts: one call
    seconds = [u.seconds for u in ok.values()]
    usd_h = c.recipe.eval.compute_usd_per_hour
    usd_per_1k, source = None, None
    if ok and kind == "api":
        usd_per_1k, source = 1000 * statistics.fmean(u.cost_usd for u in ok.values()), "recorded API spend"
    elif seconds and statistics.fmean(seconds) > 0:
        usd_per_1k, source = compute_cost(1 / statistics.fmean(seconds), usd_h)["usd_per_1k"], "compute"
    lat = summarize_latency(seconds) if seconds else None
    return {
        "name": c.name,
        "model": c.recipe.teacher.model,
        "kind": kind,
        "method": next((s.distribution.method for s in signals if s is not None and s.distribution), None),
        "accuracy": sum(lab == e.gold for lab, e in zip(labels, examples)) / n,
        "correct": sum(lab == e.gold for lab, e in zip(labels, examples)),
        "label_mass": statistics.fmean(masses) if masses else None,
        "usd_per_1k": usd_per_1k,
        "price_source": source,
        "spent_usd": math.fsum(usage[k].spent_usd for k in dict.fromkeys(keys) if k in usage),
        "latency_ms_p50": lat.p50 if lat else None,
        "latency_ms_p95": lat.p95 if lat else None,
        "failed": n - answered,
        "failure_rate": (n - answered) / n,
        "called": called,  # calls made now (identical texts share one)
        "cached": cached,  # rows the store held already (answered, or failed before)
        "error": error,
    }


def _agreement(rows: dict[str, list[str | None]]) -> dict[str, dict[str, float | None]]:
    """a -> b -> the share of rows both answered on which their top labels are the same (None: no such row)."""
    out: dict[str, dict[str, float | None]] = {}
    for a, la in rows.items():
        out[a] = {}
        for b, lb in rows.items():
            both = [(x, y) for x, y in zip(la, lb) if x is not None and y is not None]
            out[a][b] = sum(x == y for x, y in both) / len(both) if both else None
    return out


def _pick(results: list[dict[str, Any]], max_distance: float) -> dict[str, Any] | None:
    """The cheapest teacher whose accuracy is within ``max_distance`` points of the best (ties: the more
    accurate); only teachers that answered something have a price."""
    priced = [r for r in results if r["usd_per_1k"] is not None]
    if not priced:
        return None
    best = max(priced, key=lambda r: r["accuracy"])
    floor = best["accuracy"] - max_distance / 100
    within = [r for r in priced if r["accuracy"] >= floor - 1e-12]
    pick = min(within, key=lambda r: (r["usd_per_1k"], -r["accuracy"]))
    return {"name": pick["name"], "accuracy": pick["accuracy"], "usd_per_1k": pick["usd_per_1k"],
            "best": best["name"], "best_accuracy": best["accuracy"], "within": [r["name"] for r in within]}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _markdown(report: dict[str, Any]) -> str:
    names = [t["name"] for t in report["teachers"]]
    lines = [
        "# Which teacher?",
        "",
        f"The same {report['sample']} gold-labelled texts (drawn by seed {report['seed']}) sent to each teacher "
        "through labeling's path; answers are in the run's store, so `protege label` with the chosen teacher "
        "pays nothing for them again.",
        "",
        "| teacher | accuracy | label mass | $ / 1k | p50 ms | p95 ms | failed | calls now |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in report["teachers"]:
        lines.append(
            f"| {md_cell(t['name'])} | {_pct(t['accuracy'])} | {_pct(t['label_mass'])} | "
            f"{_num(t['usd_per_1k'], '.5f')} | {_num(t['latency_ms_p50'], '.1f')} | "
            f"{_num(t['latency_ms_p95'], '.1f')} | {_pct(t['failure_rate'])} | {t['called']} |"
        )
    refused = [t for t in report["teachers"] if t["error"]]
    lines += [""] + [f"- {md_cell(t['name'])} refused: {md_cell(t['error'], 300)}" for t in refused]
    pick = report["pick"]
    lines += ["", "## The pick", ""]
    if pick is None:
        lines.append("No teacher answered any text of the sample.")
    else:
        lines.append(
            f"**{md_cell(pick['name'])}**: the cheapest teacher within {report['max_distance']:g} accuracy points of "
            f"the best ({md_cell(pick['best'])}, {_pct(pick['best_accuracy'])}), at {_pct(pick['accuracy'])} and "
            f"${pick['usd_per_1k']:.5f} per 1,000 texts."
        )
    lines += [
        "",
        "Accuracy counts a failed row as wrong. Label mass: the mean share of probability on a valid label, "
        "where the method records it (label_logprobs, samples). $ / 1k: an API teacher's recorded spend per "
        f"answered text, a local teacher's recorded compute time at ${report['compute_usd_per_hour']:g}/hour. "
        "Latency: the recorded seconds of each call (a local batch's time shared by its texts).",
        "",
        "## Agreement",
        "",
        "Share of the texts both answered on which the top labels agree.",
        "",
        "| | " + " | ".join(md_cell(n, 40) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in names:
        lines.append(f"| {md_cell(a, 40)} | " + " | ".join(_pct(report["agreement"][a][b]) for b in names) + " |")
    lines += ["", "![accuracy against cost](accuracy_vs_cost.png)", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    priced = [t for t in report["teachers"] if t["usd_per_1k"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, t in enumerate(priced):
        ax.scatter(t["usd_per_1k"], t["accuracy"], s=60)
        ax.annotate(t["name"], (t["usd_per_1k"], t["accuracy"]), textcoords="offset points", xytext=(6, 4 + 12 * i),
                    fontsize=8)
    pick = report["pick"]
    if pick is not None:
        ax.axhline(pick["best_accuracy"] - report["max_distance"] / 100, ls=":", c="grey",
                   label=f"{report['max_distance']:g} points below the best")
        ax.scatter(pick["usd_per_1k"], pick["accuracy"], s=180, facecolors="none", edgecolors="black",
                   label=f"pick: {pick['name']}")
        ax.legend(loc="lower right", fontsize=8)
    if priced and min(t["usd_per_1k"] for t in priced) > 0:
        ax.set_xscale("log")
        ax.set_xlabel("cost per 1,000 texts (USD, log scale)")
    else:
        ax.set_xlabel("cost per 1,000 texts (USD)")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel(f"accuracy on {report['sample']} gold-labelled texts")
    ax.set_title("Teachers: accuracy against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
