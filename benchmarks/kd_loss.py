"""LM distillation loss over the heads: materialized logits vs the chunked loss, forward + backward.

    .venv/bin/python benchmarks/kd_loss.py                 # CPU: plain vs chunked, appends nothing
    .venv/bin/python benchmarks/kd_loss.py --quick         # one small size, a smoke run
    python benchmarks/kd_loss.py --cuda [--anchor PATH]    # GPU only: the protocol of kd_loss_anchor.py

Loss in every mode: forward KL(teacher || student) at tau = 2 with tau^2 applied, soft targets only (alpha = 1),
mean over tokens, as in ../shared/bench/kd_loss_anchor.py. Inputs: student hidden (N, Hs) and head (V, Hs) with
gradients, teacher hidden (N, Ht) and head (V, Ht) without.

  plain    lm_distillation_loss(hs @ ws.T, ht @ wt.T, ...): all N x V logits materialized, autograd backward
  chunked  chunked_lm_distillation_loss(hs, ws, ht, wt, ...): chunk_size tokens at a time, gradients in forward
           (on CUDA the chunk's arithmetic between the matmuls goes through torch.compile, its default there;
           --cuda also times it eager, `protege_eager_1024`, the path the CPU takes)

CPU mode runs each (size, dtype, variant) in a fresh subprocess and reports the median of 2-3 timed runs
after one warm-up, and peak memory as the growth of the process's peak RSS (ru_maxrss) from the moment the
inputs exist, so it includes the gradients, the logits and everything autograd keeps. FLOPs per step:
student forward 2 N Hs V, teacher forward 2 N Ht V, student backward 4 N Hs V. The share is of this machine's
fp32 GEMM rate, measured at the start of the run (2048^3 matmul, same threads).

--cuda needs a CUDA GPU and cannot run on the CPU machine: it repeats kd_loss_anchor.py's protocol exactly
(N, Hs, Ht, V of its three rows, bf16, same seeded inputs, 2 warm-ups, median of 5 CUDA-event timings, peak
allocated beyond the inputs) for our chunked loss (and our plain loss), and with --anchor pointing at
kd_loss_anchor.py (and liger-kernel installed) also for its naive / torch_chunk / liger variants, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "bench" / "kd_loss_anchor.py"
TAU = 2.0
CPU_SIZES = [  # (N, Hs, Ht, V, dtype, timed reps): about 5 minutes in all on 2 cores; bf16 is slow on a CPU
    (1024, 256, 512, 32_768, "float32", 3),  # without bf16 units (about 40 s a step at N = 1024)
    (2048, 256, 512, 32_768, "float32", 2),
    (512, 256, 512, 151_936, "float32", 2),
    (256, 256, 512, 32_768, "bfloat16", 2),
]
CUDA_SIZES = [(8192, 896, 3584, 151_936), (32768, 896, 3584, 151_936), (16384, 2048, 4096, 128_256)]


def flops(n: int, hs: int, ht: int, v: int) -> int:
    return 2 * n * hs * v + 2 * n * ht * v + 4 * n * hs * v


def make_loss(variant: str, chunk_size: int):
    """(hs, ws, ht, wt) -> scalar mean loss, for the protocol's forward KL at TAU with tau^2, alpha = 1."""
    from protege.training.losses import chunked_lm_distillation_loss, lm_distillation_loss

    def plain(hs, ws, ht, wt):
        y = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)  # unused at alpha = 1 but required
        with torch.no_grad():
            zt = ht @ wt.T  # (N, V) teacher logits: no graph
        total, count, _ = lm_distillation_loss(hs @ ws.T, zt, y, alpha=1.0, temperature=TAU)
        return total / count

    def chunked(hs, ws, ht, wt, compile=None):
        y = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        total, count, _ = chunked_lm_distillation_loss(
            hs, ws, ht, wt, y, alpha=1.0, temperature=TAU, chunk_size=chunk_size, compile=compile
        )
        return total / count

    def chunked_eager(hs, ws, ht, wt):
        return chunked(hs, ws, ht, wt, compile=False)

    return {"plain": plain, "chunked": chunked, "chunked_eager": chunked_eager}[variant]


# -- CPU -----------------------------------------------------------------------------------------------------


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(variant: str, n: int, hs_dim: int, ht_dim: int, v: int, dtype: str, chunk: int, reps: int) -> dict:
    """One variant at one size, in this (fresh) process."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    # drawn directly in the target dtype, so no fp32 temporary raises the peak-RSS baseline
    hs = torch.randn(n, hs_dim, generator=g, dtype=dt).requires_grad_(True)
    ws = (torch.randn(v, hs_dim, generator=g, dtype=dt) * hs_dim**-0.5).requires_grad_(True)
    ht = torch.randn(n, ht_dim, generator=g, dtype=dt)
    wt = torch.randn(v, ht_dim, generator=g, dtype=dt) * ht_dim**-0.5
    fn = make_loss(variant, chunk)
    base = _max_rss_mib()
    times, loss = [], None
    for i in range(reps + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        loss = fn(hs, ws, ht, wt)
        loss.backward()
        dt_s = time.perf_counter() - t0
        hs.grad = ws.grad = None
        if i:
            times.append(dt_s)
    return {"ms": 1e3 * statistics.median(times), "peak_mib": _max_rss_mib() - base, "loss": float(loss.detach())}


def gemm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(ts)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_main(args) -> None:
    sizes = CPU_SIZES[:1] if args.quick else CPU_SIZES
    load_before = loadavg()
    rate = gemm_rate()
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; fp32 GEMM {rate / 1e9:.1f} GFLOP/s; load {load_before}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    print(f"| N | Hs | Ht | V | dtype | GFLOP | plain | chunked (chunk {args.chunk_size}) | chunked / plain |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- |")
    for n, hs, ht, v, dtype, reps in sizes:
        res = {}
        for variant in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--worker", variant, str(n), str(hs), str(ht), str(v), dtype,
                   str(args.chunk_size), str(args.reps or reps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                res[variant] = None
                print(f"<!-- {variant} failed: {out.stderr.strip().splitlines()[-1:]} -->", flush=True)
                continue
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        f = flops(n, hs, ht, v)

        def cell(r, f=f):
            if r is None:
                return "failed"
            share = f / (r["ms"] / 1e3) / rate
            return f"{r['ms']:,.0f} ms, {r['peak_mib']:,.0f} MiB, {share:.0%} (loss {r['loss']:.4f})"

        p, c = res["plain"], res["chunked"]
        ratio = f"{c['ms'] / p['ms']:.2f}x time, {c['peak_mib'] / p['peak_mib']:.2f}x memory" if p and c else "-"
        print(f"| {n:,} | {hs} | {ht} | {v:,} | {dtype} | {f / 1e9:,.0f} | {cell(p)} | {cell(c)} | {ratio} |",
              flush=True)
    print(f"# load after: {loadavg()}")


# -- CUDA ----------------------------------------------------------------------------------------------------


def cuda_run(fn, n, hs_dim, ht_dim, v, reps=5) -> dict:
    """kd_loss_anchor.run(), line for line, for any (hs, ws, ht, wt) -> loss."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(n, hs_dim, device=dev, generator=g).bfloat16().requires_grad_(True)
    ws = (torch.randn(v, hs_dim, device=dev, generator=g) * hs_dim**-0.5).bfloat16().requires_grad_(True)
    ht = torch.randn(n, ht_dim, device=dev, generator=g).bfloat16()
    wt = (torch.randn(v, ht_dim, device=dev, generator=g) * ht_dim**-0.5).bfloat16()
    try:
        for _ in range(2):
            loss = fn(hs, ws, ht, wt)
            loss.backward()
            hs.grad = ws.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ts = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
            e0.record()
            loss = fn(hs, ws, ht, wt)
            loss.backward()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
            hs.grad = ws.grad = None
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return {"ms": sorted(ts)[len(ts) // 2], "extra_peak_GiB": round(peak, 2), "loss": float(loss),
                "floor_ms": flops(n, hs_dim, ht_dim, v) / 790e12 * 1e3}
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        del hs, ws, ht, wt
        torch.cuda.empty_cache()


def cuda_main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; on a CPU machine run without --cuda")
    variants = {f"protege_chunked_{c}": make_loss("chunked", c) for c in args.cuda_chunks}
    variants["protege_eager_1024"] = make_loss("chunked_eager", 1024)
    variants["protege_plain"] = make_loss("plain", 0)
    anchor = Path(args.anchor) if args.anchor else (ANCHOR if ANCHOR.exists() else None)
    if anchor is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("kd_loss_anchor", anchor)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in ["naive", "torch_chunk", "liger_fused", "liger_chunk"]:
            variants[name] = mod.make(name)  # liger_* raise at make() time if liger-kernel is missing
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for n, hs, ht, v in CUDA_SIZES:
        for name, fn in variants.items():
            try:
                r = cuda_run(fn, n, hs, ht, v)
            except Exception as e:  # noqa: BLE001  one variant failing (e.g. no liger) must not lose the rest
                r = {"err": repr(e)[:200]}
            r = {"name": name, "N": n, "Hs": hs, "Ht": ht, "V": v, **r}
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = Path(os.environ.get("OUT", ".")) / "kd_loss_cuda.json"
    out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        variant, n, hs, ht, v, dtype, chunk, reps = sys.argv[2:]
        torch.manual_seed(0)
        print(json.dumps(worker(variant, int(n), int(hs), int(ht), int(v), dtype, int(chunk), int(reps))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true",
                    help="GPU protocol of kd_loss_anchor.py (needs CUDA; cannot run on the CPU-only machine)")
    ap.add_argument("--anchor", help=f"kd_loss_anchor.py to run beside ours in --cuda mode (default {ANCHOR})")
    ap.add_argument("--cuda-chunks", type=int, nargs="+", default=[1024, 2048, 4096], help="chunk sizes for --cuda")
    ap.add_argument("--chunk-size", type=int, default=256, help="chunk size in CPU mode (default 256)")
    ap.add_argument("--reps", type=int, help="timed runs per variant in CPU mode, after one warm-up (default: per size)")
    ap.add_argument("--quick", action="store_true", help="CPU mode, first size only")
    args = ap.parse_args()
    cuda_main(args) if args.cuda else cpu_main(args)


if __name__ == "__main__":
    main()
