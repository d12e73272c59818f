"""``protege improve``: the next student from the served student's own traffic (the flywheel of the design).

One call, on a run whose student served with ``--capture`` (a classifier's texts, or a language model's
conversations):

1. **Gather** the captured texts since the current version was made (rows of the store's ``captured`` table after
   the version's ``captured_through``), once each, leaving out the evaluation split's texts and the texts the
   current student already learned.
2. **Hold out** a slice of them (``holdout_fraction``, by a hash of the seed and the text, so a rerun draws the
   same one): the fresh test of recent traffic, labelled by the teacher in full.
3. **Label** the rest: a text the teacher already answered (in the cascade, or an earlier improve) costs nothing,
   the store has it; the others go to the teacher least sure first (a classifier: the current student's margin or
   entropy with diversity, :func:`protege.labeling.uncertainty.pick`; a language model: the confidence it
   served with, the mean probability of its tokens), in rounds, until ``max_label`` texts or the
   teacher's budget (``teacher.budget_usd``, which counts everything the store has spent) is reached; what the
   budget stopped is said in the report, not lost (a rerun with a higher cap goes on).
4. **Train** a candidate on the current version's training rows plus the new ones (``improve/vN/train.jsonl``),
   as ``protege train`` would, into ``versions/vN``.
5. **Compare** candidate and incumbent on the fixed held-out split (``signals/eval.jsonl``: gold accuracy where
   every row has a gold label, else agreement with the teacher) and on the fresh slice (agreement with the
   teacher; a language model: top-1 agreement with the teacher's replies, teacher forced, on both), and promote the candidate only if it is not worse than the incumbent by more than ``margin`` on
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
from .versions import STUDENT_DIR, Versions, exclusive

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
    return run_dir, build_recipe(data)


def _file_hash(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _training_rows(run_dir: Path, versions: Versions, name: str, recipe: Recipe) -> list[dict[str, Any]]:
    """The signal rows version ``name`` was trained on: its ``improve/vN/train.jsonl``, else the run's signals
    (with the student-labelled texts of teacher.select_student_labels, as the run's student had them)."""
    from .pipeline import student_labels_path

    path = run_dir / IMPROVE_DIR / name / "train.jsonl"
    if versions.versions[name].get("made_by") == "protege improve" and path.is_file():
        return _read_jsonl(path)
    path = run_dir / "signals" / "train.jsonl"
    if not path.is_file():
        raise ProtegeError(f"{str(path)!r} does not exist: the run's labeled training data is what a candidate "
                           "learns from beside the new traffic; run `protege label` first")
    extra = student_labels_path(recipe)
    return _read_jsonl(path) + (_read_jsonl(extra) if extra else [])


class _Items:
    """The new captured inputs as labeling sees them: an example and the teacher's request for each (a classifier's
    text rendered as labeling renders it; a conversation as the cascade asks about it, so the keys match)."""

    def __init__(self, recipe: Recipe, teacher: Any, inputs: list[str | list[dict[str, str]]]):
        from .labeling.data import Example
        from .labeling.labeler import recipe_shots, requests_for
        from .labeling.prompts import conversation_request

        self.recipe, self.teacher, self.shots = recipe, teacher, recipe_shots(recipe)
        self.examples, self.requests = [], []
        for x in inputs:
            key = _identity(x)
            text = x if isinstance(x, str) else next((m["content"] for m in reversed(x) if m["role"] == "user"), "")
            self.examples.append(Example(id=f"captured-{hashlib.sha256(key.encode()).hexdigest()[:12]}", text=text,
                                         gold=None, where="captured"))
            if not isinstance(x, str):
                t = recipe.teacher
                self.requests.append(conversation_request(recipe.task, x, t.max_tokens, t.top_logprobs))
        if recipe.task.kind == "classification":
            self.requests = requests_for(recipe, self.examples, self.shots)

    def label(self, idx: list[int], store: Store, quiet: bool, desc: str) -> tuple[list[dict[str, Any]], Any]:
        """The teacher's signal rows for items ``idx`` (those it answered), and the labeling stats."""
        from .labeling.labeler import _ok_rows, label_examples, label_requests

        examples, requests = [self.examples[i] for i in idx], [self.requests[i] for i in idx]
        if self.teacher is None:  # an ensemble labels through each member
            signals, keys, stats = label_examples(None, self.recipe, examples, store, quiet, desc, self.shots)
        else:
            signals, keys, stats = label_requests(self.teacher, self.recipe, requests, store, quiet, desc)
        return _ok_rows(self.recipe, self.shots, examples, signals, keys, requests), stats

    def cached(self, idx: list[int], store: Store) -> list[bool]:
        """Whether the store already holds the teacher's answer for each of items ``idx`` (free to use)."""
        if self.teacher is None:  # an ensemble: each member's cache is checked as it labels; none is known free
            return [False] * len(idx)
        from .store import call_key

        keys = [call_key(self.teacher.identity, self.requests[i].to_json()) for i in idx]
        done = store.get_signals(keys)
        return [k in done for k in keys]


def _identity(x: str | list[dict[str, str]] | tuple[dict[str, str], ...]) -> str:
    """What makes two captured inputs the same: the text, or the conversation."""
    return x.strip() if isinstance(x, str) else json.dumps([dict(m) for m in x], sort_keys=True, ensure_ascii=False)


def _row_identity(row: dict[str, Any], kind: str) -> str:
    """The same for a signal row: its text (classification) or the conversation the teacher saw (generation)."""
    return _identity(row["text"] if kind == "classification" else row["messages"])


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


def _score_lm(student_dir: Path, rows: list[dict[str, Any]], recipe: Recipe) -> dict[str, Any]:
    """A language-model student on held-out signal rows: its top-1 agreement with the teacher's replies, teacher
    forced (the share of the teacher's tokens it would have chosen itself)."""
    from .evaluation.lm import lm_figures
    from .students.lm import load_lm_student

    model, tok, card = load_lm_student(student_dir)
    agreement = lm_figures(model, tok, rows, recipe, chat=card.chat, generate=False)["top1_agreement"] if rows \
        else None
    return {"rows": len(rows), "agreement": agreement, "accuracy": None, "metric": "top-1 agreement",
            "value": agreement}


def _decide(sets: dict[str, dict[str, Any]], margin: float) -> tuple[bool, list[str]]:
    """(promote?, one reason per held-out set): the candidate may trail the incumbent by at most ``margin``."""
    ok, reasons = True, []
    for name, s in sets.items():
        c, i = s["candidate"]["value"], s["incumbent"]["value"]
        what = f"{name} ({s['candidate']['rows']} texts, {s['candidate']['metric']})"
        if c is None or i is None:  # the teacher answered none of it: no evidence is no pass
            ok = False
            reasons.append(f"{what}: nothing to compare on (the teacher answered none of it), so no promotion")
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
    the module), holding the run's versions lock. ``overrides``: recipe settings for the candidate's training
    (dotted keys, as the CLI's flags). Returns the report also written to ``improve/vN/report.json``."""
    if not 0 < holdout_fraction < 1:
        raise ProtegeError(f"--holdout-fraction must be between 0 and 1, not {holdout_fraction}")
    if margin < 0:
        raise ProtegeError(f"--margin must be 0 or more (points of accuracy as a fraction), not {margin}")
    run_dir, base = _run(target)
    recipe = _run(target, overrides)[1] if overrides else base
    with exclusive(run_dir, "improve"):
        return _improve(run_dir, base, recipe, margin, holdout_fraction, min_rows, max_label, metric, stage, quiet,
                        overrides)


def _improve(run_dir: Path, base: Recipe, recipe: Recipe, margin: float, holdout_fraction: float, min_rows: int,
             max_label: int | None, metric: str, stage: bool, quiet: bool,
             overrides: dict[str, Any] | None) -> dict[str, Any]:
    from .labeling.uncertainty import pick
    from .pipeline import classifier_rows
    from .teachers import make_teacher
    from .training.classifier import train_student

    versions = Versions.load(run_dir)
    incumbent = versions.sync()
    through = versions.versions[incumbent]["captured_through"]
    old_rows = _training_rows(run_dir, versions, incumbent, base)
    eval_path = run_dir / "signals" / "eval.jsonl"
    if not eval_path.is_file():
        raise ProtegeError(f"{str(eval_path)!r} does not exist: the fixed held-out split is half of the "
                           "comparison; run `protege label` first")
    fixed = _read_jsonl(eval_path)
    kind = recipe.task.kind
    known = {_row_identity(r, kind) for r in old_rows + fixed}
    t0 = time.time()
    with Store(recipe.store_path) as store:
        captured = [c for c in store.captured(after_id=through)
                    if isinstance(c.input, str) == (kind == "classification")]
        newest = max((c.id or 0 for c in captured), default=through)
        inputs: dict[str, Any] = {}  # identity -> the input, once each, oldest first
        sureness: dict[str, float] = {}  # identity -> the least confidence the student had in it
        for c in captured:
            key = _identity(c.input)
            if key and key not in known:
                inputs.setdefault(key, c.input.strip() if isinstance(c.input, str) else c.input)
                if c.confidence is not None:
                    sureness[key] = min(sureness.get(key, 1.0), c.confidence)
        if len(inputs) < min_rows:
            raise ProtegeError(
                f"only {len(inputs)} new captured texts since {incumbent} (captured rows after id {through}, "
                f"{len(captured)} in all, less those already trained on or in the evaluation split); improve "
                f"needs at least {min_rows} (--min-rows): serve with `protege serve --capture` and come back later")
        order = sorted(inputs, key=lambda k: _rank(recipe.training.seed, k))
        n_hold = max(1, round(holdout_fraction * len(order)))
        teacher = None if recipe.teacher.kind == "ensemble" else make_teacher(recipe.teacher)
        items = _Items(recipe, teacher, [inputs[k] for k in order])
        held, pool = list(range(n_hold)), list(range(n_hold, len(order)))
        spent_before = store.spent()
        fresh, hold_stats = items.label(held, store, quiet, "label fresh held-out")
        free = items.cached(pool, store)
        chosen = [i for i, f in zip(pool, free) if f]
        unsure = [i for i, f in zip(pool, free) if not f]
        new_rows, stopped, asked = [], None, len(chosen)
        if chosen:
            new_rows += items.label(chosen, store, True, "read answered")[0]
        if unsure:
            cap = len(unsure) if max_label is None else min(max_label, len(unsure))
            if kind == "classification":  # the current student's doubts now, spread over its predicted labels
                from .evaluation.classifier import student_probs

                probs, _ = student_probs(versions.student_dir, [items.examples[i].text for i in unsure])
                ranked = [unsure[j] for j in pick(probs.tolist(), cap, metric, seed=recipe.training.seed)]
            else:  # a language model's doubt as it served: the mean probability of the tokens it chose
                ranked = sorted(unsure, key=lambda i: sureness.get(order[i], 1.0))[:cap]
            # rounds, so a budget stops between them; a provider's batch API gets one batch (each waits for hours)
            size = len(ranked) if recipe.teacher.batch_api else ROUND_ROWS
            for r in range(0, len(ranked), size):
                batch = ranked[r : r + size]
                try:
                    new_rows += items.label(batch, store, quiet, f"label traffic {r // size + 1}")[0]
                    asked += len(batch)
                except BudgetReached as e:  # keep what was bought before the cap, and stop
                    stopped = str(e)
                    bought = [i for i, f in zip(batch, items.cached(batch, store)) if f]
                    new_rows += items.label(bought, store, True, "read answered")[0]
                    asked += len(bought)
                    break
            if max_label is not None and max_label < len(unsure) and stopped is None:
                stopped = f"--max-label {max_label}: {len(unsure) - max_label} less informative texts left unlabelled"
        # a stop left texts unlabelled: the next improve reads the traffic from where this one started again (what
        # this one labelled is in the store, free; what it trained on is left out as known)
        through_next = through if stopped else newest
        name = versions.next_name()
        train_rows = old_rows + new_rows
        out = run_dir / IMPROVE_DIR / name
        write_jsonl_atomic(out / "train.jsonl", train_rows)
        write_jsonl_atomic(out / "fresh_eval.jsonl", fresh)
        # the run's recipe and signals it grew from (so `protege run` keeps it as current), and what it added
        meta = {
            "recipe_hash": base.section_hash("task", "data", "teacher", "student", "training"),
            "signals_hash": _file_hash(run_dir / "signals" / "train.jsonl"),
            "improve": {"parent": incumbent, "train_hash": _file_hash(out / "train.jsonl"),
                        "captured_through": through_next, "overrides": overrides or {}},
        }
        if kind == "classification":
            summary = train_student(recipe, classifier_rows(recipe, train_rows), versions.path(name),
                                    recipe.training.alpha, quiet, extra_meta=meta)
        else:
            from .pipeline import lm_rows
            from .training.lm import train_lm

            summary = train_lm(recipe, lm_rows(recipe, train_rows), versions.path(name), quiet, extra_meta=meta,
                               store=store)
        store.log_compute("improve", summary["train_seconds"], examples=len(train_rows), version=name)
        spent = store.spent() - spent_before  # labeling, and a served teacher scoring on-policy training
    sets = {}
    for set_name, rows, use_gold in (("fixed held-out", fixed, True), ("fresh traffic", fresh, False)):
        if kind == "classification":
            labels = recipe.task.label_names
            sets[set_name] = {"incumbent": _score(versions.path(incumbent), rows, labels, use_gold),
                              "candidate": _score(versions.path(name), rows, labels, use_gold)}
        else:
            sets[set_name] = {"incumbent": _score_lm(versions.path(incumbent), rows, recipe),
                              "candidate": _score_lm(versions.path(name), rows, recipe)}
    passed, reasons = _decide(sets, margin)
    if passed and not stage:
        decision = "promoted"
    elif passed:
        decision = "staged"
    else:
        decision = "refused"
    report = {
        "run_dir": str(run_dir), "version": name, "incumbent": incumbent, "kind": kind, "decision": decision, "reasons": reasons, "margin": margin,
        "captured": {"rows": len(captured), "after_id": through, "through_id": newest, "new_texts": len(inputs)},
        "fresh_held_out": {"texts": len(held), "labelled": len(fresh), "called": hold_stats.called,
                           "teacher_failed": len(held) - len(fresh)},
        "training": {"old_rows": len(old_rows), "new_rows": len(new_rows), "free": len(chosen),
                     "teacher_failed": asked - len(new_rows),
                     "labelled_now": len(new_rows) - len(chosen), "pool": len(pool), "stopped": stopped,
                     "train_seconds": summary["train_seconds"]},
        "teacher_usd": spent, "sets": sets, "seconds": time.time() - t0,
    }
    versions.add(name, {"made_by": "protege improve", "parent": incumbent, "captured_through": through_next,
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
        "Agreement: the share of texts where the student's label is the teacher's; accuracy: against gold labels."
        if r.get("kind") != "generation" else "Agreement (top-1): the share of the teacher's reply tokens the student "
        "would have chosen itself, teacher forced.",
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
        lines.append(f"- stopped early: {t['stopped']}; the next improve reads this traffic again (what was "
                     "labelled is in the store, free)")
    failed = t.get("teacher_failed", 0) + r["fresh_held_out"].get("teacher_failed", 0)
    if failed:
        lines.append(f"- the teacher failed on {failed} texts (left out; their reasons are in the store)")
    return "\n".join(lines) + "\n"


def promote(target: Path | str, version: str | None = None, force: bool = False) -> tuple[str, str]:
    """Promote the staged candidate (or ``version``) of a run; one that failed its comparison only with
    ``force``. Returns (previous, promoted)."""
    run_dir, _ = _run(target)
    with exclusive(run_dir, "promote"):
        return _promote(run_dir, version, force)


def _promote(run_dir: Path, version: str | None, force: bool) -> tuple[str, str]:
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
    with exclusive(run_dir, "rollback"):
        versions = Versions.load(run_dir)
        versions.sync()
        return versions.rollback()
