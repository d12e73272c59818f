"""Evaluation: students against their teacher and gold labels on held-out data, and the report.

``classifier`` and ``lm`` (one per student kind), ``measure`` (figures both share: latency, calibration, money),
``sweep`` (the cascade threshold), ``report`` (Markdown, JSON, plots).
"""

from __future__ import annotations

from typing import Any

from ..recipe import Recipe

__all__ = ["evaluate"]


def evaluate(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 3: compare teacher and students on the eval split; write report.json, report.md and plots, and
    rewrite each evaluated student's model card (README.md) with its figures."""
    from ..students.card import CARD
    from ..students.model_card import write_model_card

    if recipe.task.kind == "generation":
        from .lm import evaluate_lm

        report = evaluate_lm(recipe, quiet, force)
    else:
        from .classifier import evaluate_classifier

        report = evaluate_classifier(recipe, quiet, force)
    for key in report["models"]:  # the students' rows (teacher and floor have no directory)
        if (recipe.output_dir / key / CARD).is_file():
            write_model_card(recipe.output_dir / key, report)
    return report
