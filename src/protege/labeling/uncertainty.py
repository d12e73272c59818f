"""Which unlabeled texts the teacher should label next: those the current student is least sure of, spread out.

Pure functions over the student's label probabilities (and, optionally, a feature vector per text); no model
runs here. Used by ``teacher.select: uncertainty`` (:mod:`protege.active`) and by ``protege improve``.

Uncertainty alone buys near-duplicates: the texts the student is least sure of tend to sit together (one
confusing phrasing, one label pair). :func:`pick` therefore takes the most uncertain few times ``k`` as
candidates and spreads the ``k`` it keeps over them: by k-means++ seeding on the features when there are
features, else round-robin over the student's predicted label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["CANDIDATES_PER_PICK", "METRICS", "pick", "scores"]

METRICS = ("margin", "entropy")
CANDIDATES_PER_PICK = 4  # the most uncertain 4k texts are the candidates a round of k is spread over

Metric = Literal["margin", "entropy"]


def scores(probs: Sequence[Sequence[float]] | np.ndarray, metric: Metric = "margin") -> np.ndarray:
    """How unsure the student is of each text, in [0, 1]; higher is less sure.

    ``"margin"``: 1 - (p1 - p2), p1 and p2 the two largest probabilities (1: a tie, 0: certain).
    ``"entropy"``: -sum_c p_c log p_c / log C, the entropy over the C labels normalized by its maximum.
    ``probs``: (N, C) per-text label probabilities, rows summing to 1.
    """
    p = np.asarray(probs, dtype=np.float64)  # (N, C)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be (texts, labels) with at least two labels; got shape {p.shape}")
    if metric == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]  # (N, 2): p2, p1
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if metric == "entropy":
        logp = np.log(np.clip(p, 1e-12, 1.0))
        return -(p * logp).sum(1) / np.log(p.shape[1])
    raise ValueError(f"metric {metric!r} is not one of {METRICS}")


def pick(
    probs: Sequence[Sequence[float]] | np.ndarray,
    k: int,
    metric: Metric = "margin",
    features: Sequence[Sequence[float]] | np.ndarray | None = None,
    seed: int = 0,
) -> list[int]:
    """``k`` indices into ``probs`` for the teacher to label: among the least sure, spread out.

    Candidates are the ``CANDIDATES_PER_PICK * k`` texts with the highest :func:`scores` (ties broken by
    ``seed``). With ``features`` ((N, D), e.g. the student's pooled hidden states) the k are chosen by k-means++
    seeding over the candidates' L2-normalised features: the most uncertain first, then each next one drawn with
    probability proportional to its squared distance to the nearest one already chosen, so a tight cluster gives
    one or two texts, not the round. Without features, round-robin over the student's predicted label (each
    label's candidates most uncertain first), so no one label takes the round. Deterministic for a seed; the
    result is in the order chosen.
    """
    p = np.asarray(probs, dtype=np.float64)
    s = scores(p, metric)
    n = len(s)
    k = min(int(k), n)
    if k <= 0:
        return []
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n)
    order = np.lexsort((tiebreak, -s))  # most uncertain first; equal scores in the seed's order
    cand = order[: min(n, CANDIDATES_PER_PICK * k)]
    if features is None:
        return _round_robin(cand, p[cand].argmax(1), k)
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) != n:
        raise ValueError(f"features must be (texts, dims) with one row per text ({n}); got shape {f.shape}")
    return _kmeans_pp(cand, f[cand], k, rng)


def _round_robin(cand: np.ndarray, predicted: np.ndarray, k: int) -> list[int]:
    """Take candidates (most uncertain first) one label at a time: the label whose best candidate is the most
    uncertain goes first in every turn."""
    groups: dict[int, list[int]] = {}
    for i, y in zip(cand.tolist(), predicted.tolist()):
        groups.setdefault(y, []).append(i)  # dicts keep insertion order: labels by their most uncertain text
    queues = list(groups.values())
    out: list[int] = []
    turn = 0
    while len(out) < k:
        for q in queues:
            if turn < len(q) and len(out) < k:
                out.append(q[turn])
        turn += 1
    return out


def _kmeans_pp(cand: np.ndarray, f: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding over the candidates (in uncertainty order), starting from the most uncertain one."""
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # (M, D), unit rows
    chosen = [0]
    d2 = ((f - f[0]) ** 2).sum(1)  # (M,) squared distance to the nearest chosen candidate
    while len(chosen) < k:
        total = d2.sum()
        if total <= 1e-12:  # every candidate left duplicates a chosen one: take the most uncertain left
            nxt = next(i for i in range(len(f)) if i not in set(chosen))
        else:
            nxt = int(rng.choice(len(f), p=d2 / total))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((f - f[nxt]) ** 2).sum(1))
        d2[chosen] = 0.0
    return [int(cand[i]) for i in chosen]
