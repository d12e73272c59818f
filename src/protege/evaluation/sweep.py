"""The cascade's threshold sweep: quality and cost per 1,000 requests at every threshold, on held-out answers.

A student answers when its confidence (a classifier's top label probability; an LM's geometric mean token
probability) is at least the threshold, the teacher otherwise. :func:`sweep` is the shared core (graded scores,
rows without a reference routed and paid for but not scored); :func:`cascade_sweep` applies it to a
classifier's predictions, and :mod:`protege.evaluation.lm` to an LM student's answers. The server routes by the
same confidence (:mod:`protege.serve`), so the threshold chosen here is the one it applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ALWAYS_TEACHER = 1.01  # a threshold no probability reaches: every text goes to the teacher


def cascade_sweep(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    gold: np.ndarray,
    has_gold: np.ndarray,
    student_usd_per_1k: float,
    teacher_usd_per_1k: float,
    keep_fraction: float = 0.95,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """:func:`sweep` for a classifier: confidence is the student's top label probability, a row scores 1 when
    the answer equals the gold label (``metric`` accuracy), or without gold labels the teacher's label
    (``agreement_with_teacher``).

    student_probs, teacher_probs: (N, C); gold: (N,) label indices (-1 where unknown); has_gold: (N,) bool.
    """
    s_pred, t_pred = student_probs.argmax(1), teacher_probs.argmax(1)
    if has_gold.any():
        metric, ref, rows = "accuracy", gold, has_gold
    else:
        metric, ref, rows = "agreement_with_teacher", t_pred, np.ones(len(s_pred), bool)
    return sweep(student_probs.max(1), (s_pred == ref).astype(float), (t_pred == ref).astype(float), rows, metric,
                 "top label probability", student_usd_per_1k, teacher_usd_per_1k, keep_fraction, thresholds)


def sweep(
    confidence: np.ndarray,
    student_score: np.ndarray,
    teacher_score: np.ndarray,
    scored: np.ndarray,
    metric: str,
    confidence_kind: str,
    student_usd_per_1k: float,
    teacher_usd_per_1k: float,
    keep_fraction: float = 0.95,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Quality and cost per 1,000 requests of the cascade at each threshold, on held-out answers.

    At threshold t the student answers a row when its confidence is >= t, the teacher otherwise:
    quality(t) = mean over scored rows of the answering model's score; cost(t) = student_usd_per_1k (the
    student reads every request) + fallback(t) * teacher_usd_per_1k, fallback(t) = share of all rows below t.
    ``chosen`` is the cheapest threshold whose quality is at least keep_fraction * the teacher's (ties: the
    lowest threshold); the last threshold, :data:`ALWAYS_TEACHER`, always qualifies.

    All arrays are (N,): confidence in [0, 1], scores in [0, 1] (1: right), scored: rows with a score.
    """
    if thresholds is None:
        thresholds = [round(i / 100, 2) for i in range(101)] + [ALWAYS_TEACHER]
    rows = scored.astype(bool)
    teacher_acc = float(teacher_score[rows].mean()) if rows.any() else 0.0
    student_acc = float(student_score[rows].mean()) if rows.any() else 0.0
    target = keep_fraction * teacher_acc
    points = []
    for t in thresholds:
        student_answers = confidence >= t  # (N,)
        score = np.where(student_answers, student_score, teacher_score)
        fallback = float((~student_answers).mean())
        points.append({
            "threshold": float(t),
            "accuracy": float(score[rows].mean()) if rows.any() else 0.0,
            "teacher_fraction": fallback,
            "usd_per_1k": student_usd_per_1k + fallback * teacher_usd_per_1k,
        })
    ok = [p for p in points if p["accuracy"] >= target - 1e-12]
    chosen = min(ok, key=lambda p: (p["usd_per_1k"], p["threshold"])) if ok else None
    return {
        "metric": metric,
        "confidence": confidence_kind,
        "rows": int(rows.sum()),
        "keep_fraction": keep_fraction,
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "target_accuracy": target,
        "student_usd_per_1k": student_usd_per_1k,
        "teacher_usd_per_1k": teacher_usd_per_1k,
        "points": points,
        "chosen": chosen,
    }
