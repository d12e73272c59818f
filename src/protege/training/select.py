"""Model selection without gold labels: a held-out slice of the teacher-labelled training rows, scored by how
closely a student follows the teacher on it.

The slice is drawn from the original rows only (never from augmented texts), by a hash of the seed and the row
id, so it is the same for every student trained from the same signals (the distilled one, the hard-label
baseline and every trial of an alpha/temperature sweep). An augmented text whose source row is in the slice is
dropped from training too: it is a near copy of a row the student is judged on. With ``training.select_rows:
all`` those copies are scored with the slice: ten times the rows for 8 copies a text, and texts no teacher was
fine-tuned on (a local teacher's answers on its own training texts are its memory of their labels, not what
it makes of new text).

A student is scored on the slice by the mean KL(teacher || student) at temperature 1 (lower is better) and its
agreement with the teacher's top label (higher is better). :class:`Selection` keeps the best evaluation's
weights and says when ``patience`` evaluations in a row have not improved; its state travels in the training
checkpoint (``accelerator.register_for_checkpointing``), so a resumed run selects as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ProtegeError
from .losses import forward_kl

__all__ = ["Selection", "improves", "selection_split", "slice_scores"]


def _rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def selection_split(
    ids: Sequence[str], sources: Sequence[str | None], fraction: float, seed: int, with_copies: bool = False
) -> tuple[list[int], list[int]]:
    """(indices of the rows to train on, indices of the selection slice), both in row order.

    ``sources[i]`` is the id of the row that row i was augmented from (None for an original row). The slice is
    ``round(fraction * originals)`` original rows (at least one), those first in the order of
    sha256(seed:id), and with ``with_copies`` the augmented rows made from them too; the training rows are every
    other original row and every augmented row whose source is not in the slice.
    """
    originals = [i for i, s in enumerate(sources) if s is None]
    if len({ids[i] for i in originals}) < len(originals):
        raise ProtegeError("the selection slice is drawn by row id and two training rows share one; give every row "
                           "a distinct id (data.id_column)")
    k = max(1, round(fraction * len(originals)))
    if k >= len(originals):
        raise ProtegeError(
            f"training.select_fraction {fraction:g} of {len(originals)} original training rows leaves none to train "
            "on; label more rows or lower training.select_fraction"
        )
    held = sorted(sorted(originals, key=lambda i: _rank(seed, ids[i]))[:k])
    held_ids = {ids[i] for i in held}
    # an augmented row goes with its source
    train = [i for i, (row_id, src) in enumerate(zip(ids, sources)) if (src or row_id) not in held_ids]
    if with_copies:
        held = [i for i, (row_id, src) in enumerate(zip(ids, sources)) if (src or row_id) in held_ids]
    return train, held


def slice_scores(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of KL(teacher || student) at temperature 1, number of rows whose top labels agree).

    The KL is :func:`~protege.training.losses.forward_kl`; the top label is the first of the largest
    probabilities (argmax). Shapes: student_logits (N, C), teacher_probs (N, C). Divide both by N.
    """
    kl_sum, _ = forward_kl(student_logits, teacher_probs, temperature=1.0)
    agree = (student_logits.argmax(-1) == teacher_probs.argmax(-1)).sum()
    return kl_sum, agree


def improves(metric: str, kl: float, agreement: float, best_kl: float | None, best_agreement: float | None) -> bool:
    """Whether (kl, agreement) beats the best so far: 'kl' lower; 'agreement' higher, ties to the lower KL.
    Anything beats no best (None)."""
    if best_kl is None or best_agreement is None:
        return True
    if metric == "kl":
        return kl < best_kl
    if metric == "agreement":
        return agreement > best_agreement or (agreement == best_agreement and kl < best_kl)
    raise ValueError(f"select_metric must be 'kl' or 'agreement', not {metric!r}")


class Selection:
    """The evaluations so far, the best one's weights (a CPU copy) and the count since it improved."""

    def __init__(self, metric: str, patience: int | None):
        self.metric, self.patience = metric, patience
        self.history: list[dict[str, Any]] = []  # {"step", "kl", "agreement"} per evaluation
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] = {}
        self.since_best = 0  # evaluations in a row that did not improve

    @property
    def best(self) -> dict[str, Any] | None:
        return next((h for h in self.history if h["step"] == self.best_step), None)

    def record(self, step: int, kl: float, agreement: float, model: torch.nn.Module) -> bool:
        """Add the evaluation of ``model`` after ``step`` optimizer steps; copy its weights when it is the best.
        Returns whether it was."""
        best = self.best or {}
        better = improves(self.metric, kl, agreement, best.get("kl"), best.get("agreement"))
        self.history.append({"step": step, "kl": kl, "agreement": agreement})
        if better:
            self.best_step, self.since_best = step, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def summary(self, rows: int, steps_trained: int, stopped_early: bool) -> dict[str, Any]:
        """summary["selection"] of a trained student."""
        return {"metric": self.metric, "rows": rows, "best_step": self.best_step, "steps_trained": steps_trained,
                "stopped_early": stopped_early, "history": list(self.history)}

    # accelerate saves and loads these with the rest of a checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_step": self.best_step, "best_weights": self.best_weights,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.best_step = list(state["history"]), state["best_step"]
        self.best_weights, self.since_best = dict(state["best_weights"]), state["since_best"]
