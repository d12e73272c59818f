"""Render the evaluation as report.json, report.md and plots a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_json_atomic, write_text_atomic
from ..recipe import Recipe

__all__ = ["cascade_lines", "cascade_plot", "cost_definition", "md_cell", "write_report"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _size(n: int | None) -> str:
    """Bytes in the units a person reads: 96 KB, 1.2 MB, 90.9 MB."""
    if not n:
        return "n/a"
    return f"{n / 1e3:.0f} KB" if n < 1e6 else f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _params(n: int | None) -> str:
    if not n:
        return "n/a"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)


def _distilled(report: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(key, figures) of the distilled student, else of the hard-label one; None when neither was evaluated."""
    for key in ("student", "student-hard"):
        if key in report["models"]:
            return key, report["models"][key]
    return None


def _headline(report: dict[str, Any]) -> str:
    """The report's first line: how good the teacher is, what the distilled student keeps of it, at what share
    of its latency and parameters."""
    t = report["models"]["teacher"]
    chance = report["task"]["chance_accuracy"]
    parts = [f"teacher {_pct(t['accuracy'])} right vs {_pct(chance)} by chance" if t["accuracy"] is not None
             else "no gold labels held out"]
    kd = _distilled(report)
    if kd:
        key, s = kd
        who = "distilled student" if key == "student" else "hard-label student"
        if s["accuracy"] is not None:
            parts.append(f"{who} {_pct(s['accuracy'])}, keeping {_pct(s['quality_kept'])} of it")
        else:
            parts.append(f"{who} agrees with the teacher on {_pct(s['agreement_with_teacher'])}")
        tail = []
        if t.get("latency_ms_p50") and s.get("latency_ms_p50"):
            tail.append(f"at {_pct(s['latency_ms_p50'] / t['latency_ms_p50'])} of the teacher's p50 latency")
        if t.get("parameters") and s.get("parameters"):
            tail.append(f"with {t['parameters'] / s['parameters']:.1f}x fewer parameters")
        if tail:
            parts[-1] += ", " + " ".join(tail)
    return "# protege report: " + "; ".join(parts)


def _floor_verdict(report: dict[str, Any]) -> str:
    """Whether the linear floor matches the distilled student: on gold accuracy when there are gold labels,
    else on agreement with the teacher. "Matches" means within one standard error of the student's figure,
    sqrt(a (1 - a) / n) on the n texts it is measured on; "beats", ahead by more than that."""
    f, kd = report["models"].get("floor"), _distilled(report)
    if not f or not kd:
        return ""
    s = kd[1]
    if s["accuracy"] is not None and f["accuracy"] is not None:
        what, a_s, a_f, n = "accuracy", s["accuracy"], f["accuracy"], report["eval_with_gold"]
    else:
        what, a_s, a_f, n = "agreement with the teacher", s["agreement_with_teacher"], f["agreement_with_teacher"], \
            report["eval_examples"]
    se = (a_s * (1 - a_s) / n) ** 0.5 if n else 0.0
    who = s["name"]
    linear = f"a {_size(f.get('size_bytes'))} linear model (TF-IDF + logistic regression on the same teacher labels)"
    figures = f"{what} {_pct(a_f)} against the {who}'s {_pct(a_s)} (one standard error: {100 * se:.1f} points)"
    if a_f > a_s + se:
        return (f"**The floor beats the student:** {linear} does better, {figures}. The {who} does not earn its "
                "size here: use the linear model, or a stronger student or teacher.")
    if a_f >= a_s - se:
        return (f"**The floor matches the student:** {linear} does as well, {figures}. A transformer student "
                "adds little over it on this task.")
    return f"The {who} beats the floor, {linear}: {figures}."




def _verdict(report: dict[str, Any]) -> str:
    t = report["models"]["teacher"]
    chance = report["task"]["chance_accuracy"]
    if t["accuracy"] is None:
        return "The held-out split has no gold labels, so only agreement with the teacher is measured."
    acc = t["accuracy"]
    level = (
        "no better than guessing" if acc < chance * 1.25 else "weak" if acc < 0.6 else "fair" if acc < 0.8 else "good"
    )
    s = (
        f"**How good is the teacher?** {t['name']} is right on {_pct(acc)} of the "
        f"{report['eval_with_gold']} held-out texts with gold labels; guessing would get {_pct(chance)}. "
        f"That is {level}"
    )
    if level in ("no better than guessing", "weak"):
        s += ": a student can only learn what the teacher knows, so use a stronger teacher for real work"
    mass = t.get("mean_label_mass")
    if mass is not None and mass < 0.5:
        s += (
            f". On average it put only {_pct(mass)} of its probability on answering with a label at all, "
            "the rest on other replies"
        )
    return s + "."


def cost_definition(usd_per_hour: float) -> str:
    """The report's definition of its $ / 1k column (:func:`protege.evaluation.measure.compute_cost`)."""
    return (
        "Cost per 1,000 requests ($ / 1k), for a local model: the machine time 1,000 requests take at the rate "
        "the model gets through them as it is served (batched throughput for a classifier; one answer at a time "
        f"for a language model, so 1,000 x its mean latency), at ${usd_per_hour:g}/hour "
        "(eval.compute_usd_per_hour). `protege cost` charges each served request its compute time the same way. "
        "For an API teacher: 1,000 x its mean recorded spend per request."
    )


def _table(report: dict[str, Any]) -> str:
    rows = [
        ("| model | params | size | accuracy (gold) | agreement w/ teacher | quality kept | ECE | p50 ms | p95 ms "
        "| per s | $ / 1k |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, m in report["models"].items():
        label = m["name"] if key != "teacher" else f"teacher: {m['name']}"
        ece = "n/a" if m["ece"] is None else f"{m['ece']:.3f}"
        rows.append(
            f"| {label} | {_params(m.get('parameters'))} | {_size(m.get('size_bytes'))} | {_pct(m['accuracy'])} | "
            f"{_pct(m.get('agreement_with_teacher', 1.0))} | {_pct(m.get('quality_kept', 1.0))} | {ece} | "
            f"{_ms(m['latency_ms_p50'])} | {_ms(m['latency_ms_p95'])} | {m['throughput_per_s']:.1f} | "
            f"{m['usd_per_1k']:.5f} |"
        )
    return "\n".join(rows)


def _per_label_table(report: dict[str, Any]) -> list[str]:
    """Recall / precision of every model on every gold label, one row per label."""
    have = [(k, m) for k, m in report["models"].items() if m.get("per_label")]
    if not have:
        return []
    names = ["teacher" if k == "teacher" else m["name"] for k, m in have]
    lines = ["", "## Per label", "",
             ("Recall (the share of a label's texts given that label: accuracy on it) / precision (the share of "
             "texts given a label that truly have it), on the held-out texts with gold labels."), "",
             f"| gold label | support | {' | '.join(names)} |", "| --- | ---: |" + " ---: |" * len(have)]
    for label in report["task"]["labels"]:
        cells = [f"{_pct(m['per_label'][label]['recall'])} / {_pct(m['per_label'][label]['precision'])}"
                 for _, m in have]
        lines.append(f"| {label} | {have[0][1]['per_label'][label]['support']} | {' | '.join(cells)} |")
    return lines


def md_cell(text: str, limit: int = 120) -> str:
    """``text`` as one Markdown table cell: on one line, cut to ``limit`` characters, with the characters
    Markdown would read as table syntax, emphasis, links or HTML escaped."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def _disagreement_table(report: dict[str, Any]) -> list[str]:
    d = report.get("disagreements")
    if not d:
        return []
    name = report["models"][d["student"]]["name"]
    rows = d["rows"]
    lines = ["", "## Where the student and the teacher disagree", ""]
    if not rows:
        return lines + [f"The {name} gives the teacher's top label on every held-out text."]
    lines += [(f"The {len(rows)} held-out texts where the {name}'s top label differs from the teacher's, the most "
              "divergent first (KL(teacher || student) of their distributions). Confidence is the probability each "
              "gave its answer."), "",
              "| text | gold | teacher (confidence) | student (confidence) | KL |", "| --- | --- | --- | --- | ---: |"]
    for r in rows:
        lines.append(f"| {md_cell(r['text'])} | {md_cell(r['gold'] or 'n/a')} | {md_cell(r['teacher'])} "
                     f"({r['teacher_confidence']:.2f}) | {md_cell(r['student'])} ({r['student_confidence']:.2f}) | "
                     f"{r['kl']:.3g} |")
    return lines


def _selection_lines(report: dict[str, Any]) -> list[str]:
    """What the students' training chose without gold labels: the checkpoint, and the swept alpha and tau."""
    metric_name = {"kl": "KL to the teacher (lower is better)", "agreement": "agreement with the teacher"}
    lines: list[str] = []
    students = [m for k, m in report["models"].items() if k not in ("teacher", "floor")]
    picked = [m for m in students if m.get("selection")]
    if picked:
        lines += ["", "## Model selection", ""]
        for m in picked:
            sel = m["selection"]
            how = (f"stopped early after {sel['steps_trained']} steps" if sel["stopped_early"]
                   else f"trained all {sel['steps_trained']} steps")
            lines.append(f"- {m['name']}: kept the checkpoint of step **{sel['best_step']}** of "
                         f"{sel['steps_trained']} by {metric_name.get(sel['metric'], sel['metric'])} on "
                         f"{sel['rows']} teacher-labelled training texts held out of training (no gold label); "
                         f"{how}.")
    for m in students:
        sw = m.get("sweep")
        if not sw:
            continue
        ch = sw["chosen"]
        lines += ["", f"## Sweep ({m['name']})", "",
                  (f"alpha and temperature tried on the held-out teacher-labelled slice, chosen by "
                  f"{metric_name.get(sw['metric'], sw['metric'])}."), "",
                  "| alpha | temperature | KL | agreement | best step | chosen |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for tr in sw["trials"]:
            mark = "yes" if (tr["alpha"], tr["temperature"]) == (ch["alpha"], ch["temperature"]) else ""
            lines.append(f"| {tr['alpha']:g} | {tr['temperature']:g} | {tr['kl']:.4g} | {_pct(tr['agreement'])} | "
                         f"{tr.get('best_step', 'n/a')} | {mark} |")
    return lines


def _plots(report: dict[str, Any], preds: dict[str, np.ndarray], gold: np.ndarray, has_gold: np.ndarray, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    names = {k: ("teacher" if k == "teacher" else m["name"]) for k, m in report["models"].items()}
    files = []
    (out / "plots").mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (k, m) in enumerate(report["models"].items()):
        if m["accuracy"] is not None:
            ax.scatter(m["usd_per_1k"], m["accuracy"], s=60)
            # stagger the names: students often sit on top of each other
            ax.annotate(names[k], (m["usd_per_1k"], m["accuracy"]), textcoords="offset points", xytext=(6, 4 + 12 * i))
    ax.set_ylim(0.0, 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("cost per 1,000 requests (USD, log scale)")
    ax.set_ylabel("accuracy on held-out gold labels")
    ax.axhline(report["task"]["chance_accuracy"], ls=":", c="grey", label="chance")
    ax.legend(loc="upper right")
    ax.set_title("Accuracy against cost")
    fig.tight_layout()
    fig.savefig(out / "plots" / "accuracy_vs_cost.png", dpi=110)
    plt.close(fig)
    files.append("plots/accuracy_vs_cost.png")

    if has_gold.any():
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfectly calibrated")
        edges = np.linspace(0, 1, 11)
        for k, p in preds.items():
            p = p[has_gold]
            conf, correct = p.max(1), p.argmax(1) == gold[has_gold]
            idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, 9)
            xs = [conf[idx == b].mean() for b in range(10) if (idx == b).any()]
            ys = [correct[idx == b].mean() for b in range(10) if (idx == b).any()]
            ax.plot(xs, ys, marker="o", label=names[k])
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title("Reliability diagram")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "plots" / "reliability.png", dpi=110)
        plt.close(fig)
        files.append("plots/reliability.png")
        kd = _distilled(report)
        if kd:
            files.append(_confusion_plot(report, preds, gold, has_gold, kd[0], out, plt))

    if report.get("cascade"):
        files.append(_cascade_plot(report, out, plt))
    if report.get("active"):
        files.append(_active_plot(report, out, plt))
    return files


def _confusion_plot(
    report: dict[str, Any], preds: dict[str, np.ndarray], gold: np.ndarray, has_gold: np.ndarray, student: str,
    out: Path, plt: Any,
) -> str:
    """Confusion matrices against the gold labels, the student's beside the teacher's: rows are gold labels,
    columns answers, each row normalised to 1 (the diagonal is each label's recall), counts written in."""
    labels = report["task"]["labels"]
    c = len(labels)
    g = gold[has_gold]
    side = min(4 + 0.45 * c, 14)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), constrained_layout=True)
    for ax, key in zip(axes, (student, "teacher")):
        p = preds[key][has_gold].argmax(1)
        counts = np.zeros((c, c), int)
        np.add.at(counts, (g, p), 1)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        if c <= 20:  # beyond that the numbers would not fit in their cells
            for i in range(c):
                for j in range(c):
                    if counts[i, j]:
                        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.6 else "black")
        ticks = range(c) if c <= 40 else []
        ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=8)
        ax.set_xlabel("answer")
        ax.set_ylabel("gold label")
        name = "teacher" if key == "teacher" else report["models"][key]["name"]
        ax.set_title(f"{name}: {_pct(float((p == g).mean()))} right")
    fig.colorbar(im, ax=axes, shrink=0.7, label="share of the gold label's texts")
    fig.savefig(out / "plots" / "confusion.png", dpi=110)
    plt.close(fig)
    return "plots/confusion.png"


def cascade_plot(report: dict[str, Any], out: Path) -> str:
    """plots/cascade.png alone (the generation report has no other plots)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    return _cascade_plot(report, out, plt)


def _metric_name(metric: str) -> str:
    return {"accuracy": "accuracy on held-out gold labels", "agreement_with_teacher": "agreement with the teacher",
            "exact_match": "exact match with the references", "similarity": "similarity to the references"}.get(
        metric, metric.replace("_", " "))


def _cascade_plot(report: dict[str, Any], out: Path, plt: Any) -> str:
    """Accuracy against cost per 1,000 requests along the cascade's thresholds, the chosen one marked."""
    c = report["cascade"]
    pts = c["points"]
    metric = _metric_name(c["metric"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([p["usd_per_1k"] for p in pts], [p["accuracy"] for p in pts], marker=".", lw=1, label="cascade, by threshold")
    ax.scatter([c["teacher_usd_per_1k"]], [c["teacher_accuracy"]], marker="s", s=50, c="black", label="teacher alone")
    ax.axhline(c["target_accuracy"], ls=":", c="grey", label=f"{100 * c['keep_fraction']:g}% of the teacher")
    if c["chosen"] is not None:
        ch = c["chosen"]
        ax.scatter([ch["usd_per_1k"]], [ch["accuracy"]], marker="*", s=220, c="tab:red", zorder=3,
                   label=f"threshold {ch['threshold']:g}: {100 * ch['teacher_fraction']:.0f}% to the teacher")
    ax.set_xlabel("cost per 1,000 requests (USD)")
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlim(left=0.0)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # tiny costs: 2e-5, not 0.00002 overlapping
    ax.set_title("Cascade: student when sure, teacher otherwise")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "cascade.png", dpi=110)
    plt.close(fig)
    return "plots/cascade.png"


_STOPPED = {"max_rows": "teacher.select_max_rows reached", "budget": "teacher.budget_usd reached",
            "target": "teacher.select_target reached", "pool": "every training text labelled"}


def _curve(a: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds that trained a student, with quality kept (accuracy on gold / the teacher's, else agreement)."""
    t_acc = a.get("teacher_eval_accuracy")
    return [{**r, "kept": r["eval_accuracy"] / t_acc if t_acc and r.get("eval_accuracy") is not None else None}
            for r in a["rounds"] if r.get("eval_agreement") is not None]


def _active_plot(report: dict[str, Any], out: Path, plt: Any) -> str:
    """The learning curve of teacher.select: quality kept (or agreement) against teacher calls and dollars."""
    a = report["active"]
    pts = _curve(a)
    kept = all(p["kept"] is not None for p in pts)
    ys = [p["kept"] if kept else p["eval_agreement"] for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, key, xlabel in ((axes[0], "teacher_calls", "teacher calls (training texts labelled)"),
                            (axes[1], "usd", "teacher cost (USD, from the store)")):
        ax.plot([p[key] for p in pts], ys, marker="o", label=f"select: {a['select']}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("quality kept (student / teacher accuracy)" if kept else "agreement with the teacher")
    axes[0].legend(loc="lower right")
    fig.suptitle("Learning curve: what each round of teacher labels bought")
    fig.tight_layout()
    fig.savefig(out / "plots" / "learning_curve.png", dpi=110)
    plt.close(fig)
    return "plots/learning_curve.png"


def active_lines(a: dict[str, Any]) -> list[str]:
    """The report's selective-labeling section: a row per round."""
    how = (f"those the last round's student was least sure of ({a['metric']}, spread over its hidden states)"
           if a["select"] == "uncertainty" else "drawn at random")
    lines = ["", f"## Selective labeling (teacher.select: {a['select']})", "",
             (f"A random seed slice of {a['seed_rows']} training texts, then rounds of {a['round_rows']} texts {how}; a "
              f"student trained after each; stopped: {_STOPPED.get(a['stopped'], a['stopped'])}. "
              f"{a['rounds'][-1]['rows'] if a['rounds'] else 0} of {a['pool_rows']} training texts labelled"
              + (f", plus {a['check_rows']} held out to check select_target on" if a["check_rows"] else "")
              + f"; the {a['eval_rows']} evaluation texts are labelled in full. Each round's student is scored on the "
              "evaluation split (the final student above is trained again on all the labelled texts)."
              + (" With teacher.select_student_labels each round's student, and the final one, also trained on the "
                 "texts not sent to the teacher, labelled by a first student trained on the teacher's answers "
                 f"({a['rounds'][-1].get('student_labels') or 0} such texts after the last round; no teacher calls)."
                 if a.get("student_labels") else "")), "",
             "| round | texts labelled | teacher calls | cost (USD) | agreement with teacher | accuracy | quality kept "
             "| check agreement |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in _curve(a):
        lines.append(f"| {p['round']} | {p['rows']} | {p['teacher_calls']} | {p['usd']:.6f} | "
                     f"{_pct(p['eval_agreement'])} | {_pct(p['eval_accuracy'])} | {_pct(p['kept'])} | "
                     f"{_pct(p['check_agreement'])} |")
    if "plots/learning_curve.png" in a.get("plots", ()):
        lines += ["", "![learning curve](plots/learning_curve.png)"]
    return lines


def cascade_lines(c: dict[str, Any]) -> list[str]:
    """The report's cascade section: the chosen threshold and a few others for comparison."""
    what = "accuracy" if c["metric"] == "accuracy" else _metric_name(c["metric"])
    lines = ["", "## Cascade", ""]
    ch = c["chosen"]
    if ch is None:
        lines.append(f"No threshold keeps {100 * c['keep_fraction']:g}% of the teacher's {what}.")
    else:
        lines.append(
            f"Student when its {c.get('confidence', 'top label probability')} is at least the threshold, teacher "
            f"otherwise: threshold "
            f"**{ch['threshold']:g}** keeps at least {100 * c['keep_fraction']:g}% of the teacher's {what} "
            f"({_pct(ch['accuracy'])} against {_pct(c['teacher_accuracy'])}) at the lowest cost, "
            f"${ch['usd_per_1k']:.5f} per 1,000 requests, sending {_pct(ch['teacher_fraction'])} of them to the "
            f"teacher (teacher alone: ${c['teacher_usd_per_1k']:.5f}; student alone {_pct(c['student_accuracy'])} "
            f"at ${c['student_usd_per_1k']:.5f}). Serve it with `protege serve STUDENT_DIR --cascade-threshold "
            f"{ch['threshold']:g}`."
        )
    lines += ["", f"| threshold | {what} | to the teacher | $ / 1k |", "| ---: | ---: | ---: | ---: |"]
    shown = {0.0, 0.5, 0.8, 0.9, 0.95, 0.99, c["points"][-1]["threshold"]} | ({ch["threshold"]} if ch else set())
    for p in c["points"]:
        if p["threshold"] in shown:
            mark = " (chosen)" if ch and p["threshold"] == ch["threshold"] else ""
            lines.append(f"| {p['threshold']:g}{mark} | {_pct(p['accuracy'])} | {_pct(p['teacher_fraction'])} | "
                         f"{p['usd_per_1k']:.5f} |")
    lines.append("")
    lines.append("Cost per 1,000 requests: the student's compute for every request plus the teacher's cost for "
                 f"the share sent to it; the threshold grid is 0 to 1 by 0.01, and {c['points'][-1]['threshold']:g} "
                 "(no probability reaches it) sends everything to the teacher.")
    return lines


def write_report(
    report: dict[str, Any], preds: dict[str, np.ndarray], gold: np.ndarray, has_gold: np.ndarray, recipe: Recipe, out: Path
) -> None:
    report["plots"] = _plots(report, preds, gold, has_gold, out)
    t = report["models"]["teacher"]
    floor = _floor_verdict(report)
    lines = [
        _headline(report),
        "",
        _verdict(report),
        "",
        *([floor, ""] if floor else []),
        (f"Held-out split: {report['eval_examples']} texts ({report['eval_with_gold']} with gold labels), "
        f"labels: {', '.join(report['task']['labels'])}. Teacher signal: {', '.join(t['signal_method'])}."),
        "",
        _table(report),
        "",
        cost_definition(recipe.eval.compute_usd_per_hour),
        "",
    ]
    kd = report["models"].get("student")
    if kd:
        lines.append(
            f"The distilled student has {t['parameters'] / kd['parameters']:.1f}x fewer parameters than the teacher "
            f"and answers {t['latency_ms_p50'] / kd['latency_ms_p50']:.1f}x faster one at a time "
            f"({kd['throughput_per_s'] / t['throughput_per_s']:.1f}x the batched throughput)."
            if t.get("parameters")
            else ""
        )
    hard = report["models"].get("student-hard")
    if kd and hard and kd["accuracy"] is not None:
        diff = kd["accuracy"] - hard["accuracy"]
        lines.append(
            f"Soft labels vs hard labels, same student size: {_pct(kd['accuracy'])} against {_pct(hard['accuracy'])} "
            f"({100 * diff:+.1f} points)."
        )
    if t.get("members"):
        lines.append(
            f"The teacher is an ensemble of {len(t['members'])} members ("
            + ", ".join(f"{m['name']}: p50 {m['latency_ms_p50']:.1f} ms" for m in t["members"])
            + "): its latency per text is the sum of theirs (they answer one after another), its throughput "
            "1 / the sum of 1 / theirs, its cost the sum of theirs"
            + ("." if t.get("parameters") else "; its parameters are not counted, as an API member's are unknown.")
        )
    led = report.get("ledger")
    if led:
        t_led = led["teacher"]
        train_s = sum(v["seconds"] for k, v in led["compute"].items() if k.startswith("train"))
        lines += [
            "",
            (f"Ledger so far: {int(t_led['calls'])} teacher calls ({int(t_led['failed'])} failed), "
            f"{t_led['seconds']:.0f}s of teacher compute, ${t_led['cost_usd']:.4f} paid to APIs; "
            f"{train_s:.0f}s of training."),
        ]
    lines += [
        "",
        ("Latency is one example at a time on this machine; throughput is batched. "
        "An API teacher's latency, throughput and cost are what labeling recorded (wall time per call, retries "
        "included; rows per second achieved; dollars actually spent), never a new paid call. "
        "ECE is the expected calibration error over "
        f"{recipe.eval.calibration_bins} confidence bins (lower is better)."),
        "",
        *[f"![{Path(f).stem}]({f})" for f in report["plots"] if f not in ("plots/cascade.png", "plots/learning_curve.png")],
        "",
    ]
    lines += _per_label_table(report) + _disagreement_table(report) + _selection_lines(report)
    if report.get("active"):
        lines += active_lines({**report["active"], "plots": report["plots"]})
    if report.get("cascade"):
        lines += cascade_lines(report["cascade"])
        if "plots/cascade.png" in report["plots"]:
            lines += ["", "![cascade](plots/cascade.png)", ""]
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", "\n".join(lines))
    recipe.save(out / "recipe.yaml")
