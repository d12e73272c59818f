"""Labeling: send each text to the teacher once, ever; record every call in the store as it finishes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ._io import write_jsonl_atomic
from .data import Example, load_splits
from .errors import ProtegeError
from .recipe import Recipe
from .signals import TeacherSignal
from .store import CallRecord, Store, call_key
from .task import render_request
from .teachers import Teacher, make_teacher

__all__ = ["LabelStats", "label_examples", "label", "read_signals"]


@dataclass
class LabelStats:
    examples: int = 0
    cached: int = 0
    called: int = 0
    seconds: float = 0.0
    by_split: dict[str, dict[str, int]] = field(default_factory=dict)


def label_examples(
    teacher: Teacher, recipe: Recipe, examples: list[Example], store: Store, quiet: bool = False, desc: str = "label"
) -> tuple[list[TeacherSignal], list[str], LabelStats]:
    """Signals for ``examples`` in order, calling the teacher only for keys the store does not hold.

    Each batch is committed before the next is sent, so a crash loses at most the batch in flight.
    """
    requests = [render_request(recipe.task, ex.text) for ex in examples]
    keys = [call_key(teacher.identity, r.to_json()) for r in requests]
    done = store.get_signals(keys)
    todo: dict[str, Any] = {}
    for k, r in zip(keys, requests):
        if k not in done:
            todo.setdefault(k, r)  # identical texts share one call
    stats = LabelStats(examples=len(examples), cached=sum(k in done for k in keys))
    batch_size = recipe.teacher.batch_size
    items = list(todo.items())
    with tqdm(total=len(items), desc=desc, unit="call", disable=quiet or not items) as bar:
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            t0 = time.perf_counter()
            sigs = teacher.signals([r for _, r in batch])
            dt = time.perf_counter() - t0
            if len(sigs) != len(batch):
                raise ProtegeError(f"teacher returned {len(sigs)} signals for {len(batch)} requests")
            store.put(
                CallRecord(
                    key=k,
                    teacher=recipe.teacher.model,
                    request=r.to_json(),
                    signal=s,
                    input_tokens=s.usage.get("input_tokens", 0),
                    output_tokens=s.usage.get("output_tokens", 0),
                    seconds=dt / len(batch),
                )
                for (k, r), s in zip(batch, sigs)
            )
            done.update({k: s for (k, _), s in zip(batch, sigs)})
            stats.called += len(batch)
            stats.seconds += dt
            bar.update(len(batch))
    return [done[k] for k in keys], keys, stats


def _signal_rows(examples: list[Example], signals: list[TeacherSignal], keys: list[str]) -> list[dict[str, Any]]:
    """The signal dataset: one JSON object per example, readable by ``datasets.load_dataset('json', ...)``."""
    return [
        {
            "id": ex.id,
            "text": ex.text,
            "gold": ex.gold,
            "teacher_label": s.distribution.top if s.distribution else None,
            "teacher_probs": list(s.distribution.probs) if s.distribution else None,
            "method": s.distribution.method if s.distribution else None,
            "label_mass": s.distribution.covered_mass if s.distribution else None,
            "call_key": k,
        }
        for ex, s, k in zip(examples, signals, keys)
    ]


def label(recipe: Recipe, quiet: bool = False, teacher: Teacher | None = None) -> LabelStats:
    """Stage 1: label the training and evaluation splits; write ``signals/{train,eval}.jsonl``."""
    labels = recipe.task.label_names
    train, held = load_splits(recipe.data, labels, recipe.training.seed)
    teacher = teacher or make_teacher(recipe.teacher)
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    total = LabelStats()
    with Store(recipe.store_path) as store:
        for split, examples in (("train", train), ("eval", held)):
            signals, keys, stats = label_examples(teacher, recipe, examples, store, quiet, desc=f"label {split}")
            write_jsonl_atomic(out / "signals" / f"{split}.jsonl", _signal_rows(examples, signals, keys))
            total.examples += stats.examples
            total.cached += stats.cached
            total.called += stats.called
            total.seconds += stats.seconds
            total.by_split[split] = {"examples": stats.examples, "cached": stats.cached, "called": stats.called}
    recipe.save(out / "signals" / "recipe.yaml")
    return total


def read_signals(recipe: Recipe, split: str) -> list[dict[str, Any]]:
    import json

    path = recipe.output_dir / "signals" / f"{split}.jsonl"
    if not path.is_file():
        raise ProtegeError(f"{str(path)!r} does not exist; run `protege label` first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
