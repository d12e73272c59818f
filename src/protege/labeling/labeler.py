"""Labeling: send each text to the teacher once, ever; record every call in the store as it finishes."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._io import write_jsonl_atomic
from ..errors import ProtegeError
from ..recipe import FewShotExample, Recipe
from ..signals import TeacherSignal
from ..store import CallRecord, Store, call_key
from ..teachers import make_teacher
from ..teachers.base import LocalTeacher, Request, Teacher
from .augment import (
    AugmentedExample,
    augment_texts,
    check_paraphrase,
    paraphrase_request,
    student_mask_token,
    student_neighbours,
)
from .data import Example, draw_shots, load_splits, stream_splits
from .engine import run_api
from .prompts import render_generation, render_request
from .signal_files import SignalWriter, iter_signals, remove_signals

__all__ = ["LabelStats", "Estimate", "check_failures", "label_examples", "label_requests", "label", "estimate",
           "estimate_requests", "read_signals"]


@dataclass
class LabelStats:
    examples: int = 0
    cached: int = 0
    called: int = 0
    failed: int = 0
    attempts: int = 0  # HTTP calls sent (API teachers), retries included
    parse_retries: int = 0  # calls repeated because an answer named no label
    cost_usd: float = 0.0
    seconds: float = 0.0
    by_split: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, other: LabelStats) -> None:
        for name in ("examples", "cached", "called", "failed", "attempts", "parse_retries", "cost_usd", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def task_labels(recipe: Recipe) -> tuple[str, ...] | None:
    """The label set gold labels must come from; None for a generation task (free-text references)."""
    return recipe.task.label_names if recipe.task.kind == "classification" else None


SHOTS_FILE = "shots.jsonl"
CHUNK_ROWS = 2048  # rows labelled (and written) at a time: what a labeling run holds in memory at once


def split_shots(recipe: Recipe, train: list[Example]) -> tuple[list[FewShotExample], list[Example]]:
    """(worked examples the teacher sees with every text, training rows left): ``task.examples`` and the
    ``teacher.few_shot`` rows per label drawn from the gold-labelled training rows, which leave training."""
    drawn, rest = draw_shots(train, recipe.task.label_names, recipe.teacher.few_shot, recipe.training.seed) \
        if recipe.teacher.few_shot else ([], train)
    shots = list(recipe.task.examples) + [FewShotExample(text=e.text, label=e.gold) for e in drawn]
    return shots, rest


def recipe_shots(recipe: Recipe) -> list[FewShotExample]:
    """The worked examples labeling used: ``task.examples`` plus the drawn ones that :func:`label` saved (so the
    cascade and evaluation ask the teacher exactly as labeling did, without the data file)."""
    shots = list(recipe.task.examples)
    if recipe.teacher.few_shot:
        path = recipe.output_dir / "signals" / SHOTS_FILE
        if not path.is_file():
            raise ProtegeError(f"{str(path)!r} does not exist; run `protege label` first (teacher.few_shot is set)")
        import json

        shots += [FewShotExample(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return shots


def requests_for(
    recipe: Recipe, examples: list[Example], shots: list[FewShotExample] | None = None
) -> list[Request]:
    """The teacher's requests for ``examples``; ``shots`` default to :func:`recipe_shots`."""
    shots = recipe_shots(recipe) if shots is None else shots
    if recipe.task.kind == "generation":
        t = recipe.teacher
        return [render_generation(recipe.task, ex.text, t.max_tokens, t.top_logprobs, shots) for ex in examples]
    rationale = recipe.teacher.rationale
    return [render_request(recipe.task, ex.text, rationale, shots) for ex in examples]


def label_examples(
    teacher: Teacher | None, recipe: Recipe, examples: list[Example], store: Store, quiet: bool = False,
    desc: str = "label", shots: list[FewShotExample] | None = None,
) -> tuple[list[TeacherSignal | None], list[str], LabelStats]:
    """Signals for ``examples`` in order (None where the teacher failed), calling the teacher only for keys
    the store does not hold as answered.

    Local teachers: each batch is committed before the next is sent. API teachers: each row is committed as it
    finishes (see :mod:`protege.labeling.engine`). Either way a crash loses at most the calls in flight.
    An ensemble (``teacher`` None) labels through each member and combines them (:mod:`.ensemble`).
    """
    if recipe.teacher.kind == "ensemble":
        from .ensemble import label_ensemble

        return label_ensemble(recipe, examples, store, label_examples, quiet, desc, shots)
    assert teacher is not None, "a teacher that is not an ensemble labels through its own Teacher"
    return label_requests(teacher, recipe, requests_for(recipe, examples, shots), store, quiet, desc)


def label_requests(
    teacher: Teacher, recipe: Recipe, requests: list[Request], store: Store, quiet: bool = False, desc: str = "label"
) -> tuple[list[TeacherSignal | None], list[str], LabelStats]:
    """:func:`label_examples` for requests already rendered (the cascade asks with a served conversation)."""
    keys = [call_key(teacher.identity, r.to_json()) for r in requests]
    done = store.get_signals(keys)
    todo: dict[str, Request] = {}
    for k, r in zip(keys, requests):
        if k not in done:
            todo.setdefault(k, r)  # identical texts share one call
    stats = LabelStats(examples=len(requests), cached=sum(k in done for k in keys))
    items = list(todo.items())
    if teacher.kind == "api":
        if recipe.teacher.batch_api:
            from .batch import run_batch

            answered, es = run_batch(teacher, recipe.teacher, store, items, recipe.teacher.model, quiet, desc)
        else:
            answered, es = run_api(teacher, recipe.teacher, store, items, recipe.teacher.model, quiet, desc)
        done.update(answered)
        stats.called, stats.failed, stats.attempts = es.ok + es.failed, es.failed, es.attempts
        stats.parse_retries = es.parse_retries
        stats.cost_usd, stats.seconds = es.cost_usd, es.seconds
    else:
        _label_local(teacher, recipe, items, store, quiet, desc, done, stats)
    if todo:  # the new answers as the store keeps them (token log-probabilities rounded): a rerun reads the same
        done.update(store.get_signals([k for k in todo if k in done]))
    return [done.get(k) for k in keys], keys, stats


def _label_local(
    teacher: LocalTeacher,
    recipe: Recipe,
    items: list[tuple[str, Request]],
    store: Store,
    quiet: bool,
    desc: str,
    done: dict[str, TeacherSignal],
    stats: LabelStats,
) -> None:
    batch_size = recipe.teacher.batch_size
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
            stats.attempts += len(batch)
            stats.seconds += dt
            bar.update(len(batch))


def _signal_rows(
    examples: list[Example], signals: list[TeacherSignal], keys: list[str], requests: list[Request]
) -> list[dict[str, Any]]:
    """The signal dataset: one JSON object per example, readable by ``datasets.load_dataset('json', ...)``.

    Generation rows carry the prompt as the teacher saw it (``messages``), the teacher's whole reply
    (``teacher_text``, what ``token_logprobs`` describe token by token), the final ``answer`` (None when a
    rationale format found no 'Answer:' line) and the ``rationale``; ``gold`` is the data's reference answer.
    """
    if requests and requests[0].generate is not None:
        return [
            {
                "id": ex.id,
                "text": ex.text,
                "gold": ex.gold,
                "messages": list(r.messages),
                "teacher_text": s.text,
                "answer": s.answer,
                "rationale": s.rationale,
                "thinking": s.thinking,
                "truncated": s.truncated,
                "token_logprobs": None if s.token_logprobs is None else asdict(s.token_logprobs),
                "call_key": k,
            }
            for ex, s, k, r in zip(examples, signals, keys, requests)
        ]
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


def _augmented(recipe: Recipe, train: list[Example], held: list[Example]) -> list[AugmentedExample]:
    """The ``data.augment.per_text`` new texts made from the training rows (none equal to a held-out text)."""
    cfg = recipe.data.augment
    if not cfg.per_text:
        return []
    mask = student_mask_token(recipe) if cfg.mask_p else ""  # no tokenizer to load when nothing is masked
    swaps = cfg.replace_with == "neighbours" and cfg.replace_p > 0  # no table to load when nothing is swapped
    near = student_neighbours(recipe, (e.text for e in train)) if swaps else None
    return augment_texts(train, cfg, recipe.training.seed, mask, avoid=(e.text for e in held), neighbours=near)


def _paraphrased(
    train: list[Example], signals: list[TeacherSignal | None], taken: set[str]
) -> list[AugmentedExample]:
    """The teacher's paraphrases as new examples (``f"{src.id}~para"``), leaving out failed calls and any reply
    that repeats a text already in ``taken`` (which grows with the new ones)."""
    out = []
    for src, s in zip(train, signals):
        text = (s.text or "").strip() if s is not None else ""
        if text and text not in taken:
            taken.add(text)
            out.append(AugmentedExample(f"{src.id}~para", text, None, src.where, src.id))
    return out


def label(recipe: Recipe, quiet: bool = False, teacher: Teacher | None = None) -> LabelStats:
    """Stage 1: label the training and evaluation splits; write ``signals/{train,eval}.jsonl``.

    With ``data.augment`` the new texts made from the training rows (and, with ``paraphrase``, the teacher's
    rewrites of them, asked for after the originals are labelled) are labelled by the same teacher and written
    after the originals in ``signals/train.jsonl``, each with ``augmented_from`` (its source row's id). They
    are bought last, so a budget cap spends on the originals first; evaluation is never augmented.

    Rows the teacher failed on go to ``signals/failed.jsonl`` with the reason and the raw reply, and are left
    out of the signal files. More than ``teacher.max_failed_fraction`` of them stops the pipeline (the
    answers stay in the store; a rerun retries only the failures). If labeling stops early (budget reached,
    the provider refused), the signal files are removed, so no later stage trains on a stale or partial set.
    """
    check_paraphrase(recipe)
    aug = recipe.data.augment
    # the few-shot draw and the transfer set need every training row at once; a provider's batch API takes a split
    # in one batch (a batch per chunk would wait for each in turn, hours apiece)
    whole = recipe.teacher.batch_api
    if recipe.teacher.few_shot or aug.per_text or aug.paraphrase or whole:
        train, held = load_splits(recipe.data, task_labels(recipe), recipe.training.seed)
        shots, train = split_shots(recipe, train)
        n_train, train_rows = len(train), train
        augmented = _augmented(recipe, train, held)
    else:  # read a chunk of training rows at a time: memory does not grow with the data
        rows_of, n_train, held = stream_splits(recipe.data, task_labels(recipe), recipe.training.seed)
        shots, train_rows, augmented = list(recipe.task.examples), rows_of(), []
    ensemble = recipe.teacher.kind == "ensemble"
    teacher = None if ensemble else teacher or make_teacher(recipe.teacher)
    out = recipe.output_dir
    sig = out / "signals"
    sig.mkdir(parents=True, exist_ok=True)
    total = LabelStats()
    failed_rows: list[dict[str, Any]] = []
    parquet = recipe.task.kind == "classification"

    def run(split: str, examples: Iterable[Any], n: int, store: Store, writer: SignalWriter | None,
            extra: Any = None) -> None:
        """Label ``examples`` a chunk at a time (the store keeps every answer as it comes), streaming the answered
        rows to ``writer`` and noting the failures: memory stays that of one chunk, however many rows."""
        stats_split = {"examples": 0, "cached": 0, "called": 0, "failed": 0}
        rows_left = iter(examples)
        with tqdm(total=n, desc=f"label {split}", unit="row", disable=quiet or not n) as bar:
            while chunk := list(itertools.islice(rows_left, max(n, 1) if whole else CHUNK_ROWS)):
                requests = requests_for(recipe, chunk, shots)  # rendered once: for the keys and the rows
                if teacher is None:  # an ensemble labels through each member
                    signals, keys, stats = label_examples(None, recipe, chunk, store, True, shots=shots)
                else:
                    signals, keys, stats = label_requests(teacher, recipe, requests, store, True)
                total.add(stats)
                fails = store.failures([k for k, s in zip(keys, signals) if s is None])
                failed_rows.extend(failed_rows_of(split, chunk, signals, keys, fails))
                for name in ("examples", "cached", "called"):
                    stats_split[name] += getattr(stats, name)
                stats_split["failed"] += sum(s is None for s in signals)
                if writer is not None:
                    rows = _ok_rows(recipe, shots, chunk, signals, keys, requests)
                    writer.write([{**row, **extra(row)} for row in rows] if extra else rows)
                bar.update(len(chunk))
        total.by_split[split] = stats_split

    try:
        with contextlib.ExitStack() as files, Store(recipe.store_path) as store:
            writers = {split: files.enter_context(SignalWriter(sig / f"{split}.jsonl", parquet))
                       for split in ("train", "eval")}
            run("train", train_rows, n_train, store, writers["train"])
            run("eval", held, len(held), store, writers["eval"])
            if recipe.data.augment.paraphrase:
                requests = [paraphrase_request(e.text) for e in train]
                signals, keys, stats = label_requests(teacher, recipe, requests, store, quiet, desc="paraphrase")
                total.add(stats)
                total.by_split["paraphrase"] = {"examples": stats.examples, "cached": stats.cached,
                                                "called": stats.called, "failed": sum(s is None for s in signals)}
                fails = store.failures([k for k, s in zip(keys, signals) if s is None])
                failed_rows.extend(failed_rows_of("paraphrase", train, signals, keys, fails))
                augmented += _paraphrased(train, signals, {e.text.strip() for e in train + held + augmented})
            if recipe.data.augment.per_text or recipe.data.augment.paraphrase:
                sources = {ex.id: ex.source for ex in augmented}
                run("augment", augmented, len(augmented), store, writers["train"],
                    extra=lambda row: {"augmented_from": sources[row["id"]]})
            if total.called:
                # Labeling time in the one ledger: an API's money is in the calls; a local model's is compute.
                members = recipe.teacher.members if ensemble else [recipe.teacher]
                local = all(m.kind == "local" for m in members)
                usd = total.seconds / 3600 * recipe.eval.compute_usd_per_hour if local else 0.0
                store.log_compute("label", total.seconds, usd, rows=total.called, attempts=total.attempts)
            write_failures(recipe, failed_rows, total.examples)
            drawn = shots[len(recipe.task.examples):]
            write_jsonl_atomic(sig / SHOTS_FILE, [e.model_dump() for e in drawn])
            for writer in writers.values():
                writer.commit()
    except ProtegeError:
        _remove_signals(out)
        raise
    recipe.save(sig / "recipe.yaml")
    return total


def failed_rows_of(split: str, examples: list[Any], signals: list[Any], keys: list[str],
                   fails: dict[str, tuple[str, str | None]]) -> list[dict[str, Any]]:
    """The ``signals/failed.jsonl`` rows of the examples the teacher failed on (``fails``: the store's reasons)."""
    return [
        {"id": ex.id, "split": split, "text": ex.text, "reason": fails.get(k, ("not answered", None))[0],
         "raw": fails.get(k, ("", None))[1], "call_key": k}
        for ex, s, k in zip(examples, signals, keys)
        if s is None
    ]


def write_failures(recipe: Recipe, failed_rows: list[dict[str, Any]], n: int) -> None:
    """Write ``signals/failed.jsonl``; more than ``teacher.max_failed_fraction`` of ``n`` rows failed stops the
    pipeline (the signal files are removed: no later stage trains on a set with holes)."""
    out = recipe.output_dir
    write_jsonl_atomic(out / "signals" / "failed.jsonl", failed_rows)
    if failed_rows and len(failed_rows) > recipe.teacher.max_failed_fraction * n:
        _remove_signals(out)
        first = failed_rows[0]
        raise ProtegeError(
            f"the teacher failed on {len(failed_rows)} of {n} rows, more than teacher.max_failed_fraction "
            f"({recipe.teacher.max_failed_fraction:g}); first: {first['id']}: {first['reason']}. Every row and "
            f"reason is in {out / 'signals' / 'failed.jsonl'}; rerun `protege label` to retry only those rows"
        )


def check_failures(recipe: Recipe, results: dict[str, tuple[list, list, list[str], dict]], n: int) -> None:
    """:func:`write_failures` for ``results`` (split -> (examples, signals, keys, store failures))."""
    write_failures(recipe, [row for split, (examples, signals, keys, fails) in results.items()
                            for row in failed_rows_of(split, examples, signals, keys, fails)], n)


def _ok_rows(
    recipe: Recipe, shots: list[FewShotExample], examples: list[Example], signals: list, keys: list[str],
    requests: list[Request] | None = None,
) -> list[dict[str, Any]]:
    """The signal rows of the examples the teacher answered, in order (``requests``: theirs, if rendered)."""
    requests = requests_for(recipe, examples, shots) if requests is None else requests
    ok = [(ex, s, k, r) for ex, s, k, r in zip(examples, signals, keys, requests) if s is not None]
    return _signal_rows(*map(list, zip(*ok))) if ok else []


def _remove_signals(out: Path) -> None:
    remove_signals(out / "signals")


def read_signals(recipe: Recipe, split: str) -> list[dict[str, Any]]:
    return list(iter_signals(recipe.output_dir / "signals" / f"{split}.jsonl"))


@dataclass
class Estimate:
    """What labeling would cost, computed without calling anything."""

    teacher: str
    method: str
    rows: int
    cached: int
    to_call: int
    calls: int
    input_tokens: int
    output_tokens: int
    usd: float
    worst_usd: float
    spent_usd: float
    budget_usd: float | None
    basis: str
    key_env: str | None = None
    key_set: bool = True
    notes: list[str] = field(default_factory=list)


def estimate(recipe: Recipe) -> Estimate:
    """A dry run: rows to call, tokens and cost (expected and worst case) against the budget; no call is made.

    Expected tokens come from earlier calls of the same teacher in the store when there are any, else from
    about four characters per token and a short answer. The worst case is what the engine reserves.
    Augmented texts (``data.augment``) are counted like any row; a paraphrase not yet in the store is counted
    as its generation call plus a label call the size of its source text's.
    """
    check_paraphrase(recipe)
    if recipe.teacher.kind == "ensemble":
        return _estimate_ensemble(recipe)
    train, held = load_splits(recipe.data, task_labels(recipe), recipe.training.seed)
    shots, train = split_shots(recipe, train)
    augmented = _augmented(recipe, train, held)
    teacher = make_teacher(recipe.teacher)
    examples = train + held + augmented
    requests = requests_for(recipe, examples, shots)
    pending: list[Request] = []  # label calls of paraphrases not written yet: their text is unknown
    notes = []
    with Store(recipe.store_path) as store:
        if recipe.data.augment.paraphrase:
            asks = [paraphrase_request(e.text) for e in train]
            ask_keys = [call_key(teacher.identity, r.to_json()) for r in asks]
            written = store.get_signals(ask_keys)
            signals = [written.get(k) for k in ask_keys]
            paras = _paraphrased(train, signals, {e.text.strip() for e in examples})
            pending = requests_for(recipe, [e for e, s in zip(train, signals) if s is None], shots)
            requests += asks + requests_for(recipe, paras, shots)
            notes.append(
                f"{len(asks)} paraphrase requests (data.augment.paraphrase), then a label call for each new paraphrase; "
                f"{len(pending)} not yet written are counted at their source text's length"
            )
        if recipe.teacher.select != "all":
            t = recipe.teacher
            limits = [f"select_max_rows {t.select_max_rows}" if t.select_max_rows else "",
                      f"budget_usd {t.budget_usd:g}" if t.budget_usd is not None else "",
                      f"select_target {t.select_target:g}" if t.select_target else ""]
            notes.append(f"teacher.select: {t.select} labels the {len(held)} evaluation texts and training texts in "
                         f"rounds until {' / '.join(x for x in limits if x)}; counted here as if it labelled all "
                         f"{len(train)} (the most it can)")
        est = estimate_requests(recipe, teacher, requests, store, pending, notes)
    if augmented:
        est.notes.insert(0, f"{len(augmented)} of the rows are augmented texts (data.augment.per_text: "
                            f"{recipe.data.augment.per_text}, made from {len(train)} training texts)")
    return est


def estimate_requests(
    recipe: Recipe, teacher: Teacher, requests: list[Request], store: Store | None, pending: Sequence[Request] = (),
    notes: Sequence[str] = (),
) -> Estimate:
    """:func:`estimate` for requests already rendered (``pending``: label calls counted though their text is not
    known yet). ``store`` None is a store that does not exist yet: nothing answered, nothing spent."""
    from ..store import CallMeans
    from ..teachers.base import expected_tokens

    keys = [call_key(teacher.identity, r.to_json()) for r in requests]
    done = store.get_signals(keys) if store is not None else {}
    spent = store.spent() if store is not None else 0.0
    seen = store.answered_means(recipe.teacher.model) if store is not None else CallMeans(0, None, None, None, None)
    pending = list(pending)
    todo = list({k: r for k, r in zip(keys, requests) if k not in done}.values()) + pending
    est = Estimate(
        teacher=recipe.teacher.model,
        method=teacher.method,
        rows=len(requests) + len(pending),
        cached=sum(k in done for k in keys),
        to_call=len(todo),
        calls=0,
        input_tokens=0,
        output_tokens=0,
        usd=0.0,
        worst_usd=0.0,
        spent_usd=spent,
        budget_usd=recipe.teacher.budget_usd,
        basis="local model: no per-token cost",
        notes=list(notes),
    )
    if teacher.kind == "local":
        est.calls = len(todo)
        return est
    cfg = recipe.teacher
    factor = 1.0
    if cfg.batch_api:
        from .batch import batch_adapter

        factor = batch_adapter(teacher).discount
        est.notes.append(f"batch API: {factor:.0%} of the price, results within 24 hours")
    price = teacher.price
    n_seen, in_seen, out_seen = seen.calls, seen.input_tokens, seen.output_tokens
    for r in todo:
        worst_in, worst_out, calls = teacher.worst_case(r)
        est.calls += calls
        est.worst_usd += calls * price.cost(worst_in, worst_out, factor=factor)
        if n_seen:
            est.input_tokens += round(in_seen)
            est.output_tokens += round(out_seen)
        else:
            thinking = cfg.thinking_tokens or 0  # billed as output
            typical = 200 if cfg.rationale or r.generate is not None else 5  # a guess until calls are recorded
            per_call_out = min(worst_out, typical + thinking)
            est.input_tokens += calls * expected_tokens(r)
            est.output_tokens += calls * per_call_out
    est.usd = price.cost(est.input_tokens, est.output_tokens, factor=factor)
    est.basis = (
        f"the mean usage of {n_seen} earlier calls in the store"
        if n_seen
        else "about 4 characters per token and a short answer (no earlier calls to go by)"
    )
    est.key_env = teacher.key_env
    est.key_set = teacher.key_env is None or bool(os.environ.get(teacher.key_env, "").strip())
    return est


def _estimate_ensemble(recipe: Recipe) -> Estimate:
    """The sum of each member's estimate (every member labels every row under its own cache identity)."""
    from .ensemble import member_recipe

    members = recipe.teacher.members
    parts = [estimate(member_recipe(recipe, m)) for m in members]
    unset = [p for p in parts if not p.key_set]
    keyed = unset or [p for p in parts if p.key_env]
    return Estimate(
        teacher=recipe.teacher.model,
        method="ensemble",
        rows=sum(p.rows for p in parts),
        cached=sum(p.cached for p in parts),
        to_call=sum(p.to_call for p in parts),
        calls=sum(p.calls for p in parts),
        input_tokens=sum(p.input_tokens for p in parts),
        output_tokens=sum(p.output_tokens for p in parts),
        usd=sum(p.usd for p in parts),
        worst_usd=sum(p.worst_usd for p in parts),
        spent_usd=parts[0].spent_usd,  # one store for every member
        budget_usd=recipe.teacher.budget_usd,
        basis="; ".join(f"{m.model}: {p.basis}" for m, p in zip(members, parts)),
        key_env=keyed[0].key_env if keyed else None,
        key_set=not unset,
        notes=[f"{len(members)} members: rows are counted once per member"]
        + [f"{m.model}: {note}" for m, p in zip(members, parts) for note in p.notes],
    )
