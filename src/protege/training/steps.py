"""What both training loops share about optimizer steps: which rows each step takes, and checkpoints.

A step's rows come from a permutation fixed by the seed and the epoch, and are split into
``gradient_accumulation_steps x processes`` contiguous micro-batches. So a step's data depends only on its
index, and a checkpoint (model, optimizer, schedule, every process's RNG state, the log so far) is all a
killed run needs to continue to the same result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import canonical_json, replace_dir, write_json_atomic
from ..errors import ProtegeError
from ..recipe import Recipe

__all__ = ["check_split", "checkpoint_dir", "fingerprint", "micro_batches", "resume", "save_checkpoint"]


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation fixed by the seed and the epoch, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _shards(rows: list[int], n: int) -> list[list[int]]:
    """``rows`` in ``n`` contiguous near-equal parts (some empty when there are fewer rows than parts)."""
    return [rows[i * len(rows) // n : (i + 1) * len(rows) // n] for i in range(n)]


def check_split(batch_size: int, accumulation: int, processes: int) -> None:
    """Refuse a step that cannot give every micro-batch of every process at least one row."""
    if batch_size < accumulation * processes:
        raise ProtegeError(
            f"training.batch_size {batch_size} is the examples of one optimizer step over all processes; it must "
            f"be at least gradient_accumulation_steps ({accumulation}) x processes ({processes}) so every "
            "micro-batch has an example"
        )


def micro_batches(
    step: int, n: int, seed: int, batch_size: int, accumulation: int, processes: int, rank: int
) -> tuple[int, list[int], list[list[int]]]:
    """(epoch, the step's rows over all processes, this process's ``accumulation`` micro-batches of them).

    ``batch_size`` counts the rows of one optimizer step over all processes; the last step of an epoch takes
    what is left. Micro-batch j of process r is shard ``j * processes + r``; some are empty when a step has
    fewer rows than micro-batches.
    """
    steps_per_epoch = -(-n // batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    rows = _order(n, seed, epoch)[k * batch_size : (k + 1) * batch_size]
    shards = _shards(rows, accumulation * processes)
    return epoch, rows, [shards[j * processes + rank] for j in range(accumulation)]


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoints of a training that saves to ``out`` go: beside it, removed after the final save."""
    return out.parent / (out.name + ".checkpoint")


def fingerprint(recipe: Recipe, rows: list[Any], **extra: Any) -> str:
    """What a checkpoint must match to be resumed: the settings that shape training, the data (dataclass rows)
    and anything else the loop was given (``extra``, e.g. a classifier's alpha)."""
    sections = recipe.model_dump(mode="json")
    sections["training"].pop("report_to")  # where figures are logged does not shape training: a resume may add one
    what = {k: sections[k] for k in ("task", "teacher", "student", "training")}
    h = hashlib.sha256(canonical_json(what | extra).encode())
    for r in rows:  # a row at a time: the hash of a million rows needs no million-row string
        h.update(canonical_json(asdict(r)).encode())
    return h.hexdigest()


def save_checkpoint(accelerator: Any, ckpt: Path, progress: dict[str, Any]) -> None:
    """Every process writes into a temporary directory (model and optimizer from the main one, RNG state from
    each); the main process then renames it over the previous checkpoint, so a kill leaves one whole checkpoint.

    ``progress`` (the next step, the fingerprint, the log so far) goes to ``progress.json``.
    """
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")  # a fixed name: every process must find it
    main = accelerator.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if main:
        write_json_atomic(tmp / "progress.json", progress)
    accelerator.wait_for_everyone()
    if main:
        replace_dir(tmp, ckpt)
    accelerator.wait_for_everyone()


def _find_checkpoint(ckpt: Path, fingerprint: str) -> tuple[Path | None, str | None]:
    """(checkpoint to resume, or None; a note when one exists but belongs to other settings or data)."""
    old = ckpt.with_name(f".{ckpt.name}.old")
    for path in (ckpt, old):  # .old alone: a kill between the two renames of replace_dir
        progress = path / "progress.json"
        if progress.is_file():
            if json.loads(progress.read_text())["fingerprint"] == fingerprint:
                return path, None
            return None, f"checkpoint {str(path)!r} was made with other settings or data; starting over"
    return None, None


def resume(accelerator: Any, ckpt: Path, fingerprint: str, quiet: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint at ``ckpt`` made for ``fingerprint`` into the prepared model, optimizer and schedule
    (and the RNG states); return (the step to continue from, the log so far), or (0, []) when there is none."""
    found, note = _find_checkpoint(ckpt, fingerprint)
    if note and accelerator.is_main_process and not quiet:
        tqdm.write(note)
    if found is None:
        return 0, []
    accelerator.load_state(str(found))
    progress = json.loads((found / "progress.json").read_text())
    return progress["step"], progress["log"]
