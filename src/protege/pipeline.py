"""The stages as functions over a recipe: label -> train -> evaluate; ``run`` chains them and skips
what is already current (an artifact records the hash of the recipe sections and inputs it was made from).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .evaluation import evaluate
from .labeling.labeler import LabelStats, label, read_signals
from .recipe import Recipe
from .store import Store
from .training.classifier import TrainRow, train_student

__all__ = ["label", "train", "evaluate", "run"]

STUDENT_DIR, BASELINE_DIR = "student", "student-hard"


def _signals_hash(recipe: Recipe) -> str:
    path = recipe.output_dir / "signals" / "train.jsonl"
    if not path.is_file():
        read_signals(recipe, "train")  # raises the error that says to run `protege label` first
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _current(meta_path: Path, expect: dict[str, Any]) -> bool:
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in expect.items())


def _lm_rows(recipe: Recipe) -> list[Any]:
    """Training rows of a generation task: the prompt the teacher saw, its whole reply (what its token
    logprobs describe), the parsed answer and rationale."""
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
        for r in read_signals(recipe, "train")
    ]


def train(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 2: train the distilled student (and, for classification, the hard-label baseline) on
    ``signals/train.jsonl``."""
    expect = {
        "recipe_hash": recipe.section_hash("task", "data", "teacher", "student", "training"),
        "signals_hash": _signals_hash(recipe),
    }
    if recipe.task.kind == "generation":
        from .training.lm import train_lm

        path = recipe.output_dir / STUDENT_DIR
        if not force and _current(path / "protege.json", expect):
            return {STUDENT_DIR: {"skipped": True}}
        rows = _lm_rows(recipe)
        with Store(recipe.store_path) as store:
            summary = train_lm(recipe, rows, path, quiet, extra_meta=expect)
            store.log_compute(f"train:{STUDENT_DIR}", summary["train_seconds"], examples=len(rows),
                              distill=recipe.training.distill)
        return {STUDENT_DIR: summary}
    labels = recipe.task.label_names
    use_gold = recipe.training.use_gold
    rows = [
        TrainRow(
            text=r["text"],
            teacher_probs=tuple(r["teacher_probs"]),
            target=labels.index(r["gold"] if use_gold and r["gold"] is not None else r["teacher_label"]),
        )
        for r in read_signals(recipe, "train")
    ]
    runs = [(STUDENT_DIR, recipe.training.alpha)]
    if recipe.training.hard_label_baseline:
        runs.append((BASELINE_DIR, 0.0))
    out: dict[str, Any] = {}
    with Store(recipe.store_path) as store:
        for name, alpha in runs:
            path = recipe.output_dir / name
            if not force and _current(path / "protege.json", expect):
                out[name] = {"skipped": True}
                continue
            summary = train_student(recipe, rows, path, alpha, quiet, extra_meta=expect)
            store.log_compute(f"train:{name}", summary["train_seconds"], examples=len(rows), alpha=alpha)
            out[name] = summary
    return out


def run(recipe: Recipe, quiet: bool = False) -> dict[str, Any]:
    """Every stage in order; each skips the work whose inputs have not changed."""
    stats: LabelStats = label(recipe, quiet)
    trained = train(recipe, quiet, force=False)
    report = evaluate(recipe, quiet, force=False)
    return {"label": stats, "train": trained, "report": report}
