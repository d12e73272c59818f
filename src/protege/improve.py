"""``protege improve``: the next student from the served student's own traffic (the flywheel of the design).

One call, on a run whose student served with ``--capture``:

1. **Gather** the captured texts since the current version was made (rows of the store's ``captured`` table after
   the version's ``captured_through``), once each, leaving out the evaluation split's texts and the texts the
   current student already learned.
2. **Hold out** a slice of them (``holdout_fraction``, by a hash of the seed and the text, so a rerun draws the
   same one): the fresh test of recent traffic, labelled by the teacher in full.
3. **Label** the rest: a text the teacher already answered (in the cascade, or an earlier improve) costs nothing,
   the store has it; the others go to the teacher least sure first, by the current student's margin or entropy
   with diversity (:func:`protege.labeling.uncertainty.pick`), in rounds, until ``max_label`` texts or the
   teacher's budget (``teacher.budget_usd``, which counts everything the store has spent) is reached; what the
   budget stopped is said in the report, not lost (a rerun with a higher cap goes on).
4. **Train** a candidate on the current version's training rows plus the new ones (``improve/vN/train.jsonl``),
   as ``protege train`` would, into ``versions/vN``.
5. **Compare** candidate and incumbent on the fixed held-out split (``signals/eval.jsonl``: gold accuracy where
   every row has a gold label, else agreement with the teacher) and on the fresh slice (agreement with the
   teacher), and promote the candidate only if it is not worse than the incumbent by more than ``margin`` on
   either; ``stage=True`` keeps a passing candidate back for ``protege serve --canary`` and ``protege promote``.
   ``improve/vN/report.md`` (and ``.json``) says what was done and why, either way.

The captured texts are the redacted ones (:mod:`protege.serve.capture`); a text the cascade's teacher answered
before redaction changed it is asked again, as what the student will be trained on. The new training rows are
kept in ``improve/vN/train.jsonl`` (they are the next version's training data), beyond the capture's retention
limit, as ``signals/`` keeps labeled data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ._io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from .errors import BudgetReached, ProtegeError
from .recipe import Recipe, build_recipe, set_dotted
from .store import Store
from .versions import STUDENT_DIR, Versions

__all__ = ["DEFAULT_MARGIN", "improve", "promote", "rollback"]

DEFAULT_MARGIN = 0.01
IMPROVE_DIR = "improve"
ROUND_ROWS = 32  # texts sent to the teacher at a time, least sure first: a budget stops between rounds


def _run(target: Path | str, overrides: dict[str, Any] | None = None) -> tuple[Path, Recipe]:
    """(run directory, its recipe with output_dir the run directory and ``overrides`` applied) from a run
    directory or a recipe file."""
    from .cost import locate_run

    run_dir, _, recipe = locate_run(Path(target), STUDENT_DIR)
    run_dir = Path(run_dir).resolve()
    data = {**recipe.model_dump(), "output_dir": run_dir}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    recipe = build_recipe(data)
    if recipe.task.kind == "generation":
        raise ProtegeError("`protege improve` trains classifier students; a language-model student's traffic is "
                           "captured (for your own use) but not yet trained on")
    return run_dir, recipe


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _training_rows(run_dir: Path, versions: Versions, name: str) -> list[dict[str, Any]]:
    """The signal rows version ``name`` was trained on: its ``improve/vN/train.jsonl``, else the run's signals."""
    path = run_dir / IMPROVE_DIR / name / "train.jsonl"
    if versions.versions[name].get("made_by") == "protege improve" and path.is_file():
        return _read_jsonl(path)
    path = run_dir / "signals" / "train.jsonl"
    if not path.is_file():
        raise ProtegeError(f"{str(path)!r} does not exist: the run's labeled training data is what a candidate "
                           "learns from beside the new traffic; run `protege label` first")
    return _read_jsonl(path)


def _signal_rows(recipe: Recipe, store: Store, examples: list[Any], teacher: Any, quiet: bool,
                 desc: str) -> tuple[list[dict[str, Any]], Any]:
    """The teacher's signal rows for ``examples`` (those it answered), and the labeling stats."""
    from .labeling.labeler import _ok_rows, label_examples, recipe_shots

    shots = recipe_shots(recipe)
    signals, keys, stats = label_examples(teacher, recipe, examples, store, quiet, desc=desc, shots=shots)
    return _ok_rows(recipe, shots, examples, signals, keys), stats


def _cached(recipe: Recipe, store: Store, examples: list[Any], teacher: Any) -> list[bool]:
    """Whether the store already holds the teacher's answer for each example (free to use)."""
    if teacher is None:  # an ensemble: each member's cache is checked as it labels; none is known free
        return [False] * len(examples)
    from .labeling.labeler import recipe_shots, requests_for
    from .store import call_key

    keys = [call_key(teacher.identity, r.to_json()) for r in requests_for(recipe, examples, recipe_shots(recipe))]
    done = store.get_signals(keys)
    return [k in done for k in keys]


def _score(student_dir: Path, rows: list[dict[str, Any]], labels: tuple[str, ...], use_gold: bool) -> dict[str, Any]:
    """A student on held-out signal rows: agreement with the teacher's label, accuracy against gold where
    there is gold, and the figure the decision uses (gold accuracy if every row has gold, else agreement)."""
    from .evaluation.classifier import student_probs

    probs, order = student_probs(student_dir, [r["text"] for r in rows])
    pred = [order[i] for i in probs.argmax(1)] if len(rows) else []
    agree = sum(p == r["teacher_label"] for p, r in zip(pred, rows))
    gold = [(p, r["gold"]) for p, r in zip(pred, rows) if r.get("gold") is not None]
    accuracy = sum(p == g for p, g in gold) / len(gold) if gold else None
    agreement = agree / len(rows) if rows else None
    by_gold = use_gold and rows and len(gold) == len(rows)
    return {"rows": len(rows), "agreement": agreement, "accuracy": accuracy,
            "metric": "accuracy" if by_gold else "agreement", "value": accuracy if by_gold else agreement}


def _decide(sets: dict[str, dict[str, Any]], margin: float) -> tuple[bool, list[str]]:
    """(promote?, one reason per held-out set): the candidate may trail the incumbent by at most ``margin``."""
    ok, reasons = True, []
    for name, s in sets.items():
        c, i = s["candidate"]["value"], s["incumbent"]["value"]
        what = f"{name} ({s['candidate']['rows']} texts, {s['candidate']['metric']})"
        if c is None or i is None:
            reasons.append(f"{what}: nothing to compare on")
            continue
        diff = c - i
        passed = diff >= -margin - 1e-12
        ok &= passed
        verdict = "within the margin" if passed else f"worse by more than the margin of {100 * margin:g} points"
        reasons.append(f"{what}: candidate {100 * c:.1f}% vs incumbent {100 * i:.1f}% ({100 * diff:+.1f} points), "
                       f"{verdict}")
    return ok, reasons


def improve(target: Path | str, *, margin: float = DEFAULT_MARGIN, holdout_fraction: float = 0.2,
            min_rows: int = 20, max_label: int | None = None, metric: str = "margin", stage: bool = False,
            quiet: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, compare and (maybe) promote the next student of the run ``target`` from its captured traffic (see
    the module). ``overrides``: recipe settings for the candidate's training (dotted keys, as the CLI's flags).
    Returns the report also written to ``improve/vN/report.json``."""
    from .labeling.data import Example
    from .labeling.uncertainty import pick
    from .pipeline import classifier_rows
    from .teachers import make_teacher
    from .training.classifier import train_student

    if not 0 < holdout_fraction < 1:
        raise ProtegeError(f"--holdout-fraction must be between 0 and 1, not {holdout_fraction}")
    if margin < 0:
        raise ProtegeError(f"--margin must be 0 or more (points of accuracy as a fraction), not {margin}")
    run_dir, base = _run(target)
    recipe = _run(target, overrides)[1] if overrides else base
    versions = Versions.load(run_dir)
    incumbent = versions.sync()
    through = versions.versions[incumbent]["captured_through"]
    old_rows = _training_rows(run_dir, versions, incumbent)
    eval_path = run_dir / "signals" / "eval.jsonl"
    if not eval_path.is_file():
        raise ProtegeError(f"{str(eval_path)!r} does not exist: the fixed held-out split is half of the "
                           "comparison; run `protege label` first")
    fixed = _read_jsonl(eval_path)
    known = {r["text"] for r in old_rows} | {r["text"] for r in fixed}
    t0 = time.time()
    with Store(recipe.store_path) as store:
        captured = [c for c in store.captured(after_id=through) if isinstance(c.input, str)]
        newest = max((c.id or 0 for c in captured), default=through)
        texts = list(dict.fromkeys(c.input.strip() for c in captured if c.input.strip()))
        texts = [t for t in texts if t not in known]
        if len(texts) < min_rows:
            raise ProtegeError(
                f"only {len(texts)} new captured texts since {incumbent} (captured rows after id {through}, "
                f"{len(captured)} in all, less those already trained on or in the evaluation split); improve "
                f"needs at least {min_rows} (--min-rows): serve with `protege serve --capture` and come back later")
        order = sorted(texts, key=lambda t: _rank(recipe.training.seed, t))
        n_hold = max(1, round(holdout_fraction * len(order)))
        held_texts, pool_texts = order[:n_hold], order[n_hold:]
        examples = {t: Example(id=f"captured-{hashlib.sha256(t.encode()).hexdigest()[:12]}", text=t, gold=None,
                               where="captured") for t in texts}
        teacher = None if recipe.teacher.kind == "ensemble" else make_teacher(recipe.teacher)
        spent_before = store.spent()
        fresh, hold_stats = _signal_rows(recipe, store, [examples[t] for t in held_texts], teacher, quiet,
                                         "label fresh held-out")
        pool = [examples[t] for t in pool_texts]
        free = _cached(recipe, store, pool, teacher)
        chosen = [e for e, f in zip(pool, free) if f]
        unsure = [e for e, f in zip(pool, free) if not f]
        new_rows, stopped = [], None
        if chosen:
            rows, _ = _signal_rows(recipe, store, chosen, teacher, True, "read answered")
            new_rows += rows
        if unsure:
            from .evaluation.classifier import student_probs

            probs, _ = student_probs(versions.student_dir, [e.text for e in unsure])
            cap = len(unsure) if max_label is None else min(max_label, len(unsure))
            ranked = [unsure[i] for i in pick(probs.tolist(), cap, metric,
                                              seed=recipe.training.seed)]
            for i in range(0, len(ranked), ROUND_ROWS):
                try:
                    rows, _ = _signal_rows(recipe, store, ranked[i : i + ROUND_ROWS], teacher, quiet,
                                           f"label traffic {i // ROUND_ROWS + 1}")
                except BudgetReached as e:
                    stopped = str(e)
                    rows, _ = _signal_rows(recipe, store, [x for x, f in zip(ranked[i : i + ROUND_ROWS], _cached(
                        recipe, store, ranked[i : i + ROUND_ROWS], teacher)) if f], teacher, True, "read answered")
                    new_rows += rows
                    break
                new_rows += rows
            if max_label is not None and max_label < len(unsure) and stopped is None:
                stopped = f"--max-label {max_label}: {len(unsure) - max_label} less informative texts left unlabelled"
        spent = store.spent() - spent_before
        name = versions.next_name()
        train_rows = old_rows + new_rows
        out = run_dir / IMPROVE_DIR / name
        write_jsonl_atomic(out / "train.jsonl", train_rows)
        write_jsonl_atomic(out / "fresh_eval.jsonl", fresh)
        # the run's recipe and signals it grew from (so `protege run` keeps it as current), and what it added
        meta = {
            "recipe_hash": base.section_hash("task", "data", "teacher", "student", "training"),
            "signals_hash": hashlib.sha256((run_dir / "signals" / "train.jsonl").read_bytes()).hexdigest()[:16],
            "improve": {"parent": incumbent, "train_hash": hashlib.sha256(
                (out / "train.jsonl").read_bytes()).hexdigest()[:16], "captured_through": newest,
                "overrides": overrides or {}},
        }
        summary = train_student(recipe, classifier_rows(recipe, train_rows), versions.path(name),
                                recipe.training.alpha, quiet, extra_meta=meta)
        store.log_compute("improve", summary["train_seconds"], examples=len(train_rows), version=name)
    labels = recipe.task.label_names
    sets = {}
    for set_name, rows, use_gold in (("fixed held-out", fixed, True), ("fresh traffic", fresh, False)):
        sets[set_name] = {"incumbent": _score(versions.path(incumbent), rows, labels, use_gold),
                          "candidate": _score(versions.path(name), rows, labels, use_gold)}
    passed, reasons = _decide(sets, margin)
    if passed and not stage:
        decision = "promoted"
    elif passed:
        decision = "staged"
    else:
        decision = "refused"
    report = {
        "version": name, "incumbent": incumbent, "decision": decision, "reasons": reasons, "margin": margin,
        "captured": {"rows": len(captured), "after_id": through, "through_id": newest, "new_texts": len(texts)},
        "fresh_held_out": {"texts": len(held_texts), "labelled": len(fresh), "called": hold_stats.called},
        "training": {"old_rows": len(old_rows), "new_rows": len(new_rows), "free": len(chosen),
                     "labelled_now": len(new_rows) - len(chosen), "pool": len(pool), "stopped": stopped,
                     "train_seconds": summary["train_seconds"]},
        "teacher_usd": spent, "sets": sets, "seconds": time.time() - t0,
    }
    versions.add(name, {"made_by": "protege improve", "parent": incumbent, "captured_through": newest,
                        "decision": decision, "reasons": reasons, "report": f"{IMPROVE_DIR}/{name}/report.md"})
    if decision == "promoted":
        versions.promote(name, "; ".join(reasons))
    elif decision == "staged":
        versions.candidate = name
        versions.save()
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", format_report(report))
    return report


def format_report(r: dict[str, Any]) -> str:
    """The improve report as Markdown."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    t, c = r["training"], r["captured"]
    lines = [
        f"# protege improve: {r['version']} from {r['incumbent']}",
        "",
        f"**Decision: {r['decision']}.** The candidate may trail the incumbent by at most "
        f"{100 * r['margin']:g} points on each held-out set.",
        "",
        *[f"- {reason}" for reason in r["reasons"]],
        "",
        "| held-out set | texts | incumbent agreement | candidate agreement | incumbent accuracy | candidate accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["sets"].items():
        i, k = s["incumbent"], s["candidate"]
        lines.append(f"| {name} | {i['rows']} | {pct(i['agreement'])} | {pct(k['agreement'])} | "
                     f"{pct(i['accuracy'])} | {pct(k['accuracy'])} |")
    lines += [
        "",
        "Agreement: the share of texts where the student's label is the teacher's; accuracy: against gold labels.",
        "",
        "## Data",
        "",
        f"- captured rows after id {c['after_id']}: {c['rows']}, {c['new_texts']} new texts (once each, not "
        "trained on before, not in the evaluation split)",
        f"- fresh held-out slice: {r['fresh_held_out']['texts']} texts, {r['fresh_held_out']['labelled']} answered "
        "by the teacher",
        f"- training: {t['old_rows']} rows of {r['incumbent']} + {t['new_rows']} new ({t['free']} the store "
        f"already held, {t['labelled_now']} labelled now, least sure first, of {t['pool']})",
        f"- teacher spend: ${r['teacher_usd']:.4f}",
    ]
    if t["stopped"]:
        lines.append(f"- stopped early: {t['stopped']}")
    return "\n".join(lines) + "\n"


def promote(target: Path | str, version: str | None = None, force: bool = False) -> tuple[str, str]:
    """Promote the staged candidate (or ``version``) of a run; one that failed its comparison only with
    ``force``. Returns (previous, promoted)."""
    run_dir, _ = _run(target)
    versions = Versions.load(run_dir)
    versions.sync()
    name = version or versions.candidate
    if name is None:
        raise ProtegeError(f"{str(run_dir)!r} has no staged candidate; name one with --version (`protege versions "
                           f"{run_dir}` lists them), or run `protege improve --stage` first")
    entry = versions.versions.get(name)
    if entry is None:
        raise ProtegeError(f"no version {name!r} in {str(run_dir)!r}; `protege versions {run_dir}` lists them")
    if name == versions.current:
        raise ProtegeError(f"{name} is already the current student")
    if entry.get("decision") == "refused" and not force:
        raise ProtegeError(f"{name} was refused by its comparison ({'; '.join(entry.get('reasons', []))}); pass "
                           "--force to promote it anyway")
    old = versions.current
    versions.promote(name, "promoted by hand" + (" (--force)" if force else ""))
    assert old is not None
    return old, name


def rollback(target: Path | str) -> tuple[str, str]:
    """Restore the run's previous student; (from, to)."""
    run_dir, _ = _run(target)
    versions = Versions.load(run_dir)
    versions.sync()
    return versions.rollback()
