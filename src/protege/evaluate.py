"""Evaluate students against the teacher and gold labels on the held-out split; write the report.

Quality (accuracy, agreement, quality kept, calibration) comes from the held-out signals and the students'
predictions. Speed is measured here, on this machine: latency one example at a time (p50, p95) and batched
throughput. Money per 1,000 examples is the API price for API teachers, and measured compute time times
``eval.compute_usd_per_hour`` for local models. With ``eval.cascade_sweep`` the report also sweeps the
cascade's threshold on the same predictions (:func:`protege.cascade.cascade_sweep`).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from ._io import content_hash
from .engine import ApiTeacher
from .errors import ProtegeError
from .label import read_signals
from .recipe import Recipe
from .store import Store
from .students import count_parameters, load_student
from .task import render_request
from .teachers import make_teacher

__all__ = ["evaluate", "expected_calibration_error"]

STUDENTS = (("student", "distilled student"), ("student-hard", "hard-label student"))


def expected_calibration_error(probs: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over equal-width confidence bins.

    probs: (N, C) predicted distributions; correct: (N,) bool, whether the top label was right.
    """
    conf = probs.max(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _quality(probs: np.ndarray, gold: np.ndarray, has_gold: np.ndarray, bins: int) -> dict[str, Any]:
    pred = probs.argmax(1)
    if not has_gold.any():
        return {"accuracy": None, "ece": None}
    correct = pred[has_gold] == gold[has_gold]
    return {"accuracy": float(correct.mean()), "ece": expected_calibration_error(probs[has_gold], correct, bins)}


@torch.inference_mode()
def _student_predict(model: Any, tok: Any, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(torch.softmax(model(**enc).logits.float(), -1).numpy())
    return np.concatenate(out)


def _speed(one: Any, many: Any, texts: list[str], n: int) -> dict[str, float]:
    """Latency of ``one(text)`` over n texts (after one warm-up), and throughput of ``many(texts)``."""
    sample = (texts * (n // len(texts) + 1))[:n]
    one(sample[0])
    lat = []
    for t in sample:
        t0 = time.perf_counter()
        one(t)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    many(sample)
    dt = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
    return {
        "latency_ms_p50": 1e3 * statistics.median(lat),
        "latency_ms_p95": 1e3 * q[18],
        "throughput_per_s": len(sample) / dt,
    }


def _money(speed: dict[str, float], usd_per_hour: float) -> dict[str, float]:
    seconds = 1000 / speed["throughput_per_s"]
    return {"compute_seconds_per_1k": seconds, "usd_per_1k": seconds / 3600 * usd_per_hour, "price_source": "compute"}


def _api_teacher_figures(recipe: Recipe, keys: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """An API teacher's latency and price per 1,000 texts, from what labeling recorded: each held-out row's
    wall time (retries and rate-limit waits included, as the user waited for them), its recorded spend, and
    the rows per second the labeling runs achieved."""
    with Store(recipe.store_path) as store:
        recorded = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            recorded += store.db.execute(
                f"SELECT seconds, cost_usd FROM calls WHERE status = 'ok' AND key IN ({marks})", chunk
            ).fetchall()
        runs = store.db.execute(
            "SELECT SUM(seconds), SUM(json_extract(detail, '$.rows')) FROM compute WHERE stage = 'label'"
        ).fetchone()
    if not recorded:
        raise ProtegeError("the store holds none of the held-out answers; run `protege label` first")
    lat = sorted(1e3 * s for s, _ in recorded)
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
    seconds, labeled = runs
    throughput = labeled / seconds if seconds and labeled else recipe.teacher.concurrency / (statistics.mean(lat) / 1e3)
    speed = {"latency_ms_p50": statistics.median(lat), "latency_ms_p95": q[18], "throughput_per_s": throughput}
    per_row = statistics.mean(c for _, c in recorded)
    return speed, {"usd_per_1k": 1000 * per_row, "price_source": "recorded API spend"}


def evaluate(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 3: compare teacher and students on the eval split; write report.json, report.md and plots."""
    if recipe.task.kind == "generation":
        from .evaluate_lm import evaluate_lm

        return evaluate_lm(recipe, quiet, force)
    out = recipe.output_dir
    rows = read_signals(recipe, "eval")
    present = [(d, name) for d, name in STUDENTS if (out / d / "protege.json").is_file()]
    if not present:
        raise ProtegeError(f"no trained student under {str(out)!r}; run `protege train` first")
    inputs = {
        "eval": recipe.section_hash("eval"),
        "signals": content_hash(rows),
        "students": {d: json.loads((out / d / "protege.json").read_text()) for d, _ in present},
    }
    inputs_hash = content_hash(inputs)[:16]
    report_path = out / "report.json"
    if not force and report_path.is_file() and json.loads(report_path.read_text()).get("inputs_hash") == inputs_hash:
        return json.loads(report_path.read_text())

    started = time.perf_counter()
    labels = recipe.task.label_names
    texts = [r["text"] for r in rows]
    has_gold = np.array([r["gold"] is not None for r in rows])
    gold = np.array([labels.index(r["gold"]) if r["gold"] is not None else -1 for r in rows])
    t_probs = np.array([r["teacher_probs"] for r in rows])  # (N, C)
    t_pred = t_probs.argmax(1)
    bins, n_lat, usd_h = recipe.eval.calibration_bins, recipe.eval.latency_samples, recipe.eval.compute_usd_per_hour
    methods = sorted({r["method"] for r in rows})

    teacher = make_teacher(recipe.teacher)
    if isinstance(teacher, ApiTeacher):
        # Never pay an API again just to time it: its latency and price are what labeling recorded.
        t_speed, t_money = _api_teacher_figures(recipe, [r["call_key"] for r in rows])
    else:
        # A local teacher is timed fresh, one text at a time; a measurement, not labeling, so not logged as calls.
        reqs = {t: render_request(recipe.task, t) for t in texts}
        t_speed = _speed(
            lambda t: teacher.signals([reqs[t]]), lambda ts: teacher.signals([reqs[t] for t in ts]), texts, n_lat
        )
        t_money = _money(t_speed, usd_h)
    models: dict[str, Any] = {
        "teacher": {
            "name": recipe.teacher.model,
            "parameters": getattr(teacher, "num_parameters", None),
            "signal_method": methods,
            **_quality(t_probs, gold, has_gold, bins),
            **t_speed,
            **t_money,
            "mean_label_mass": float(np.mean([r.get("label_mass", 1.0) for r in rows])),
        }
    }
    preds: dict[str, np.ndarray] = {"teacher": t_probs}
    for d, name in present:
        model, tok, meta = load_student(out / d)
        ml = recipe.student.max_length
        probs = _student_predict(model, tok, texts, ml)
        preds[d] = probs
        speed = _speed(
            lambda t: _student_predict(model, tok, [t], ml), lambda ts: _student_predict(model, tok, ts, ml), texts, n_lat
        )
        q = _quality(probs, gold, has_gold, bins)
        ta = models["teacher"]["accuracy"]
        models[d] = {
            "name": name,
            "alpha": meta["alpha"],
            "parameters": count_parameters(model),
            **q,
            "agreement_with_teacher": float((probs.argmax(1) == t_pred).mean()),
            "quality_kept": None if not ta or q["accuracy"] is None else q["accuracy"] / ta,
            **speed,
            **_money(speed, usd_h),
            "train_seconds": meta["train_seconds"],
        }

    report = {
        "inputs_hash": inputs_hash,
        "task": {"labels": list(labels), "chance_accuracy": 1 / len(labels)},
        "eval_examples": len(rows),
        "eval_with_gold": int(has_gold.sum()),
        "models": models,
    }
    if recipe.eval.cascade_sweep:
        from .cascade import cascade_sweep

        d = present[0][0]  # the distilled student, else the baseline
        report["cascade"] = {
            "student": d,
            **cascade_sweep(preds[d], t_probs, gold, has_gold, models[d]["usd_per_1k"],
                            models["teacher"]["usd_per_1k"], recipe.eval.keep_fraction),
        }
    with Store(recipe.store_path) as store:
        store.log_compute("eval", time.perf_counter() - started, examples=len(rows))
        # What making this student has cost so far: teacher calls (money and compute) and compute per stage.
        report["ledger"] = {"teacher": store.teacher_totals(recipe.teacher.model), "compute": store.compute_totals()}
    from .report import write_report

    write_report(report, preds, gold, has_gold, recipe, out)
    return report
