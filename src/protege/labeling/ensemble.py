"""A teacher ensemble: several teachers label the same texts, and their label distributions are combined.

``teacher.model: ensemble:mean`` averages the members' distributions; ``ensemble:accuracy`` weighs each member
by its accuracy on the gold-labelled training rows (never on held-out rows). Every member is a teacher of its
own: it labels through the same path as a lone teacher (its own cache identity, the store, the budget cap, the
engine's limits), so adding a member to an ensemble re-uses every answer that member gave before, and a rerun
makes no call. The combined distribution is recorded as method ``ensemble``; the members, their weights and
their gold accuracies go to ``signals/ensemble.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .._io import content_hash, write_json_atomic
from ..errors import ProtegeError
from ..recipe import FewShotExample, Recipe, TeacherConfig
from ..signals import LabelDistribution, TeacherSignal
from ..store import Store
from .data import Example, load_splits

__all__ = ["ENSEMBLE_FILE", "label_ensemble", "member_recipe", "combine"]

ENSEMBLE_FILE = "ensemble.json"
LabelFn = Callable[..., tuple[list[TeacherSignal | None], list[str], Any]]


def member_recipe(recipe: Recipe, member: TeacherConfig) -> Recipe:
    """The recipe as one member sees it: its own teacher section, under the ensemble's budget cap when that is
    lower (the cap counts the whole store's spend, so every member shares it)."""
    cap = recipe.teacher.budget_usd
    if cap is not None and (member.budget_usd is None or member.budget_usd > cap):
        member = member.model_copy(update={"budget_usd": cap})
    return recipe.model_copy(update={"teacher": member})


def combine(dists: list[LabelDistribution], weights: list[float]) -> LabelDistribution:
    """The weighted mean of distributions over the same labels (a distribution again: weights are normalised)."""
    total = math.fsum(weights)
    if total <= 0:
        raise ProtegeError("every ensemble member has weight 0; no member was right on any gold-labelled row")
    labels = dists[0].labels
    if any(d.labels != labels for d in dists):
        raise ProtegeError(f"ensemble members answered over different label sets: {[d.labels for d in dists]}")
    probs = [math.fsum(w * d.probs[k] for d, w in zip(dists, weights)) / total for k in range(len(labels))]
    s = math.fsum(probs)
    mass = math.fsum(w * d.covered_mass for d, w in zip(dists, weights)) / total
    return LabelDistribution(labels, tuple(p / s for p in probs), method="ensemble", covered_mass=min(mass, 1.0))


def _label_members(
    recipe: Recipe, examples: list[Example], store: Store, label_one: LabelFn, quiet: bool, desc: str,
    shots: list[FewShotExample] | None,
) -> tuple[list[list[TeacherSignal | None]], list[list[str]], Any]:
    from ..teachers import make_teacher

    signals, keys, stats = [], [], None
    for m in recipe.teacher.members:
        sigs, ks, st = label_one(
            make_teacher(m), member_recipe(recipe, m), examples, store, quiet, desc=f"{desc} [{m.model}]", shots=shots
        )
        signals.append(sigs)
        keys.append(ks)
        if stats is None:
            stats = st
        else:
            stats.add(st)
    stats.examples = len(examples)  # each text once, whatever the member count
    return signals, keys, stats


def _weights(
    recipe: Recipe, store: Store, label_one: LabelFn, quiet: bool, shots: list[FewShotExample] | None
) -> tuple[list[float], list[float | None], int]:
    """(weights, each member's accuracy on the gold-labelled training rows, how many rows that is)."""
    n_members = len(recipe.teacher.members)
    weighting = recipe.teacher.model.split(":", 1)[1]
    train, _ = load_splits(recipe.data, recipe.task.label_names, recipe.training.seed)
    gold = [e for e in train if e.gold is not None]
    if shots:  # rows shown to the teacher as worked examples are not scored
        shown = {s.text for s in shots}
        gold = [e for e in gold if e.text not in shown]
    if not gold:
        if weighting == "accuracy":
            raise ProtegeError(
                "teacher ensemble:accuracy weighs members by their accuracy on gold-labelled training rows, and no "
                "training row has a gold label; set data.label_column, or use ensemble:mean"
            )
        return [1.0] * n_members, [None] * n_members, 0
    # the training pass labels these rows anyway (they are training rows): here they come from the store
    signals, _, _ = _label_members(recipe, gold, store, label_one, quiet, "ensemble weights", shots)
    accs: list[float | None] = []
    for sigs in signals:
        scored = [(s.distribution.top == e.gold) for s, e in zip(sigs, gold) if s is not None and s.distribution]
        accs.append(sum(scored) / len(scored) if scored else None)
    if weighting == "mean":
        return [1.0] * n_members, accs, len(gold)
    return [a or 0.0 for a in accs], accs, len(gold)


def label_ensemble(
    recipe: Recipe,
    examples: list[Example],
    store: Store,
    label_one: LabelFn,
    quiet: bool = False,
    desc: str = "label",
    shots: list[FewShotExample] | None = None,
) -> tuple[list[TeacherSignal | None], list[str], Any]:
    """Signals of the ensemble for ``examples`` in order, as :func:`protege.labeling.labeler.label_examples`
    returns them. A row fails when any member failed on it (the key returned is then that member's call, so
    the reason can be looked up); otherwise its key is a hash of the members' keys and the weights.
    ``label_one`` is :func:`protege.labeling.labeler.label_examples`, passed in so this module does not import
    the labeler that dispatches to it."""
    if recipe.task.kind != "classification":
        raise ProtegeError("an ensemble teacher combines label distributions; it labels classification tasks only")
    signals, keys, stats = _label_members(recipe, examples, store, label_one, quiet, desc, shots)
    weights, accs, n_gold = _weights(recipe, store, label_one, quiet, shots)
    out: list[TeacherSignal | None] = []
    out_keys: list[str] = []
    for i in range(len(examples)):
        row = [sigs[i] for sigs in signals]
        failed = next((m for m, s in enumerate(row) if s is None or s.distribution is None), None)
        if failed is not None:
            out.append(None)
            out_keys.append(keys[failed][i])
            continue
        dist = combine([s.distribution for s in row], weights)
        usage: dict[str, int] = {}
        for s in row:
            for k, v in s.usage.items():
                usage[k] = usage.get(k, 0) + v
        out.append(TeacherSignal(distribution=dist, usage=usage))
        out_keys.append(content_hash({"ensemble": [k[i] for k in keys], "weights": weights}))
    stats.failed = sum(s is None for s in out)
    record = {
        "teacher": recipe.teacher.model,
        "weighting": recipe.teacher.model.split(":", 1)[1],
        "gold_rows": n_gold,
        "members": [
            {"model": m.model, "weight": w / math.fsum(weights), "gold_accuracy": a}
            for m, w, a in zip(recipe.teacher.members, weights, accs)
        ],
    }
    write_json_atomic(recipe.output_dir / "signals" / ENSEMBLE_FILE, record)
    return out, out_keys, stats
