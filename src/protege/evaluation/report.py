"""Render the evaluation as report.json, report.md and plots a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_json_atomic, write_text_atomic
from ..recipe import Recipe

__all__ = ["cascade_lines", "cascade_plot", "cost_definition", "write_report"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


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
        "| model | params | accuracy (gold) | agreement w/ teacher | quality kept | ECE | p50 ms | p95 ms | per s | $ / 1k |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, m in report["models"].items():
        label = m["name"] if key != "teacher" else f"teacher: {m['name']}"
        params = f"{m['parameters'] / 1e6:.1f}M" if m.get("parameters") else "n/a"
        ece = "n/a" if m["ece"] is None else f"{m['ece']:.3f}"
        rows.append(
            f"| {label} | {params} | {_pct(m['accuracy'])} | {_pct(m.get('agreement_with_teacher', 1.0))} | "
            f"{_pct(m.get('quality_kept', 1.0))} | {ece} | "
            f"{m['latency_ms_p50']:.1f} | {m['latency_ms_p95']:.1f} | {m['throughput_per_s']:.1f} | "
            f"{m['usd_per_1k']:.5f} |"
        )
    return "\n".join(rows)


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

    if report.get("cascade"):
        files.append(_cascade_plot(report, out, plt))
    return files


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
    lines = [
        "# protege report",
        "",
        _verdict(report),
        "",
        f"Held-out split: {report['eval_examples']} texts ({report['eval_with_gold']} with gold labels), "
        f"labels: {', '.join(report['task']['labels'])}. Teacher signal: {', '.join(t['signal_method'])}.",
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
    led = report.get("ledger")
    if led:
        t_led = led["teacher"]
        train_s = sum(v["seconds"] for k, v in led["compute"].items() if k.startswith("train"))
        lines += [
            "",
            f"Ledger so far: {int(t_led['calls'])} teacher calls ({int(t_led['failed'])} failed), "
            f"{t_led['seconds']:.0f}s of teacher compute, ${t_led['cost_usd']:.4f} paid to APIs; "
            f"{train_s:.0f}s of training.",
        ]
    lines += [
        "",
        "Latency is one example at a time on this machine; throughput is batched. "
        "An API teacher's latency, throughput and cost are what labeling recorded (wall time per call, retries "
        "included; rows per second achieved; dollars actually spent), never a new paid call. "
        "ECE is the expected calibration error over "
        f"{recipe.eval.calibration_bins} confidence bins (lower is better).",
        "",
        *[f"![{Path(f).stem}]({f})" for f in report["plots"] if f != "plots/cascade.png"],
        "",
    ]
    if report.get("cascade"):
        lines += cascade_lines(report["cascade"])
        if "plots/cascade.png" in report["plots"]:
            lines += ["", "![cascade](plots/cascade.png)", ""]
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", "\n".join(lines))
    recipe.save(out / "recipe.yaml")
