"""Evaluate students against the teacher and gold labels on the held-out split; write the report.

Quality (accuracy, agreement, quality kept, calibration) comes from the held-out signals and the students'
predictions. Speed is measured here, on this machine: latency one example at a time (p50, p95) and batched
throughput. Money per 1,000 examples is the API price for API teachers, and measured compute time times
``eval.compute_usd_per_hour`` for local models. With ``eval.cascade_sweep`` the report also sweeps the
cascade's threshold on the same predictions (:func:`protege.evaluation.sweep.cascade_sweep`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from .._io import content_hash
from ..errors import ProtegeError
from ..labeling.labeler import read_signals
from ..labeling.prompts import render_request
from ..recipe import Recipe
from ..store import Store
from ..students.classifier import count_parameters, load_student
from ..teachers import make_teacher
from .measure import Speed, _api_teacher_figures, compute_cost, expected_calibration_error, summarize_latency, time_calls

__all__ = ["evaluate_classifier"]

STUDENTS = (("student", "distilled student"), ("student-hard", "hard-label student"))


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


def _speed(one: Any, many: Any, texts: list[str], n: int) -> Speed:
    """Latency of ``one(text)`` over n texts (after one warm-up), and throughput of ``many(texts)``."""
    sample = (texts * (n // len(texts) + 1))[:n]
    (lat,) = time_calls([lambda i: one(sample[i % n])], n, warmup=1)
    t0 = time.perf_counter()
    many(sample)
    return Speed(summarize_latency(lat), len(sample) / (time.perf_counter() - t0))


def evaluate_classifier(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Compare teacher and classifier students on the eval split; write report.json, report.md and plots."""
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
    if teacher.kind == "api":
        # Never pay an API again just to time it: its latency and price are what labeling recorded.
        t_speed, t_money = _api_teacher_figures(recipe, [r["call_key"] for r in rows])
    else:
        # A local teacher is timed fresh, one text at a time; a measurement, not labeling, so not logged as calls.
        reqs = {t: render_request(recipe.task, t) for t in texts}
        t_speed = _speed(
            lambda t: teacher.signals([reqs[t]]), lambda ts: teacher.signals([reqs[t] for t in ts]), texts, n_lat
        )
        t_money = compute_cost(t_speed.throughput_per_s, usd_h)
    models: dict[str, Any] = {
        "teacher": {
            "name": recipe.teacher.model,
            "parameters": teacher.num_parameters if teacher.kind == "local" else None,
            "signal_method": methods,
            **_quality(t_probs, gold, has_gold, bins),
            **t_speed.report_fields(),
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
            "alpha": meta.summary["alpha"],
            "parameters": count_parameters(model),
            **q,
            "agreement_with_teacher": float((probs.argmax(1) == t_pred).mean()),
            "quality_kept": None if not ta or q["accuracy"] is None else q["accuracy"] / ta,
            **speed.report_fields(),
            **compute_cost(speed.throughput_per_s, usd_h),
            "train_seconds": meta.summary["train_seconds"],
        }

    report = {
        "inputs_hash": inputs_hash,
        "task": {"labels": list(labels), "chance_accuracy": 1 / len(labels)},
        "eval_examples": len(rows),
        "eval_with_gold": int(has_gold.sum()),
        "models": models,
    }
    if recipe.eval.cascade_sweep:
        from .sweep import cascade_sweep

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
