"""Train a classifier student on teacher signals with the distillation loss, on Hugging Face Accelerate.

One function, top to bottom: build the student, tokenize once, then epochs of
forward -> loss sum / example count -> backward -> step. The same code runs on a CPU, a GPU, or under
``accelerate launch`` on many.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, write_text_atomic
from ..recipe import Recipe
from ..students.classifier import build_student, count_parameters, save_student
from .losses import distillation_loss

__all__ = ["TrainRow", "train_student"]


@dataclass(frozen=True)
class TrainRow:
    """A training example: the text, the teacher's distribution and the hard target (gold, else teacher top)."""

    text: str
    teacher_probs: tuple[float, ...]
    target: int


def train_student(
    recipe: Recipe, rows: list[TrainRow], out: Path, alpha: float, quiet: bool = False, extra_meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one student with ``alpha`` (the recipe's, or 0 for the hard-label baseline) and save it to ``out``.

    Returns the training summary also written to ``out/protege.json``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg, scfg = recipe.training, recipe.student
    labels = recipe.task.label_names
    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, tokenizer = build_student(scfg, labels, cfg.seed)
    lr = cfg.learning_rate or (1e-3 if scfg.init == "scratch" else 5e-5)

    enc = tokenizer([r.text for r in rows], truncation=True, max_length=scfg.max_length)
    dataset = [
        (enc["input_ids"][i], torch.tensor(r.teacher_probs), r.target) for i, r in enumerate(rows)
    ]

    def collate(batch: list[tuple[list[int], torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": [b[0] for b in batch]}, return_tensors="pt")
        return {
            **padded,
            "teacher_probs": torch.stack([b[1] for b in batch]),  # (B, C)
            "targets": torch.tensor([b[2] for b in batch]),  # (B,)
        }

    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * total), total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    log: list[dict[str, float]] = []
    t0, seen, step = time.perf_counter(), 0, 0
    bar = tqdm(total=total, desc=f"train alpha={alpha}", unit="step", disable=quiet or not accelerator.is_main_process)
    model.train()
    for epoch in range(cfg.epochs):
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
            loss_sum, count, parts = distillation_loss(
                logits, batch["teacher_probs"], batch["targets"], alpha=alpha, temperature=cfg.temperature
            )
            # No accumulation here, so this batch is the whole accumulated batch: divide once by its rows.
            loss = loss_sum / count.clamp_min(1)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += int(count)
            n = count.clamp_min(1).item()
            rec = {
                "step": step,
                "epoch": epoch,
                "loss": loss.item(),
                "kd_loss": parts["kd"].item() / n,
                "ce_loss": parts["ce"].item() / n,
                "lr": scheduler.get_last_lr()[0],
                "examples_per_s": seen / (time.perf_counter() - t0),
            }
            log.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd_loss']:.3f}", ce=f"{rec['ce_loss']:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0

    summary = {
        "labels": list(labels),
        "alpha": alpha,
        "temperature": cfg.temperature,
        "learning_rate": lr,
        "steps": step,
        "examples": len(rows),
        "train_seconds": seconds,
        "parameters": count_parameters(accelerator.unwrap_model(model)),
        "final_loss": log[-1]["loss"] if log else None,
        **(extra_meta or {}),
    }
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            save_student(accelerator.unwrap_model(model), tokenizer, tmp, summary)
            write_text_atomic(tmp / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            recipe.save(tmp / "recipe.yaml")
    return summary
