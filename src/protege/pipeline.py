"""The stages as functions over a recipe: label -> train -> evaluate; ``run`` chains them and skips
what is already current (an artifact records the hash of the recipe sections and inputs it was made from).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._io import replace_dir
from .active import STUDENT_LABELS_FILE, label
from .evaluation import evaluate
from .labeling.labeler import LabelStats, read_signals
from .labeling.signal_files import iter_signals
from .recipe import Recipe
from .store import Store
from .students.card import CARD, StudentCard
from .training.classifier import TrainSet, rows_from_signals, train_student
from .training.select import improves
from .training.tracking import check_trackers
from .versions import exclusive

__all__ = ["evaluate", "label", "run", "train"]

STUDENT_DIR, BASELINE_DIR, SWEEP_DIR = "student", "student-hard", "student.sweep"


def student_labels_path(recipe: Recipe) -> Path | None:
    """signals/student_labels.jsonl when the recipe trains on it (teacher.select_student_labels) and it exists."""
    path = recipe.output_dir / "signals" / STUDENT_LABELS_FILE
    return path if recipe.teacher.select_student_labels and path.is_file() else None


def _signals_hash(recipe: Recipe) -> str:
    path = recipe.output_dir / "signals" / "train.jsonl"
    if not path.is_file():
        read_signals(recipe, "train")  # raises the error that says to run `protege label` first
    digest, extra = _file_digest(path), student_labels_path(recipe)
    return digest if extra is None else hashlib.sha256(f"{digest}:{_file_digest(extra)}".encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:  # read in blocks: a signal file of a million rows is not held in memory
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _current(meta_path: Path, expect: dict[str, Any]) -> bool:
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in expect.items())


def lm_rows(recipe: Recipe, signal_rows: list[dict[str, Any]] | None = None) -> list[Any]:
    """Training rows of a generation task from ``signal_rows`` (default: ``signals/train.jsonl``): the prompt the
    teacher saw, its whole reply (what its token logprobs describe), the parsed answer and rationale."""
    from .signals import TeacherSignal
    from .training.lm import LMRow

    return [
        LMRow(
            messages=tuple(r["messages"]),
            target=r["teacher_text"],
            answer=r.get("answer"),
            rationale=r.get("rationale"),
            token_logprobs=TeacherSignal.from_json({"token_logprobs": r["token_logprobs"]}).token_logprobs
            if r.get("token_logprobs")
            else None,
            truncated=bool(r.get("truncated")),
        )
        for r in (iter_signals(recipe.output_dir / "signals" / "train.jsonl") if signal_rows is None else signal_rows)
    ]


def train(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 2: train the distilled student (and, for classification, the hard-label baseline) on
    ``signals/train.jsonl``; with training.sweep_alpha / sweep_temperature, the best of a small sweep.

    ``force=False`` skips a student whose protege.json records the current recipe and signals hashes (the
    recipe hash covers the selection and sweep settings).

    It holds the run's versions lock (:func:`protege.versions.exclusive`) while it trains: a ``protege improve``,
    ``promote`` or ``rollback`` on the same run is refused meanwhile, and this is refused while one of them runs,
    so ``student/`` is replaced by one of them at a time (the next improve keeps this student as a version)."""
    with exclusive(recipe.output_dir, "train"):
        return _train(recipe, quiet, force)


def _train(recipe: Recipe, quiet: bool, force: bool) -> dict[str, Any]:
    expect = {
        "recipe_hash": recipe.section_hash("task", "data", "teacher", "student", "training"),
        "signals_hash": _signals_hash(recipe),
    }
    if recipe.task.kind == "generation":
        from .training.lm import train_lm

        path = recipe.output_dir / STUDENT_DIR
        if not force and _current(path / "protege.json", expect):
            return {STUDENT_DIR: {"skipped": True}}
        rows = lm_rows(recipe)
        with Store(recipe.store_path) as store:
            summary = train_lm(recipe, rows, path, quiet, extra_meta=expect, store=store)
            store.log_compute(f"train:{STUDENT_DIR}", summary["train_seconds"], examples=len(rows),
                              distill=recipe.training.distill)
        return {STUDENT_DIR: summary}
    t = recipe.training
    rows = classifier_rows(recipe)
    out: dict[str, Any] = {}
    with Store(recipe.store_path) as store:
        for name, alpha in [(STUDENT_DIR, t.alpha)] + [(BASELINE_DIR, 0.0)] * t.hard_label_baseline:
            path = recipe.output_dir / name
            if not force and _current(path / CARD, expect):
                out[name] = {"skipped": True}
            elif name == STUDENT_DIR and (t.sweep_alpha or t.sweep_temperature):
                out[name] = _sweep(recipe, rows, store, quiet, expect)
            else:
                out[name] = _train_one(recipe, rows, store, path, alpha, t.temperature, quiet, expect)
    return out


def classifier_rows(recipe: Recipe, signal_rows: list[dict[str, Any]] | None = None) -> TrainSet:
    """Training rows of a classification task from ``signal_rows`` (default: ``signals/train.jsonl``, read a row at
    a time, then signals/student_labels.jsonl where teacher.select_student_labels made one)."""
    if signal_rows is None:
        extra = student_labels_path(recipe)
        signal_rows = itertools.chain(iter_signals(recipe.output_dir / "signals" / "train.jsonl"),
                                      iter_signals(extra) if extra else ())
    return rows_from_signals(recipe, signal_rows)


def _train_one(
    recipe: Recipe, rows: TrainSet, store: Store, path: Path, alpha: float, temperature: float, quiet: bool,
    expect: dict[str, Any], trial: int | None = None,
) -> dict[str, Any]:
    """Train one classifier student into ``path`` and log its compute (under the name of the directory it ends
    in: a sweep's trials count as the student's)."""
    summary = train_student(recipe, rows, path, alpha, quiet, extra_meta=expect, temperature=temperature)
    stage = STUDENT_DIR if trial is not None else path.name
    detail = {"examples": summary["examples"], "alpha": alpha, "temperature": temperature}
    if trial is not None:
        detail["trial"] = trial
    store.log_compute(f"train:{stage}", summary["train_seconds"], **detail)
    return summary


def _sweep(recipe: Recipe, rows: TrainSet, store: Store, quiet: bool, expect: dict[str, Any]) -> dict[str, Any]:
    """One student per (alpha, temperature) of training.sweep_alpha x sweep_temperature, each with model
    selection on the same slice; the best by training.select_metric (at its best step) becomes ``student/``.

    Trials train into ``student.sweep/``, removed at the end; one finished before an interruption is not
    trained again (as a checkpoint is resumed).
    """
    from accelerate import PartialState

    t = recipe.training
    grid = [(a, tau) for a in t.sweep_alpha or [t.alpha] for tau in t.sweep_temperature or [t.temperature]]
    root = recipe.output_dir / SWEEP_DIR
    trials, paths = [], []
    for i, (alpha, tau) in enumerate(grid):
        path = root / f"alpha={alpha:g},temperature={tau:g}"
        if _current(path / CARD, expect | {"alpha": alpha, "temperature": tau}):
            summary = json.loads((path / CARD).read_text())
        else:
            summary = _train_one(recipe, rows, store, path, alpha, tau, quiet, expect, trial=i)
        sel = summary["selection"]
        best = next(h for h in sel["history"] if h["step"] == sel["best_step"])
        trials.append({"alpha": alpha, "temperature": tau, "kl": best["kl"], "agreement": best["agreement"],
                       "best_step": sel["best_step"]})
        paths.append(path)
    win = 0
    for i, trial in enumerate(trials):
        if improves(t.select_metric, trial["kl"], trial["agreement"], trials[win]["kl"], trials[win]["agreement"]):
            win = i
    sweep = {"metric": t.select_metric, "trials": trials,
             "chosen": {"alpha": trials[win]["alpha"], "temperature": trials[win]["temperature"]}}
    card = StudentCard.read(paths[win])
    card = replace(card, summary={**card.summary, "sweep": sweep})
    state = PartialState()  # under `accelerate launch` every process got here; one moves the files
    if state.is_main_process:
        card.write(paths[win])
        replace_dir(paths[win], recipe.output_dir / STUDENT_DIR)
        shutil.rmtree(root)
    state.wait_for_everyone()
    return card.summary


def run(recipe: Recipe, quiet: bool = False) -> dict[str, Any]:
    """Every stage in order; each skips the work whose inputs have not changed."""
    check_trackers(recipe.training.report_to)  # before labeling, not after an hour of it
    stats: LabelStats = label(recipe, quiet)
    trained = train(recipe, quiet, force=False)
    report = evaluate(recipe, quiet, force=False)
    return {"label": stats, "train": trained, "report": report}
