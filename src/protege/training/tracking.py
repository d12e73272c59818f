"""Experiment tracking (``training.report_to``) through Hugging Face Accelerate's trackers.

Both training loops log the record they append to ``train_log.jsonl``, once per optimizer step, at the step
number it carries, so a run resumed from a checkpoint continues the numbering. TensorBoard writes under
``<output_dir>/runs/<student dir name>``: the distilled student, the hard-label baseline and a sweep's trials do
not mix. A run whose first step is s asks TensorBoard to drop what an earlier run in the same directory logged
from step s on (the steps a crashed run logged after its last checkpoint, or a whole earlier training), so the
curves are those of the saved student. Only the main process logs (Accelerate's trackers run there).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..errors import ProtegeError
from ..recipe import Recipe
from ..teachers._api import public_url

__all__ = [
    "INSTALL", "check_trackers", "end_tracking", "flush_trackers", "log_step", "run_config", "start_tracking",
    "tracker_settings",
]

# tracker -> (the module it imports, the install command that provides it)
INSTALL = {
    "tensorboard": ("tensorboard", "pip install 'protege[track]'"),
    "wandb": ("wandb", "pip install wandb"),
    "trackio": ("trackio", "pip install trackio"),
}


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed (Accelerate would drop it without a word)."""
    for name in names:
        module, install = INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise ProtegeError(
                f"training.report_to {name!r} needs the '{module}' package, which is not installed. Install it "
                f"with: {install} (or remove {name!r} from training.report_to)"
            )


def tracker_settings(recipe: Recipe) -> dict[str, Any]:
    """The ``Accelerator(...)`` arguments for the recipe's trackers, after checking they are installed ({} for
    none)."""
    names = recipe.training.report_to
    if not names:
        return {}
    check_trackers(names)
    return {"log_with": list(names), "project_dir": str(recipe.output_dir / "runs")}


def _plain(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dump as one level of dotted keys whose values are str, int, float, bool or None (lists as JSON)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _plain(value, name + ".")
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def run_config(recipe: Recipe, **used: Any) -> dict[str, Any]:
    """The resolved recipe as a flat dict of plain values, with ``used`` (dotted setting -> the value this run
    trained with, e.g. a baseline's ``training.alpha`` of 0) over the recipe's. Keys never reach a recipe; a
    base URL loses any credentials written into it."""
    dump = recipe.model_dump(mode="json")
    for teacher in [dump["teacher"], *(dump["teacher"].get("members") or [])]:
        teacher["base_url"] = public_url(teacher.get("base_url"))
    return _plain(dump) | used


def start_tracking(accelerator: Any, recipe: Recipe, out: Path, start: int, **used: Any) -> None:
    """Start the recipe's trackers for the student saved to ``out``, whose first step this run is ``start + 1``."""
    if not recipe.training.report_to:
        return
    accelerator.init_trackers(
        out.name,
        config=run_config(recipe, **used),
        # purge_step: TensorBoard drops an earlier run's points from this step on (a crash after the checkpoint)
        init_kwargs={"tensorboard": {"purge_step": start + 1}},
    )


def log_step(accelerator: Any, rec: dict[str, Any]) -> None:
    """Log one optimizer step's record (every figure but the step, which is the x axis)."""
    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])


def flush_trackers(accelerator: Any) -> None:
    """Write TensorBoard's buffered points to disk (with each checkpoint, so a killed run keeps what it resumes
    from)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()


def end_tracking(accelerator: Any) -> None:
    """Close the trackers. Not ``accelerator.end_training()``: that also ends the process group, which the next
    student trained in the same process (the hard-label baseline, a sweep's next trial) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
