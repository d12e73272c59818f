"""Evaluation: students against their teacher and gold labels on held-out data, and the report.

``classifier`` and ``lm`` (one per student kind), ``measure`` (figures both share: latency, calibration, money),
``sweep`` (the cascade threshold), ``report`` (Markdown, JSON, plots).
"""

from __future__ import annotations

from typing import Any

from ..recipe import Recipe

__all__ = ["evaluate"]


def evaluate(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 3: compare teacher and students on the eval split; write report.json, report.md and plots."""
    if recipe.task.kind == "generation":
        from .lm import evaluate_lm

        return evaluate_lm(recipe, quiet, force)
    from .classifier import evaluate_classifier

    return evaluate_classifier(recipe, quiet, force)
