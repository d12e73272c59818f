"""The lifetime of a student from its run's store: what it cost to make, what serving it has cost, what it saved
against sending every served request to the teacher, and after how many requests it pays for itself.

All figures come from one SQLite store (see :mod:`protege.store`):

* making it: the teacher calls of labeling (USD recorded per call, plus what unanswered calls may have been
  billed), and the compute of each stage in ``compute``: labeling's recorded cost (a local teacher's compute,
  priced when it ran), training and evaluation seconds times the compute price;
* serving it: the ``served`` rows of the student (its compute, the teacher's fallbacks and their tokens);
* the teacher's cost per request: the mean recorded spend of its answered calls; when those recorded nothing
  (a price set after labeling), the price table times their mean tokens; a local teacher's mean compute time
  per call at the compute price.

Compute is priced one way throughout: a request's seconds of machine time (a batched text's share of its
batch) times the compute price, the definition the report's cost per 1,000 requests uses
(:func:`protege.evaluation.measure.compute_cost`), so its estimate and the served figures compare.

Teacher calls made while serving (the cascade's fallbacks that were not in the store) count as serving, not
as making. One exception: a call that outlives its request's wait (``protege serve --teacher-timeout``) is
finished and stored, but no served row names it, so it counts with labeling's calls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ProtegeError
from .recipe import Recipe, load_recipe
from .store import Store

__all__ = ["format_lifetime", "lifetime", "locate_run"]


def locate_run(target: Path, student: str) -> tuple[Path, Path, Recipe]:
    """(run directory, student directory, recipe) from a recipe file, a run directory or a student directory."""
    target = Path(target)
    if target.is_file():
        recipe = load_recipe(target)
        run_dir = recipe.output_dir
    elif target.is_dir():
        if (target / "protege.json").is_file():  # a student directory: its run is the parent
            run_dir, student = target.resolve().parent, target.resolve().name
        else:
            run_dir = target
        saved = [run_dir / student / "recipe.yaml", run_dir / "recipe.yaml", run_dir / "signals" / "recipe.yaml"]
        found = next((p for p in saved if p.is_file()), None)
        if found is None:
            raise ProtegeError(f"{str(target)!r} holds no saved recipe (looked for {', '.join(map(str, saved))}); "
                               "pass the recipe file or the run directory `protege run` wrote")
        recipe = load_recipe(found)
    else:
        raise ProtegeError(f"{str(target)!r} does not exist; pass a recipe file or a run directory")
    if not (run_dir / "protege.db").is_file():
        raise ProtegeError(f"no store at {str(run_dir / 'protege.db')!r}: nothing has been labeled, trained or "
                           "served for this run yet; run `protege run` first")
    student_dir = run_dir / student
    if not (student_dir / "protege.json").is_file():
        raise ProtegeError(f"no trained student {student!r} in {str(run_dir)!r}; run `protege train` first "
                           "(or name another with --student)")
    return run_dir, student_dir, recipe


def _teacher_per_request(store: Store, recipe: Recipe, usd_per_hour: float) -> tuple[float | None, str]:
    """What one request to the teacher costs, and how that was worked out."""
    name = recipe.teacher.model
    n, usd, tin, tout, secs = store.answered_means(name)
    if not n:
        return None, f"no answered calls of {name} in the store"
    if recipe.teacher.kind == "local":
        return secs / 3600 * usd_per_hour, f"local teacher: mean {secs:.3f}s of compute per call at ${usd_per_hour:g}/hour"
    if usd > 0:
        return usd, f"mean recorded spend of {n} answered calls of {name}"
    from .teachers import make_teacher

    price = make_teacher(recipe.teacher).price
    basis = (f"price table x mean tokens of {n} calls ({tin:.0f} in, {tout:.0f} out; ${price.input:g}/"
             f"${price.output:g} per million)")
    return price.cost(round(tin), round(tout)), basis


def lifetime(target: Path | str, student: str = "student", compute_usd_per_hour: float | None = None) -> dict[str, Any]:
    """The cost ledger of one student (see the module docstring); ``target`` is a recipe file, a run directory
    or a student directory. Raises ProtegeError (exit 2) when there is no store or no such student."""
    run_dir, student_dir, recipe = locate_run(Path(target), student)
    student = student_dir.name
    price = recipe.eval.compute_usd_per_hour if compute_usd_per_hour is None else compute_usd_per_hour
    with Store(run_dir / "protege.db") as store:
        made = store.teacher_totals(include_served=False)  # the cascade's new calls are serving's cost
        calls, tin, tout = made["calls"], made["input_tokens"], made["output_tokens"]
        teacher_usd = made["cost_usd"] + made["uncertain_usd"]
        compute = {}
        for stage, totals in store.compute_totals().items():
            # labeling priced its compute when it ran (0 for an API teacher: its cost is the calls');
            # training and evaluation recorded only their seconds
            usd = totals["cost_usd"] if stage == "label" else totals["seconds"] / 3600 * price
            compute[stage] = {"runs": totals["runs"], "seconds": totals["seconds"], "usd": usd}
        served = store.served_totals(student)
        served_versions = store.served_by_version(student)
        per_teacher, per_teacher_basis = _teacher_per_request(store, recipe, price)

    compute_usd = sum(c["usd"] for c in compute.values())
    make = {
        "teacher_calls": calls,
        "teacher_usd": teacher_usd,
        "teacher_input_tokens": tin,
        "teacher_output_tokens": tout,
        "compute": compute,
        "compute_usd": compute_usd,
        "total_usd": teacher_usd + compute_usd,
    }

    empty = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "teacher_usd": 0.0,
             "seconds": 0.0, "cached": 0}
    by = {who: {**empty, **served.get(who, {})} for who in ("student", "teacher", "none")}
    requests = sum(b["requests"] for b in by.values())
    serving_usd = sum(b["cost_usd"] for b in by.values())
    fallback_usd = sum(b["teacher_usd"] for b in by.values())
    serving = {
        "requests": requests,
        "student_answers": by["student"],
        "teacher_answers": by["teacher"],
        "teacher_failed": by["none"],
        "student_compute_usd": serving_usd - fallback_usd,
        "teacher_usd": fallback_usd,
        "total_usd": serving_usd,
        "compute_usd_per_hour": price,
    }

    # what a request costs the student's way: as measured while serving, else the evaluation's estimate
    per_served, per_served_basis = None, "nothing served yet and no report.json to estimate from"
    if requests:
        per_served, per_served_basis = serving_usd / requests, f"measured over {requests} served requests"
    else:
        report = run_dir / "report.json"
        model = json.loads(report.read_text()).get("models", {}).get(student) if report.is_file() else None
        if model and model.get("usd_per_1k") is not None:
            per_served = model["usd_per_1k"] / 1000
            per_served_basis = "report.json: the student's evaluation (no fallbacks; nothing served yet)"

    saving = None if per_teacher is None or per_served is None else per_teacher - per_served
    if saving is None:
        payback, verdict = None, "unknown (" + ("no teacher cost" if per_teacher is None else "no serving cost") + ")"
    elif saving <= 0:
        payback, verdict = None, "never: a served request costs more than asking the teacher"
    else:
        payback = math.ceil(make["total_usd"] / saving)
        verdict = (f"after {payback:,} requests" + (f" (paid off: {requests:,} served)" if requests >= payback
                                                    else f" ({payback - requests:,} to go)"))
    savings = {
        "teacher_usd_per_request": per_teacher,
        "teacher_basis": per_teacher_basis,
        "served_usd_per_request": per_served,
        "served_basis": per_served_basis,
        "saving_per_request_usd": saving,
        "all_to_teacher_usd": None if per_teacher is None else requests * per_teacher,
        "saved_usd": None if per_teacher is None else requests * per_teacher - serving_usd,
    }
    from .versions import Versions

    names = Versions.load(run_dir)
    by_version = [
        {"version": (names.by_card(card) or card) if card else "before versions", "card": card,
         "requests": v["requests"], "student_answers": v["student_answers"], "serving_usd": v["cost_usd"],
         "teacher_usd": v["teacher_usd"],
         "saved_usd": None if per_teacher is None else v["requests"] * per_teacher - v["cost_usd"]}
        for card, v in served_versions.items()
    ]
    return {
        "run_dir": str(run_dir),
        "student": student,
        "teacher": recipe.teacher.model,
        "make": make,
        "serving": serving,
        "by_version": by_version,
        "savings": savings,
        "payback_requests": payback,
        "payback": verdict,
    }


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.6f}"


def format_lifetime(d: dict[str, Any]) -> str:
    """The ledger as a plain-text table."""
    m, s, v = d["make"], d["serving"], d["savings"]
    rows: list[tuple[str, str, str]] = [("making it", "", "")]
    calls = f"{m['teacher_calls']:,} calls, {m['teacher_input_tokens']:,} in / {m['teacher_output_tokens']:,} out tokens"
    rows.append(("  teacher calls (labeling)", calls, _usd(m["teacher_usd"])))
    for stage, c in m["compute"].items():
        rows.append((f"  compute: {stage}", f"{c['seconds']:,.1f} s in {c['runs']} run(s)", _usd(c["usd"])))
    rows.append(("  total", "", _usd(m["total_usd"])))
    rows.append(("serving it", f"{s['requests']:,} requests", ""))
    for key, name in (("student_answers", "student answers"), ("teacher_answers", "teacher fallbacks"),
                      ("teacher_failed", "teacher failures")):
        b = s[key]
        if key == "teacher_failed" and not b["requests"]:
            continue
        what = f"{b['requests']:,}, {b['input_tokens']:,} in / {b['output_tokens']:,} out tokens"
        if key == "teacher_answers":
            what += f", {b['cached']:,} from the store"
        rows.append((f"  {name}", what, _usd(b["cost_usd"])))
    rows.append(("  of which paid to the teacher", "", _usd(s["teacher_usd"])))
    rows.append(("  total", f"student compute at ${s['compute_usd_per_hour']:g}/hour", _usd(s["total_usd"])))
    if len(d["by_version"]) > 1 or any(v["card"] for v in d["by_version"]):
        rows.append(("by version", "requests, answered by the student; spent, of which teacher; saved", ""))
        for v in d["by_version"]:
            share = v["student_answers"] / v["requests"] if v["requests"] else 0.0
            rows.append((f"  {v['version']}", f"{v['requests']:,}, {100 * share:.1f}% by the student; "
                         f"{_usd(v['serving_usd'])}, {_usd(v['teacher_usd'])}; saved", _usd(v["saved_usd"])))
    rows.append(("against the teacher", "", ""))
    rows.append(("  teacher per request", v["teacher_basis"], _usd(v["teacher_usd_per_request"])))
    rows.append(("  served per request", v["served_basis"], _usd(v["served_usd_per_request"])))
    rows.append(("  all served to teacher", f"{s['requests']:,} requests", _usd(v["all_to_teacher_usd"])))
    rows.append(("  saved so far", "", _usd(v["saved_usd"])))
    rows.append(("pays for itself", d["payback"], ""))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    head = f"cost of {d['student']} (teacher {d['teacher']}), run {d['run_dir']}"
    return "\n".join([head] + [f"{a:<{w0}}  {b:<{w1}}  {c:>14}".rstrip() for a, b, c in rows])
