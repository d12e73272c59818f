"""Evaluate students against the teacher and gold labels on the held-out split; write the report.

Quality (accuracy, agreement, quality kept, calibration, per-label recall and precision) comes from the
held-out signals and each model's predictions. Speed is measured here, on this machine: latency one example at
a time (p50, p95) and batched throughput. Money per 1,000 examples is the API price for API teachers, and
measured compute time times ``eval.compute_usd_per_hour`` for local models. Beside the students stands the
floor (:mod:`protege.evaluation.floor`): TF-IDF + logistic regression on the same teacher labels. With
``eval.cascade_sweep`` the report also sweeps the cascade's threshold on the same predictions
(:func:`protege.evaluation.sweep.cascade_sweep`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from .._io import content_hash
from ..errors import ProtegeError
from ..labeling.data import Example
from ..labeling.labeler import read_signals, recipe_shots, requests_for
from ..lean import classifier_logits, encode
from ..recipe import Recipe
from ..store import Store, call_key
from ..students.classifier import count_parameters, load_student
from ..teachers import make_teacher
from .floor import FLOOR_NAME, fit_floor, floor_parameters, floor_probs, floor_size_bytes
from .measure import (
    Speed,
    _api_teacher_figures,
    compute_cost,
    expected_calibration_error,
    summarize_latency,
    time_calls,
)

__all__ = ["disagreements", "evaluate_classifier", "kl_rows", "per_label", "student_probs"]

STUDENTS = (("student", "distilled student"), ("student-hard", "hard-label student"))
FLOOR = "floor"  # its key in report.json["models"]
TOP_DISAGREEMENTS = 10


def _quality(probs: np.ndarray, gold: np.ndarray, has_gold: np.ndarray, bins: int) -> dict[str, Any]:
    pred = probs.argmax(1)
    if not has_gold.any():
        return {"accuracy": None, "ece": None}
    correct = pred[has_gold] == gold[has_gold]
    return {"accuracy": float(correct.mean()), "ece": expected_calibration_error(probs[has_gold], correct, bins)}


def per_label(pred: np.ndarray, gold: np.ndarray, has_gold: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """{label: {"support", "recall", "precision"}} over the rows with a gold label.

    support = rows whose gold label it is; recall = the share of those predicted as it (accuracy on that label);
    precision = the share of rows predicted as it whose gold label it is. None where the denominator is 0."""
    p, g = pred[has_gold], gold[has_gold]
    out = {}
    for k, name in enumerate(labels):
        support, predicted, hit = int((g == k).sum()), int((p == k).sum()), int(((g == k) & (p == k)).sum())
        out[name] = {"support": support, "recall": hit / support if support else None,
                     "precision": hit / predicted if predicted else None}
    return out


def kl_rows(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) per row, in nats; p, q: (N, C) -> (N,). Terms with p_c = 0 are
    0; q is floored at ``eps`` so a label the student rules out costs a large, finite amount."""
    safe_p = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - np.log(np.maximum(q, eps))), 0.0).sum(1)


def disagreements(
    rows: list[dict[str, Any]], t_probs: np.ndarray, s_probs: np.ndarray, labels: tuple[str, ...],
    top: int = TOP_DISAGREEMENTS,
) -> list[dict[str, Any]]:
    """The held-out rows where the student's top label differs from the teacher's, most divergent first
    (KL(teacher || student), ties by row order), at most ``top`` of them."""
    t_pred, s_pred = t_probs.argmax(1), s_probs.argmax(1)
    kl = kl_rows(t_probs, s_probs)  # (N,)
    differ = np.flatnonzero(t_pred != s_pred)
    order = differ[np.argsort(-kl[differ], kind="stable")][:top]
    return [
        {"id": rows[i]["id"], "text": rows[i]["text"], "gold": rows[i]["gold"],
         "teacher": labels[t_pred[i]], "teacher_confidence": float(t_probs[i, t_pred[i]]),
         "student": labels[s_pred[i]], "student_confidence": float(s_probs[i, s_pred[i]]), "kl": float(kl[i])}
        for i in order
    ]


@torch.inference_mode()
def _student_predict(model: Any, tok: Any, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = encode(tok, texts[i : i + batch], max_length)
        out.append(torch.softmax(classifier_logits(model)(**enc).float(), -1).numpy())
    return np.concatenate(out)


def student_probs(student_dir: Any, texts: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(label probabilities per text, (N, C), the labels in the head's order) of the saved classifier student in
    ``student_dir``, at the max length it was trained with."""
    model, tok, card = load_student(student_dir)
    assert card.labels is not None
    with torch.inference_mode():
        probs = _student_predict(model, tok, texts, card.max_length) if texts else np.zeros((0, len(card.labels)))
    return probs, card.labels


def _sample(texts: list[str], n: int) -> list[str]:
    """The n texts a latency measurement cycles through: the held-out texts in order, repeated as needed."""
    return (texts * (n // len(texts) + 1))[:n]


def _latencies(one: Any, many: Any, texts: list[str], n: int) -> tuple[list[float], float]:
    """(seconds of ``one(text)`` for each of the n sample texts, after an untimed pass over all of them; texts per
    second of ``many(sample)``).

    The warm-up pass is the whole sample, not one call: the first text of each new token length costs a model
    more than the next one does (the CPU kernels set themselves up per input shape), and that cost falls on
    whichever model of a report meets the length first. Timed after one call, `protege demo`'s distilled student
    (timed first) measured 0.60 ms a text and its hard-label twin of the same shape 0.36 ms; timed after a pass,
    0.40 and 0.39 (BENCHMARKS.md, the demo). A served model pays that cost once, not per request."""
    sample = _sample(texts, n)
    (lat,) = time_calls([lambda i: one(sample[i % n])], n, warmup=n)
    t0 = time.perf_counter()
    many(sample)
    return lat, len(sample) / (time.perf_counter() - t0)


def _speed(one: Any, many: Any, texts: list[str], n: int) -> Speed:
    """Latency of ``one(text)`` over n texts (after one warm-up), and throughput of ``many(texts)``."""
    lat, throughput = _latencies(one, many, texts, n)
    return Speed(summarize_latency(lat), throughput)


def _student_speed(model: Any, tok: Any, max_length: int, texts: list[str], n: int) -> Speed:
    return _speed(lambda t: _student_predict(model, tok, [t], max_length),
                  lambda ts: _student_predict(model, tok, ts, max_length), texts, n)


# --------------------------------------------------------------------------------------------------------------
# the teacher's speed, size and price


def _local_teacher_latencies(teacher: Any, requests: list[Any], texts: list[str], n: int) -> tuple[list[float], float]:
    """A local teacher timed fresh on the requests labeling sent (few-shot turns included); a measurement,
    not labeling, so not logged as calls."""
    reqs = dict(zip(texts, requests))
    return _latencies(lambda t: teacher.signals([reqs[t]]), lambda ts: teacher.signals([reqs[t] for t in ts]),
                      texts, n)


def _teacher_figures(recipe: Recipe, rows: list[dict[str, Any]], texts: list[str]) -> dict[str, Any]:
    """Parameters, latency, throughput and price of the teacher: a local one timed here, an API one from what
    labeling recorded (never paid again just to time it)."""
    n_lat, usd_h = recipe.eval.latency_samples, recipe.eval.compute_usd_per_hour
    examples = [Example(r["id"], r["text"], r["gold"], "") for r in rows]
    if recipe.teacher.kind == "ensemble":
        return _ensemble_figures(recipe, examples, texts)
    teacher = make_teacher(recipe.teacher)
    if teacher.kind == "api":
        speed, money = _api_teacher_figures(recipe, [r["call_key"] for r in rows])
        return {"parameters": None, **speed.report_fields(), **money}
    lat, throughput = _local_teacher_latencies(teacher, requests_for(recipe, examples), texts, n_lat)
    speed = Speed(summarize_latency(lat), throughput)
    return {"parameters": teacher.num_parameters, **speed.report_fields(), **compute_cost(throughput, usd_h)}


def _recorded_seconds(recipe: Recipe, member: str, keys: list[str], texts: list[str], n: int) -> list[float]:
    """The wall seconds labeling recorded for each of the n sample texts' calls (``keys`` align with ``texts``)."""
    with Store(recipe.store_path) as store:
        usage = store.call_usage(keys)
    seconds = {t: usage[k].seconds for t, k in zip(texts, keys) if k in usage and usage[k].status == "ok"}
    missing = [t for t in _sample(texts, n) if t not in seconds]
    if missing:
        raise ProtegeError(f"the store holds no answer of ensemble member {member!r} for the held-out text "
                           f"{missing[0][:60]!r}; run `protege label` first")
    return [seconds[t] for t in _sample(texts, n)]


def _ensemble_figures(recipe: Recipe, examples: list[Example], texts: list[str]) -> dict[str, Any]:
    """An ensemble answers a text when every member has: its latency per text is the sum of the members'
    (they run one after another, as labeling runs them), its throughput 1 / sum(1 / member throughput), its
    price the sum of theirs. Local members are timed here; API members' per-text wall times, rates and spend
    are what labeling recorded for these very texts. Parameters are counted only when every member is local."""
    from ..labeling.ensemble import member_recipe

    n_lat, usd_h = recipe.eval.latency_samples, recipe.eval.compute_usd_per_hour
    shots = recipe_shots(recipe)  # labeling gave every member the ensemble's worked examples
    per_text = np.zeros(n_lat)  # (n_lat,) seconds, summed over members
    inverse_throughput, usd, params, members = 0.0, 0.0, 0, []
    for m in recipe.teacher.members:
        mr = member_recipe(recipe, m)
        teacher = make_teacher(m)
        requests = requests_for(mr, examples, shots)
        if teacher.kind == "api":
            keys = [call_key(teacher.identity, r.to_json()) for r in requests]
            speed, money = _api_teacher_figures(mr, keys)
            lat = _recorded_seconds(recipe, m.model, keys, texts, n_lat)
            throughput, usd_m, p = speed.throughput_per_s, money["usd_per_1k"], None
        else:
            lat, throughput = _local_teacher_latencies(teacher, requests, texts, n_lat)
            usd_m, p = compute_cost(throughput, usd_h)["usd_per_1k"], teacher.num_parameters
        per_text += np.asarray(lat)
        inverse_throughput += 1 / throughput
        usd += usd_m
        params = None if p is None or params is None else params + p
        members.append({"name": m.model, "kind": teacher.kind, "parameters": p,
                        **summarize_latency(lat).report_fields(), "throughput_per_s": throughput, "usd_per_1k": usd_m})
    local = all(x["kind"] == "local" for x in members)
    return {
        "parameters": params, **summarize_latency(per_text.tolist()).report_fields(),
        "throughput_per_s": 1 / inverse_throughput, "usd_per_1k": usd,
        "price_source": "compute" if local else "compute and recorded API spend", "members": members,
    }


# --------------------------------------------------------------------------------------------------------------
# the evaluation


def _against_teacher(probs: np.ndarray, t_pred: np.ndarray, q: dict[str, Any], teacher_acc: float | None) -> dict:
    return {
        "agreement_with_teacher": float((probs.argmax(1) == t_pred).mean()),
        "quality_kept": None if not teacher_acc or q["accuracy"] is None else q["accuracy"] / teacher_acc,
    }


def _floor(recipe: Recipe, texts: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The floor fitted on every teacher-labelled training text (augmented ones too: the students train on
    them), its probabilities on ``texts`` and its speed, size and price."""
    train = read_signals(recipe, "train")
    labels = recipe.task.label_names
    pipe = fit_floor([r["text"] for r in train], [r["teacher_label"] for r in train], recipe.training.seed)
    speed = _speed(lambda t: pipe.predict_proba([t]), lambda ts: pipe.predict_proba(ts), texts,
                   recipe.eval.latency_samples)
    return floor_probs(pipe, texts, labels), {
        "name": FLOOR_NAME,
        "parameters": floor_parameters(pipe),
        "size_bytes": floor_size_bytes(pipe),
        "train_examples": len(train),
        **speed.report_fields(),
        **compute_cost(speed.throughput_per_s, recipe.eval.compute_usd_per_hour),
    }


def evaluate_classifier(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Compare teacher, classifier students and the floor on the eval split; write report.json, report.md and
    plots."""
    out = recipe.output_dir
    rows = read_signals(recipe, "eval")
    present = [(d, name) for d, name in STUDENTS if (out / d / "protege.json").is_file()]
    if not present:
        raise ProtegeError(f"no trained student under {str(out)!r}; run `protege train` first")
    inputs = {
        "eval": recipe.section_hash("eval"),
        "signals": content_hash(rows),
        "train_signals": content_hash(read_signals(recipe, "train")),  # the floor is fitted on them
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

    t_q = _quality(t_probs, gold, has_gold, bins)
    models: dict[str, Any] = {
        "teacher": {
            "name": recipe.teacher.model,
            "signal_method": sorted({r["method"] for r in rows}),
            **t_q,
            **_teacher_figures(recipe, rows, texts),
            "mean_label_mass": float(np.mean([r.get("label_mass", 1.0) for r in rows])),
        }
    }
    ta = t_q["accuracy"]
    preds: dict[str, np.ndarray] = {"teacher": t_probs}
    for d, name in present:
        model, tok, meta = load_student(out / d)
        ml = recipe.student.max_length
        probs = _student_predict(model, tok, texts, ml)
        preds[d] = probs
        speed = _student_speed(model, tok, ml, texts, n_lat)
        q = _quality(probs, gold, has_gold, bins)
        models[d] = {
            "name": name,
            "alpha": meta.summary["alpha"],
            "parameters": count_parameters(model),
            "size_bytes": sum(f.stat().st_size for f in (out / d).glob("*.safetensors")),
            **q,
            **_against_teacher(probs, t_pred, q, ta),
            **speed.report_fields(),
            **compute_cost(speed.throughput_per_s, usd_h),
            "train_seconds": meta.summary["train_seconds"],
            **{k: meta.summary[k] for k in ("selection", "sweep") if k in meta.summary},
        }
    preds[FLOOR], floor = _floor(recipe, texts)
    q = _quality(preds[FLOOR], gold, has_gold, bins)
    models[FLOOR] = {**floor, **q, **_against_teacher(preds[FLOOR], t_pred, q, ta)}
    if has_gold.any():
        for k, p in preds.items():
            models[k]["per_label"] = per_label(p.argmax(1), gold, has_gold, labels)

    kd = present[0][0]  # the distilled student, else the baseline
    report = {
        "inputs_hash": inputs_hash,
        "task": {"labels": list(labels), "chance_accuracy": 1 / len(labels)},
        "eval_examples": len(rows),
        "eval_with_gold": int(has_gold.sum()),
        "models": models,
        "disagreements": {"student": kd, "rows": disagreements(rows, t_probs, preds[kd], labels)},
    }
    selection = out / "signals" / "selection.json"  # teacher.select's rounds: the report's learning curve
    if selection.is_file():
        sel = json.loads(selection.read_text(encoding="utf-8"))
        report["active"] = {**sel, "rounds": [{k: v for k, v in r.items() if k != "ids"} for r in sel["rounds"]]}
    if recipe.eval.cascade_sweep:
        from .sweep import cascade_sweep

        report["cascade"] = {
            "student": kd,
            **cascade_sweep(preds[kd], t_probs, gold, has_gold, models[kd]["usd_per_1k"],
                            models["teacher"]["usd_per_1k"], recipe.eval.keep_fraction),
        }
    with Store(recipe.store_path) as store:
        store.log_compute("eval", time.perf_counter() - started, examples=len(rows))
        # What making this student has cost so far: teacher calls (money and compute) and compute per stage.
        report["ledger"] = {"teacher": store.teacher_totals(recipe.teacher.model), "compute": store.compute_totals()}
    from .report import write_report

    write_report(report, preds, gold, has_gold, recipe, out)
    return report
