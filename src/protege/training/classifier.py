"""Train a classifier student on teacher signals with the distillation loss, on Hugging Face Accelerate.

One function, top to bottom: build the student, tokenize once, then optimizer steps of: the step's rows, split
into gradient_accumulation_steps x processes micro-batches -> forward -> loss sum -> backward, all divided once
by the rows of the whole step (every micro-batch, every process) -> optimizer step. ``max_steps`` caps the
steps (the schedule follows it); checkpoints every ``checkpoint_every`` steps resume to the same result. The
same code runs on a CPU, a GPU, or under ``accelerate launch`` on many; ``training.batch_size`` counts the
examples of one optimizer step over all processes, as for LM students.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, write_text_atomic
from ..errors import ProtegeError
from ..recipe import Recipe
from ..students.card import StudentCard
from ..students.classifier import build_student, count_parameters, save_student
from .losses import distillation_loss
from .optim import make_optimizer
from .steps import check_split, checkpoint_dir, fingerprint, micro_batches, resume, save_checkpoint

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

    cfg, scfg = recipe.training, recipe.student
    labels = recipe.task.label_names
    if not rows:
        raise ProtegeError("no training rows: label some data first (`protege label`)")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
    )
    set_seed(cfg.seed)
    P, G, B = accelerator.num_processes, cfg.gradient_accumulation_steps, cfg.batch_size
    check_split(B, G, P)
    model, tokenizer = build_student(scfg, labels, cfg.seed)
    lr = cfg.learning_rate or (1e-3 if scfg.init == "scratch" else 5e-5)

    ids = tokenizer([r.text for r in rows], truncation=True, max_length=scfg.max_length)["input_ids"]
    teacher_probs = torch.tensor([r.teacher_probs for r in rows])  # (N, C)
    targets = torch.tensor([r.target for r in rows])  # (N,)

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        batch = {**padded, "teacher_probs": teacher_probs[idx], "targets": targets[idx]}  # (b, T), (b, C), (b,)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    n = len(rows)
    total = cfg.max_steps or cfg.epochs * math.ceil(n / B)
    optimizer, scheduler = make_optimizer(model, cfg, lr, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # -- resume -------------------------------------------------------------------------------------------
    # the student and the hard-label baseline train from the same rows and recipe: alpha tells them apart
    ckpt, fp = checkpoint_dir(out), fingerprint(recipe, rows, alpha=alpha)
    start, log = resume(accelerator, ckpt, fp, quiet)

    # -- train --------------------------------------------------------------------------------------------
    rank = accelerator.process_index
    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=start, desc=f"train alpha={alpha}", unit="step", disable=quiet or not accelerator.is_main_process)
    model.train()
    for step in range(start, total):
        epoch, step_rows, mine = micro_batches(step, n, cfg.seed, B, G, P, rank)
        # Normalize once: every row counts (the loss has no mask), so the count of the whole step over all
        # processes is its rows; each micro-batch's loss sum is divided by it, times P because DDP averages the
        # processes' gradients.
        count = len(step_rows)
        scale = P / count
        sums = torch.zeros(3, device=accelerator.device)
        for j, idx in enumerate(mine):
            # an empty micro-batch (fewer rows than micro-batches in the last step) still runs, with no weight, so
            # every process does the same forward and backward passes
            batch = collate(idx or step_rows[:1])
            with contextlib.nullcontext() if j == G - 1 else accelerator.no_sync(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (b, C)
                loss_sum, _, parts = distillation_loss(
                    logits, batch["teacher_probs"], batch["targets"], alpha=alpha, temperature=cfg.temperature
                )
                accelerator.backward(loss_sum * (scale if idx else 0.0))
            if idx:
                sums += torch.stack([loss_sum.detach(), parts["ce"].detach(), parts["kd"].detach()])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums, "sum") / count
        seen += count
        rec = {
            "step": step + 1,
            "epoch": epoch,
            "loss": sums[0].item(),
            "kd_loss": sums[2].item(),
            "ce_loss": sums[1].item(),
            "lr": scheduler.get_last_lr()[0],
            "examples_per_s": seen / (time.perf_counter() - t0),
        }
        log.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd_loss']:.3f}", ce=f"{rec['ce_loss']:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            save_checkpoint(accelerator, ckpt, {"step": step + 1, "fingerprint": fp, "log": log})
    bar.close()
    seconds = time.perf_counter() - t0

    # -- save ---------------------------------------------------------------------------------------------
    summary = {
        "labels": list(labels),
        "alpha": alpha,
        "temperature": cfg.temperature,
        "learning_rate": lr,
        "steps": total,
        "resumed_from_step": start,
        "batch_size": B,
        "gradient_accumulation_steps": G,
        "processes": P,
        "examples": len(rows),
        "train_seconds": seconds,
        "parameters": count_parameters(accelerator.unwrap_model(model)),
        "final_loss": log[-1]["loss"] if log else None,
        **(extra_meta or {}),
    }
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            card = StudentCard.for_classifier(recipe, labels, summary)  # labels, max length, teacher, price
            save_student(accelerator.unwrap_model(model), tokenizer, tmp, card)
            write_text_atomic(tmp / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            recipe.save(tmp / "recipe.yaml")
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary
