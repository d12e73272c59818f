"""Train a classifier student on teacher signals with the distillation loss, on Hugging Face Accelerate.

One function, top to bottom: build the student, tokenize once, then optimizer steps of: the step's rows, split
into gradient_accumulation_steps x processes micro-batches -> forward -> loss sum -> backward, all divided once
by the rows of the whole step (every micro-batch, every process) -> optimizer step. ``max_steps`` caps the
steps (the schedule follows it); checkpoints every ``checkpoint_every`` steps resume to the same result. The
same code runs on a CPU, a GPU, or under ``accelerate launch`` on many; ``training.batch_size`` counts the
examples of one optimizer step over all processes, as for LM students.

With ``training.select_fraction`` a slice of the teacher-labelled rows is held out (see :mod:`.select`): every
``eval_every`` steps and at the end the student is scored on it against the teacher, the best evaluation's
weights are the ones saved, and ``patience`` evaluations without improvement stop training early.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, write_text_atomic
from ..errors import ProtegeError
from ..lean import encode
from ..recipe import Recipe
from ..students.card import StudentCard
from ..students.classifier import build_student, count_parameters, save_student
from ..students.model_card import write_model_card
from .losses import distillation_loss
from .optim import make_optimizer
from .select import Selection, selection_split, slice_scores
from .steps import check_split, checkpoint_dir, fingerprint, micro_batches, resume, save_checkpoint
from .tracking import end_tracking, flush_trackers, log_step, start_tracking, tracker_settings

__all__ = ["TrainRow", "TrainSet", "rows_from_signals", "train_student"]


@dataclass(frozen=True, slots=True)  # slots: a million rows without a million __dict__s
class TrainRow:
    """A training example: the text, the teacher's distribution and the hard target (gold, else teacher top);
    the signal row's id and, for an augmented text, the id of the row it was made from (the selection slice is
    drawn by id from the original rows)."""

    text: str
    teacher_probs: tuple[float, ...]
    target: int
    id: str = ""
    augmented_from: str | None = None


class TrainSet(Sequence[TrainRow]):
    """Training rows held as columns (texts, ids, sources as lists; probabilities and targets as arrays): about
    half the memory of as many :class:`TrainRow` objects, which it hands out one at a time when indexed."""

    def __init__(self, texts: list[str], teacher_probs: np.ndarray, targets: np.ndarray, ids: list[str],
                 sources: list[str | None]):
        self.texts, self.teacher_probs, self.targets, self.ids, self.sources = texts, teacher_probs, targets, ids, \
            sources  # (N,), (N, C) float64, (N,) int64, (N,), (N,)

    @classmethod
    def of(cls, rows: Iterable[TrainRow]) -> TrainSet:
        if isinstance(rows, TrainSet):
            return rows
        texts, probs, targets, ids, sources = [], array("d"), array("q"), [], []
        width = None
        for r in rows:
            width = len(r.teacher_probs) if width is None else width
            if len(r.teacher_probs) != width:
                raise ProtegeError(f"training row {r.id!r} has {len(r.teacher_probs)} teacher probabilities, the "
                                   f"rows before it {width}; relabel with `protege label`")
            texts.append(r.text)
            probs.extend(r.teacher_probs)
            targets.append(r.target)
            ids.append(r.id)
            sources.append(r.augmented_from)
        p = np.frombuffer(probs, dtype=np.float64).reshape(len(texts), width or 0).copy()
        return cls(texts, p, np.frombuffer(targets, dtype=np.int64).copy(), ids, sources)

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, i: int) -> TrainRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[TrainRow]: ...
    def __getitem__(self, i: int | slice) -> TrainRow | list[TrainRow]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return TrainRow(self.texts[i], tuple(self.teacher_probs[i].tolist()), int(self.targets[i]), self.ids[i],
                        self.sources[i])


def rows_from_signals(recipe: Recipe, signal_rows: Iterable[dict[str, Any]]) -> TrainSet:
    """Training rows of a classification task from signal rows (``signals/train.jsonl``'s format, read one at a
    time); the hard target is the gold label where there is one (and training.use_gold), else the teacher's top
    label."""
    labels, use_gold = recipe.task.label_names, recipe.training.use_gold
    return TrainSet.of(
        TrainRow(
            text=r["text"],
            teacher_probs=tuple(r["teacher_probs"]),
            target=labels.index(r["gold"] if use_gold and r["gold"] is not None else r["teacher_label"]),
            id=str(r["id"]),
            # a text the student labelled (teacher.select_student_labels) trains but is never held out to judge
            # a student by, as an augmented one: the selection slice is drawn from rows without a source
            augmented_from=str(r["id"]) if r.get("labelled_by") == "student" else
            None if r.get("augmented_from") is None else str(r["augmented_from"]),
        )
        for r in signal_rows
    )


def train_student(
    recipe: Recipe,
    rows: Sequence[TrainRow],
    out: Path,
    alpha: float,
    quiet: bool = False,
    extra_meta: dict[str, Any] | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Train one student with ``alpha`` (the recipe's, a sweep's, or 0 for the hard-label baseline) and
    ``temperature`` (default: the recipe's) and save it to ``out``.

    Returns the training summary also written to ``out/protege.json``; with a selection slice its
    ``selection`` entry has the metric, the slice's size, the evaluations and the step whose weights were saved.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg, scfg = recipe.training, recipe.student
    tau = cfg.temperature if temperature is None else temperature
    labels = recipe.task.label_names
    if not rows:
        raise ProtegeError("no training rows: label some data first (`protege label`)")
    rows = TrainSet.of(rows)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        **tracker_settings(recipe),  # refuses a tracker that is not installed, before any work
    )
    set_seed(cfg.seed)
    P, G, B = accelerator.num_processes, cfg.gradient_accumulation_steps, cfg.batch_size
    check_split(B, G, P)
    model, tokenizer, kept = build_student(scfg, labels, cfg.seed, recipe.teacher)
    lr = cfg.learning_rate or (1e-3 if scfg.init == "scratch" else 5e-5)

    # the rows to train on, and the selection slice (row indices; the slice and its augmented texts never train)
    if cfg.select_fraction:
        train_idx, slice_idx = selection_split(rows.ids, rows.sources, cfg.select_fraction, cfg.seed,
                                               with_copies=cfg.select_rows == "all")
    else:
        train_idx, slice_idx = list(range(len(rows))), []
    # training.hidden_weight: the teacher's token states of the training rows (hidden_rows), and a map to their width
    states: dict[int, torch.Tensor] = {}
    if cfg.hidden_weight and alpha > 0:  # the hard-label baseline (alpha 0) learns from labels alone
        from .hidden import hidden_loss, pad_states, teacher_states

        have = [i for i in train_idx if cfg.hidden_rows == "all" or rows.sources[i] is None]
        got, width = teacher_states(recipe.teacher, tokenizer, [rows.texts[i] for i in have], scfg.max_length,
                                    device=accelerator.device)
        states = dict(zip(have, got))
        model.hidden_proj = torch.nn.Linear(model.config.hidden_size, width)  # trained with it, dropped at save
    teacher_probs = torch.from_numpy(rows.teacher_probs).float()  # (N, C)
    targets = torch.from_numpy(rows.targets)  # (N,)

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        # tokenized per batch, not all rows up front: memory does not grow with the rows' token ids
        enc = encode(tokenizer, [rows.texts[i] for i in idx], scfg.max_length)
        padded = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch = {**padded, "teacher_probs": teacher_probs[idx], "targets": targets[idx]}  # (b, T), (b, C), (b,)
        if states:  # (b, T, H) and (b,)
            batch["teacher_states"], batch["has_states"] = pad_states(
                [states.get(i) for i in idx], padded["input_ids"].shape[1], width)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    n = len(train_idx)
    total = cfg.max_steps or cfg.epochs * math.ceil(n / B)
    bag = bool(getattr(model.config, "ngram_buckets", 0))  # a second member, trained apart (students/mean_pool.py)
    rates = {"ngram": scfg.ngram_lr} if bag else {}
    if scfg.embedding_lr is not None:  # the word-embedding table at its own rate; 0 freezes it
        table = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is table)
        if scfg.embedding_lr == 0:
            table.requires_grad_(False)
        else:
            rates[name] = scfg.embedding_lr
    optimizer, scheduler = make_optimizer(model, cfg, lr, total, rates or None)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    named = list(accelerator.unwrap_model(model).named_parameters())
    bag_params = [p for name, p in named if name.startswith("ngram")]
    encoder_params = [p for name, p in named if not name.startswith("ngram")]
    rank = accelerator.process_index
    # With training.ema_decay the averaged copy is the student: the slice scores it, the saved weights are its
    ema = None
    if cfg.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                            use_buffers=False)  # buffers (position ids, the bag's share) are not trained
        accelerator.register_for_checkpointing(ema)  # its average resumes with the run

    def judged() -> torch.nn.Module:
        return ema.module if ema is not None else accelerator.unwrap_model(model)

    selection = Selection(cfg.select_metric, cfg.patience) if slice_idx else None
    if selection is not None:
        accelerator.register_for_checkpointing(selection)  # the best weights and history resume with the run
    every = cfg.eval_every or math.ceil(n / B)  # default: about once per epoch
    my_slice = slice_idx[rank::P]  # each process scores its share; the sums are reduced over all

    from ..students.mean_pool import mix_logits  # here, not at the top: it imports transformers, which a labeling
    # run answered from the store never needs (tests/test_teachers.py)

    shares = torch.linspace(0.0, 1.0, 21)  # the n-gram bag's share in the mixture, chosen on the slice

    @torch.no_grad()
    def score_slice() -> tuple[float, float]:
        """(mean KL(teacher || student) at temperature 1, agreement with the teacher's top label) on the slice.
        With an n-gram bag, the bag's share that gives the lowest KL is set first (the same on every process:
        the sums are reduced before the choice), and the scores are the mixture's at that share."""
        net = judged()
        net.eval()
        sums = torch.zeros(len(shares) if bag else 1, 2, device=accelerator.device, dtype=torch.float64)
        for i in range(0, len(my_slice), B):
            batch = collate(my_slice[i : i + B])
            res = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for j, logits in enumerate([mix_logits(*res.member_logits, sh) for sh in shares] if bag else [res.logits]):
                kl, agree = slice_scores(logits, batch["teacher_probs"])  # logits (b, C)
                sums[j] += torch.stack([kl.double(), agree.double()])
        net.train()
        sums = accelerator.reduce(sums, "sum") / len(slice_idx)
        best = int(sums[:, 0].argmin())
        if bag:
            net.ngram_share.fill_(float(shares[best]))
        return sums[best, 0].item(), sums[best, 1].item()

    # -- resume -------------------------------------------------------------------------------------------
    # the student and the hard-label baseline train from the same rows and recipe: alpha tells them apart
    ckpt, fp = checkpoint_dir(out), fingerprint(recipe, rows, alpha=alpha, temperature=tau)
    start, log = resume(accelerator, ckpt, fp, quiet)
    used = {"training.alpha": alpha, "training.temperature": tau, "training.learning_rate": lr}  # this run's values
    start_tracking(accelerator, recipe, out, start, **used)

    # -- train --------------------------------------------------------------------------------------------
    t0, seen, stopped = time.perf_counter(), 0, False
    bar = tqdm(total=total, initial=start, desc=f"train alpha={alpha:g} tau={tau:g}", unit="step",
               disable=quiet or not accelerator.is_main_process)
    model.train()
    for step in range(start, total):
        epoch, step_rows, mine = micro_batches(step, n, cfg.seed, B, G, P, rank)
        step_rows, mine = [train_idx[i] for i in step_rows], [[train_idx[i] for i in m] for m in mine]
        # Normalize once: every row counts (the loss has no mask), so the count of the whole step over all
        # processes is its rows; each micro-batch's loss sum is divided by it, times P because DDP averages the
        # processes' gradients.
        count = len(step_rows)
        scale = P / count
        sums = torch.zeros(5, device=accelerator.device)  # loss (all terms), ce, kd (the encoder's), the bag's, hidden
        for j, idx in enumerate(mine):
            # an empty micro-batch (fewer rows than micro-batches in the last step) still runs, with no weight, so
            # every process does the same forward and backward passes
            batch = collate(idx or step_rows[:1])
            with contextlib.nullcontext() if j == G - 1 else accelerator.no_sync(model):
                res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=bool(states))
                # each member fits the teacher on its own (an n-gram bag beside the encoder); else the one model
                loss_sum, _, parts = distillation_loss(
                    res.member_logits[0] if bag else res.logits, batch["teacher_probs"], batch["targets"],
                    alpha=alpha, temperature=tau, soft=cfg.soft_loss,
                )  # logits (b, C)
                bag_sum = distillation_loss(
                    res.member_logits[1], batch["teacher_probs"], batch["targets"], alpha=alpha, temperature=tau,
                    soft=cfg.soft_loss,
                )[0] if bag else torch.zeros((), device=loss_sum.device)
                loss_sum = loss_sum + bag_sum
                hidden_sum = hidden_loss(
                    res.hidden_states[-1], batch["teacher_states"], batch["attention_mask"], batch["has_states"],
                    accelerator.unwrap_model(model).hidden_proj,
                ) if states else torch.zeros((), device=loss_sum.device)
                loss_sum = loss_sum + cfg.hidden_weight * hidden_sum
                accelerator.backward(loss_sum * (scale if idx else 0.0))
            if idx:
                sums += torch.stack([loss_sum.detach(), parts["ce"].detach(), parts["kd"].detach(),
                                     bag_sum.detach(), hidden_sum.detach()])
        if cfg.max_grad_norm is not None:  # after the whole step's backward passes: the norm of its full gradient
            # an n-gram bag is clipped on its own: one norm over both members would let one's steps shrink the other's
            grad_norm = accelerator.clip_grad_norm_(encoder_params if bag else model.parameters(), cfg.max_grad_norm)
            if bag:
                bag_norm = accelerator.clip_grad_norm_(bag_params, cfg.max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
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
            **({"ngram_loss": sums[3].item()} if bag else {}),  # loss is the encoder's (kd, ce) plus this
            **({"hidden_loss": sums[4].item()} if states else {}),  # ... plus hidden_weight times this
            "lr": scheduler.get_last_lr()[0],
            **({"grad_norm": float(grad_norm)} if cfg.max_grad_norm is not None else {}),  # before clipping
            **({"ngram_grad_norm": float(bag_norm)} if bag and cfg.max_grad_norm is not None else {}),
            "examples_per_s": seen / (time.perf_counter() - t0),
        }
        if selection is not None and ((step + 1) % every == 0 or step + 1 == total):
            rec["select_kl"], rec["select_agreement"] = score_slice()
            selection.record(step + 1, rec["select_kl"], rec["select_agreement"], judged())
        log.append(rec)
        log_step(accelerator, rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd_loss']:.3f}", ce=f"{rec['ce_loss']:.3f}")
        if selection is not None and selection.should_stop and step + 1 < total:
            stopped = True  # patience evaluations in a row without improvement
            break
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            flush_trackers(accelerator)  # first: once the checkpoint exists, the points it resumes after are on disk
            save_checkpoint(accelerator, ckpt, {"step": step + 1, "fingerprint": fp, "log": log})
    bar.close()
    seconds = time.perf_counter() - t0
    steps_trained = log[-1]["step"] if log else start
    if selection is not None:
        accelerator.unwrap_model(model).load_state_dict(selection.best_weights)  # the best step is the one saved
    elif ema is not None:
        accelerator.unwrap_model(model).load_state_dict(ema.module.state_dict())
    if hasattr(accelerator.unwrap_model(model), "hidden_proj"):
        del accelerator.unwrap_model(model).hidden_proj  # a training aid: the student answers without it

    # -- save ---------------------------------------------------------------------------------------------
    summary = {
        "labels": list(labels),
        "alpha": alpha,
        "temperature": tau,
        "init": scfg.init,
        "kept_layers": kept,
        "learning_rate": lr,
        "steps": steps_trained,
        "resumed_from_step": start,
        "batch_size": B,
        "gradient_accumulation_steps": G,
        "processes": P,
        "examples": n,
        "train_seconds": seconds,
        "parameters": count_parameters(accelerator.unwrap_model(model)),
        "final_loss": log[-1]["loss"] if log else None,
        **({"ema_decay": cfg.ema_decay} if ema is not None else {}),
        **({"hidden_weight": cfg.hidden_weight, "hidden_rows": len(states)} if states else {}),
        **({"selection": selection.summary(len(slice_idx), steps_trained, stopped)} if selection is not None else {}),
        **(extra_meta or {}),
    }
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            card = StudentCard.for_classifier(recipe, labels, summary)  # labels, max length, teacher, price
            save_student(accelerator.unwrap_model(model), tokenizer, tmp, card)
            write_text_atomic(tmp / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            recipe.save(tmp / "recipe.yaml")
            write_model_card(tmp)  # README.md, a Hub model card from the two files above (no figures yet)
        shutil.rmtree(ckpt, ignore_errors=True)
    end_tracking(accelerator)
    accelerator.wait_for_everyone()
    return summary
