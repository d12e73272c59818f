"""Selective labeling (``teacher.select``): spend teacher calls where they teach the student most.

Stage 1 for a classification recipe with ``teacher.select: uncertainty`` (or ``random``, the baseline, through the
same loop). The evaluation split is labelled in full, as always. Then, in rounds:

    label (a random seed slice; then the round's pick)  ->  train a student on everything labelled so far
      (with select_student_labels, also on the texts not sent to the teacher, labelled by a first student trained
      on the teacher's answers alone: self-training, no teacher calls)
      -> score it (agreement with the teacher on the evaluation split and, with select_target, on a held-out
         teacher-labelled slice of training texts)  ->  stop (select_max_rows, budget_usd, select_target, no texts
         left)  or  pick the next round: the texts it is least sure of, spread out (protege.labeling.uncertainty),
         select_random_share of them drawn at random instead

Labels go through the engine and the store like any labeling: a rerun repeats the recorded picks and makes zero
calls, and a budget reached in a round ends the loop with what was labelled (not an error). At the end
``signals/train.jsonl`` holds exactly the labelled training rows, ``signals/student_labels.jsonl`` (with
select_student_labels) the other training texts with the probabilities of a student trained on the teacher's
answers, and ``signals/selection.json`` the rounds, which the report draws as a learning curve. It sits above
labeling and training (it uses both), beside the pipeline.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._io import content_hash, write_json_atomic, write_jsonl_atomic
from .errors import BudgetReached, ProtegeError
from .labeling.data import Example, load_splits
from .labeling.labeler import (
    SHOTS_FILE,
    LabelStats,
    _ok_rows,
    _remove_signals,
    check_failures,
    label_examples,
    requests_for,
    split_shots,
    task_labels,
)
from .labeling.labeler import label as label_all
from .labeling.signal_files import write_signals
from .labeling.uncertainty import pick
from .recipe import Recipe
from .store import Store, call_key
from .teachers import make_teacher
from .teachers.base import Teacher

__all__ = ["SELECTION_FILE", "STUDENT_LABELS_FILE", "label", "label_selected"]

SELECTION_FILE = "selection.json"
STUDENT_LABELS_FILE = "student_labels.jsonl"


def label(recipe: Recipe, quiet: bool = False, teacher: Teacher | None = None) -> LabelStats:
    """Stage 1: every training text (``teacher.select: all``, :func:`protege.labeling.labeler.label`), or the
    ones selective labeling picks (:func:`label_selected`)."""
    if recipe.teacher.select == "all":
        return label_all(recipe, quiet, teacher)
    return label_selected(recipe, quiet, teacher)


def _fingerprint(recipe: Recipe) -> str:
    """What the picks depend on: a recipe whose limits alone changed (a higher cap, a new target) replays them."""
    dump = recipe.model_dump(mode="json")
    if recipe.teacher.select == "random":  # settings of uncertainty's picks do not change random's
        for name in ("select_random_share", "select_diversity"):
            dump["teacher"].pop(name)
    for name in ("budget_usd", "select_max_rows", "select_target", "concurrency", "requests_per_minute",
                 "tokens_per_minute", "max_retries", "timeout_s"):
        dump["teacher"].pop(name)
    for name in ("report_to", "checkpoint_every"):
        dump["training"].pop(name)
    return content_hash({k: dump[k] for k in ("task", "data", "teacher", "student", "training")})[:16]


def _recorded_rounds(recipe: Recipe, fingerprint: str) -> list[dict[str, Any]]:
    path = recipe.output_dir / "signals" / SELECTION_FILE
    if not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["rounds"] if saved.get("fingerprint") == fingerprint else []


def label_selected(recipe: Recipe, quiet: bool = False, teacher: Teacher | None = None) -> LabelStats:
    """Stage 1 with ``teacher.select`` random or uncertainty: the evaluation split in full, then rounds until a
    limit; writes ``signals/{train,eval,failed}.jsonl`` and ``signals/selection.json``.

    Raises :class:`BudgetReached` only when the budget ends before the evaluation split (or the select_target
    slice) is labelled, or before any training text is; a budget reached in a round ends the loop.
    """
    cfg = recipe.teacher
    if recipe.task.kind != "classification":  # the recipe refuses it; a Recipe built around validation may not
        raise ProtegeError("teacher.select applies to classification tasks; set teacher.select: all")
    train, held = load_splits(recipe.data, task_labels(recipe), recipe.training.seed)
    shots, train = split_shots(recipe, train)
    teacher = None if cfg.kind == "ensemble" else teacher or make_teacher(cfg)
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(recipe)
    recorded = _recorded_rounds(recipe, fingerprint)
    total = LabelStats()
    results: dict[str, tuple[list, list, list[str], dict]] = {}
    rng = random.Random(recipe.training.seed)
    pool = sorted(range(len(train)), key=lambda i: rng.random())  # the training texts in a seeded random order

    try:
        with Store(recipe.store_path) as store:

            def buy(examples: list[Example], desc: str) -> tuple[list, list[str], LabelStats]:
                signals, keys, stats = label_examples(teacher, recipe, examples, store, quiet, desc, shots)
                total.add(stats)
                return signals, keys, stats

            signals, keys, stats = buy(held, "label eval")
            results["eval"] = (held, signals, keys, store.failures([k for k, s in zip(keys, signals) if s is None]))
            total.by_split["eval"] = {"examples": stats.examples, "cached": stats.cached, "called": stats.called,
                                      "failed": sum(s is None for s in signals)}
            check: list[int] = []
            check_ok: list[tuple[int, Any]] = []
            if cfg.select_target is not None:  # drawn first and never picked: the slice the target is checked on
                check, pool = pool[: cfg.select_check_rows], pool[cfg.select_check_rows :]
                check_signals, check_keys, _ = buy([train[i] for i in check], "label check")
                check_ok = [(i, s) for i, s in zip(check, check_signals) if s is not None]
            loop = _Loop(recipe, store, train, shots, teacher, quiet)
            rounds = loop.run(pool, recorded, buy, check_ok, held, results["eval"][1])
            total.add(loop.total)
            # the final student trains on these beside the teacher's answers
            student_rows = loop.final_student_labels(len(rounds)) if cfg.select_student_labels else None
    except ProtegeError:
        _remove_signals(out)
        (out / "signals" / STUDENT_LABELS_FILE).unlink(missing_ok=True)
        raise
    labelled = [i for r in rounds for i in r.pop("_indices")]
    lab_examples = [train[i] for i in labelled]
    lab_signals, lab_keys = [loop.signals[i] for i in labelled], [loop.keys[i] for i in labelled]
    if check:
        lab_examples += [train[i] for i in check]
        lab_signals += check_signals
        lab_keys += check_keys
    with Store(recipe.store_path) as store:
        failures = store.failures([k for k, s in zip(lab_keys, lab_signals) if s is None])
    results["train"] = (lab_examples, lab_signals, lab_keys, failures)
    total.by_split["train"] = {"examples": len(lab_examples), "cached": total.cached - total.by_split["eval"]["cached"],
                               "called": total.called - total.by_split["eval"]["called"],
                               "failed": sum(s is None for s in lab_signals)}
    check_failures(recipe, results, len(held) + len(lab_examples))
    write_jsonl_atomic(out / "signals" / SHOTS_FILE, [e.model_dump() for e in shots[len(recipe.task.examples):]])
    for split in ("train", "eval"):
        write_signals(out / "signals" / f"{split}.jsonl", _ok_rows(recipe, shots, *results[split][:3]), parquet=True)
    student_labels = out / "signals" / STUDENT_LABELS_FILE
    if student_rows is not None:
        write_jsonl_atomic(student_labels, student_rows)
    else:
        student_labels.unlink(missing_ok=True)
    write_json_atomic(out / "signals" / SELECTION_FILE, {
        "fingerprint": fingerprint,
        "select": cfg.select,
        "metric": cfg.select_metric if cfg.select == "uncertainty" else None,
        "random_share": cfg.select_random_share if cfg.select == "uncertainty" else None,
        "diversity": cfg.select_diversity if cfg.select == "uncertainty" else None,
        "student_labels": cfg.select_student_labels,
        "seed_rows": cfg.select_seed_rows,
        "round_rows": cfg.select_round_rows,
        "max_rows": cfg.select_max_rows,
        "budget_usd": cfg.budget_usd,
        "target": cfg.select_target,
        "check_rows": len(check),
        "pool_rows": len(train) - len(check),
        "eval_rows": len(held),
        "teacher_eval_accuracy": loop.teacher_accuracy,
        "stopped": loop.stopped,
        "rounds": rounds,
    })
    recipe.save(out / "signals" / "recipe.yaml")
    return total


def _eval_agreement(probs: np.ndarray, teacher_top: np.ndarray) -> float:
    return float((probs.argmax(1) == teacher_top).mean()) if len(teacher_top) else float("nan")


class _Loop:
    """The rounds of :func:`label_selected`, their state in one place (labels bought, the last student)."""

    def __init__(self, recipe: Recipe, store: Store, train: list[Example], shots: list, teacher: Teacher | None,
                 quiet: bool):
        self.recipe, self.store, self.train, self.shots, self.teacher, self.quiet = \
            recipe, store, train, shots, teacher, quiet
        self.signals: dict[int, Any] = {}  # training text index -> its signal (None: the teacher failed)
        self.keys: dict[int, str] = {}
        self.stopped = ""
        self.total = LabelStats()  # what rounds cut short by the budget bought (the others count themselves)
        self.teacher_accuracy: float | None = None
        self.left: list[int] = []  # training texts not sent to the teacher (yet), in the seeded random order
        self.student_labels: list[dict[str, Any]] = []  # the last student-labelled rows (select_student_labels)
        self._labels_for: tuple[int, ...] | None = None  # the texts they label

    def run(self, pool: list[int], recorded: list[dict[str, Any]], buy: Any, check: list[tuple[int, Any]],
            held: list[Example], held_signals: list) -> list[dict[str, Any]]:
        cfg, labels = self.recipe.teacher, self.recipe.task.label_names
        ok_held = [(ex, s) for ex, s in zip(held, held_signals) if s is not None]
        held_texts = [ex.text for ex, _ in ok_held]
        held_top = np.array([labels.index(s.distribution.top) for _, s in ok_held])
        gold = [(n, labels.index(ex.gold)) for n, (ex, _) in enumerate(ok_held) if ex.gold is not None]
        if gold:
            g_idx, g_lab = np.array([n for n, _ in gold]), np.array([y for _, y in gold])
            self.teacher_accuracy = float((held_top[g_idx] == g_lab).mean())
        check_texts = [self.train[i].text for i, _ in check]
        check_top = np.array([labels.index(s.distribution.top) for _, s in check])
        cap = cfg.select_max_rows
        left = self.left = list(pool)  # not yet sent to the teacher, in the seeded random order
        rounds: list[dict[str, Any]] = []
        n_labelled = 0
        while left:
            want = cfg.select_seed_rows if not rounds else cfg.select_round_rows
            if cap is not None:
                want = min(want, cap - n_labelled)
            r = len(rounds)
            replay = r < len(recorded) and len(recorded[r]["ids"]) >= want
            if replay:  # a rerun: the same picks (the store answers them); a round cut short is picked afresh
                waiting = set(left)
                chosen = [i for i in self._indices(recorded[r]["ids"]) if i in waiting][:want]
            elif not rounds or cfg.select == "random":
                chosen = left[:want]
            else:
                chosen = self._pick(left, want, r)
            left_set = set(chosen)
            left = self.left = [i for i in left if i not in left_set]
            examples = [self.train[i] for i in chosen]
            t0 = time.perf_counter()
            budget_hit = False
            if self.teacher is not None:  # an ensemble's members have keys of their own
                keys = [call_key(self.teacher.identity, q.to_json())
                        for q in requests_for(self.recipe, examples, self.shots)]
                had = set(self.store.get_signals(keys))
            try:
                signals, keys, stats = buy(examples, f"label round {r}")
            except BudgetReached:
                if self.teacher is None or (not rounds and not set(self.store.get_signals(keys)) - had):
                    raise  # nothing to train on yet (or an ensemble, whose answers are read back per member)
                # the round ends with what it bought before the cap: the store has every answer that finished
                got = self.store.get_signals(keys)
                answered = [k in got for k in keys]
                chosen = [i for i, a in zip(chosen, answered) if a]
                keys = [k for k, a in zip(keys, answered) if a]
                signals = [got[k] for k in keys]
                stats = LabelStats(examples=len(keys), cached=len(set(keys) & had), called=len(set(keys) - had))
                self.total.add(stats)
                budget_hit = True
                if not chosen:
                    self.stopped = "budget"
                    break
            label_s = time.perf_counter() - t0
            for i, s, k in zip(chosen, signals, keys):
                self.signals[i], self.keys[i] = s, k
            n_labelled += sum(s is not None for s in signals)
            bought = [i for rr in rounds for i in rr["_indices"]] + chosen
            record = {
                "round": r,
                "ids": [self.train[i].id for i in chosen],
                "_indices": chosen,
                "rows": n_labelled,  # training texts the teacher labelled so far (failed calls not counted)
                "teacher_calls": len(bought) + len(check),  # training texts sent to the teacher, check slice included
                "new_calls": stats.called,  # calls this run made (0 on a rerun: the store answered)
                "usd": self._usd(bought, check),
                "label_seconds": label_s,
            }
            if chosen and n_labelled:
                same = replay and recorded[r].get("rows") == n_labelled and "eval_agreement" in recorded[r]
                if same:  # the same rows as recorded: the same student; its scores are kept, not retrained
                    for k in ("eval_agreement", "eval_accuracy", "check_agreement", "train_seconds", "student_labels"):
                        record[k] = recorded[r].get(k)
                    self._model = None
                else:
                    record.update(self._train_and_score(held_texts, held_top, gold, check_texts, check_top, r))
                    if self.recipe.teacher.select_student_labels:
                        record["student_labels"] = len(self.student_labels)
            rounds.append(record)
            stop = ("budget" if budget_hit else
                    "max_rows" if cap is not None and n_labelled >= cap else
                    "target" if cfg.select_target is not None and (record.get("check_agreement") or 0) >=
                    cfg.select_target else "")
            if stop:
                self.stopped = stop
                break
        else:
            self.stopped = "pool"
        return rounds

    def _indices(self, ids: list[str]) -> list[int]:
        where = {ex.id: i for i, ex in enumerate(self.train)}
        return [where[x] for x in ids if x in where]

    def _usd(self, bought: list[int], check: list[tuple[int, Any]]) -> float:
        """What the teacher's answers to these texts cost, from the store: money paid to an API, or a local
        teacher's recorded compute seconds at eval.compute_usd_per_hour (each answer once, whenever bought)."""
        keys = [self.keys[i] for i in bought if i in self.keys] + [self.keys.get(i, "") for i, _ in check]
        usage = self.store.call_usage([k for k in keys if k])
        usd = sum(u.spent_usd for u in usage.values())
        if self.recipe.teacher.kind == "local":
            usd += sum(u.seconds for u in usage.values()) / 3600 * self.recipe.eval.compute_usd_per_hour
        return usd

    # -- the student of a round -------------------------------------------------------------------------------

    _model: Any = None

    def _labelled_rows(self) -> list[dict[str, Any]]:
        idx = [i for i, s in self.signals.items() if s is not None]
        return _ok_rows(self.recipe, self.shots, [self.train[i] for i in idx], [self.signals[i] for i in idx],
                        [self.keys[i] for i in idx])

    def _fit(self, signal_rows: list[dict[str, Any]], r: int) -> float:
        """Train a student on ``signal_rows`` (the recipe's student and training settings) and keep it in memory
        as the round's student; returns its training seconds."""
        from .students.classifier import load_student
        from .training.classifier import rows_from_signals, train_student

        rows = rows_from_signals(self.recipe, signal_rows)
        with tempfile.TemporaryDirectory(prefix="select-", dir=self.recipe.output_dir) as tmp:
            summary = train_student(self.recipe, rows, Path(tmp) / "student", self.recipe.training.alpha, quiet=True)
            self._model = load_student(Path(tmp) / "student")[:2]
        self.store.log_compute("select:train", summary["train_seconds"], examples=len(rows), round=r)
        return summary["train_seconds"]

    def _train(self, r: int) -> float:
        """The round's student, kept in memory for scoring and picking: trained on every text the teacher labelled
        so far; with select_student_labels, a first student trained so labels the texts left, and the round's
        student trains on both (twice the training time). Returns the training seconds."""
        teacher_rows = self._labelled_rows()
        seconds = self._fit(teacher_rows, r)
        if self.recipe.teacher.select_student_labels and self.left:
            self._label_left()
            seconds += self._fit(teacher_rows + self.student_labels, r)
        return seconds

    def _label_left(self) -> None:
        """Rows for the texts not sent to the teacher, labelled by the student in memory (its probabilities as soft
        targets; ``labelled_by: student``), in the shape of signals/train.jsonl's rows."""
        labels = self.recipe.task.label_names
        examples = [self.train[i] for i in self.left]
        probs, _ = self._predict([ex.text for ex in examples])
        self.student_labels = [
            {"id": ex.id, "text": ex.text, "gold": ex.gold, "teacher_label": labels[int(p.argmax())],
             "teacher_probs": [float(x) for x in p], "method": "student", "label_mass": 1.0, "call_key": None,
             "labelled_by": "student"}
            for ex, p in zip(examples, probs)
        ]
        self._labels_for = tuple(self.left)

    def final_student_labels(self, r: int) -> list[dict[str, Any]]:
        """The student-labelled rows the final student trains on beside the teacher's answers: the texts never sent
        to the teacher, labelled by a student trained on all the teacher's answers (made now when the last round
        was replayed from a recording)."""
        if not self.left:
            return []
        if self._labels_for != tuple(self.left):
            self._fit(self._labelled_rows(), r)
            self._label_left()
        return self.student_labels

    def _train_and_score(self, held_texts: list[str], held_top: np.ndarray, gold: list[tuple[int, int]],
                         check_texts: list[str], check_top: np.ndarray, r: int) -> dict[str, Any]:
        seconds = self._train(r)
        probs, _ = self._predict(held_texts)
        scored: dict[str, Any] = {"eval_agreement": _eval_agreement(probs, held_top), "eval_accuracy": None,
                                  "check_agreement": None, "train_seconds": seconds}
        if gold:
            g_idx, g_lab = np.array([n for n, _ in gold]), np.array([y for _, y in gold])
            scored["eval_accuracy"] = float((probs[g_idx].argmax(1) == g_lab).mean())
        if check_texts:
            scored["check_agreement"] = _eval_agreement(self._predict(check_texts)[0], check_top)
        return scored

    def _pick(self, left: list[int], k: int, r: int) -> list[int]:
        """The round's k texts among those left: select_random_share of them the next in the seeded random order
        (as select 'random' would take), the rest the least sure of the others, spread over the student's hidden
        states (select_diversity)."""
        cfg = self.recipe.teacher
        n_random = min(round(cfg.select_random_share * k), k)
        drawn, rest = left[:n_random], left[n_random:]
        if n_random == k or not rest:
            return drawn
        if self._model is None:  # replayed rounds kept their scores; the last one's student is needed now
            self._train(r - 1)
        probs, feats = self._predict([self.train[i].text for i in rest])
        chosen = pick(probs, k - n_random, cfg.select_metric, feats if cfg.select_diversity else None,
                      seed=self.recipe.training.seed + r)
        return drawn + [rest[j] for j in chosen]

    def _predict(self, texts: list[str], batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(label probabilities (N, C), mean-pooled last hidden states (N, H)) of the round's student."""
        import torch

        model, tok = self._model
        probs, feats = [], []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = tok(texts[i : i + batch], padding=True, truncation=True,
                          max_length=self.recipe.student.max_length, return_tensors="pt")
                o = model(**enc, output_hidden_states=True)
                mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
                h = o.hidden_states[-1].float()  # (b, T, H)
                feats.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())  # (b, H)
                probs.append(torch.softmax(o.logits.float(), -1).numpy())  # (b, C)
        n = len(self.recipe.task.label_names)
        return (np.concatenate(probs) if probs else np.zeros((0, n)),
                np.concatenate(feats) if feats else np.zeros((0, 1)))
