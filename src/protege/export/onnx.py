"""Export a trained student for the edge: ONNX for classifier and causal-LM students, checked against PyTorch.

GGUF for LM students (llama.cpp) lives in :mod:`protege.export.gguf`; :func:`protege.export.export_student`
picks one by format.

The exported folder is self-contained: ``model.onnx`` beside the tokenizer, ``config.json`` (the label names
of a classifier), ``protege.json`` and ``recipe.yaml`` when the student has them, and the export's report.

* Exporter: ``torch.onnx.export(dynamo=True)``, torch's default since 2.9 (it needs ``onnxscript``). It captures
  the whole graph with ``torch.export`` and symbolic batch and sequence sizes, so a shape-dependent Python branch
  in the model fails the export instead of being frozen at the sample's shape, as the TorchScript tracer
  (``dynamo=False``, deprecated) does silently: with transformers' SDPA attention it warns that it turned
  ``q_length > 1`` into a constant.
* Graph: ``(input_ids, attention_mask) -> logits``, both inputs int64 of shape (batch, sequence), both sizes
  dynamic. Classifier logits are (batch, labels); an LM's are (batch, sequence, vocab), computed without a KV
  cache (each call reads the whole sequence).
* Parity: the sample texts, batched with padding, through PyTorch and onnxruntime (CPU). The export fails,
  leaving nothing behind, when the largest absolute difference of fp32 logits (over real tokens, not padding)
  passes ``atol``, or when an argmax differs anywhere but at a near-tie (a top-2 gap under 2·atol, which any
  error within tolerance can flip). Default atol: 1e-4 for a classifier (a few labels; kernels that sum in
  another order move its logits by ~1e-7), 1e-3 for an LM (tens of thousands of logits of magnitude up to ~30
  through a deeper stack: SmolLM2-135M differs by ~1.1e-4). A wrong graph (a dropped mask, shifted
  positions) is off by far more.
* Latency: one text at a time, the model call only (tokenizing excluded on both sides), PyTorch and
  onnxruntime alternating run by run on the same thread count, p50/p95 in milliseconds after a warm-up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from ..errors import MissingExtra, ProtegeError
from ..students import student_kind
from .common import (
    SAMPLE_TEXTS,
    ExportReport,
    _copy_student_files,
    _encode,
    _load,
    _max_length,
    compare_latency,
    parity,
    write_report,
)

__all__ = ["DEFAULT_ATOL", "export_onnx"]

DEFAULT_ATOL = {"classifier": 1e-4, "lm": 1e-3}  # by student kind; see the module docstring
OPSET = 18  # the dynamo exporter's own default; onnxruntime 1.17+ runs it
MODEL_FILE = "model.onnx"


# --------------------------------------------------------------------------------------------------------------
# the student


class _Logits(torch.nn.Module):
    """The graph exported: (input_ids, attention_mask) -> fp32 logits, nothing else (no cache, no hidden states)."""

    def __init__(self, model: Any, kind: str):
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if kind == "lm" else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra).logits.float()


# --------------------------------------------------------------------------------------------------------------
# ONNX


def _export_onnx(module: Any, sample: dict[str, Any], path: Path, external_data: bool) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # torch.export specializes sizes 0 and 1 to constants: the sample must have >= 2 rows and >= 2 tokens
    assert sample["input_ids"].shape[0] >= 2 and sample["input_ids"].shape[1] >= 2
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # it warns, once per op, that torchvision (unused here) is not installed
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter prints its progress
            # benign: both inputs name their axes "batch"/"sequence", and the exporter notes the names coincide
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
            torch.onnx.export(
                module, (sample["input_ids"], sample["attention_mask"]), str(path),
                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                opset_version=OPSET, dynamo=True, external_data=external_data, verbose=False,
            )
    finally:
        registry_log.setLevel(level)


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no busy-waiting between calls: spinning threads would steal the cores PyTorch is timed on next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------------------
# the export


def _report_md(r: dict[str, Any]) -> str:
    p, lat = r["parity"], r["latency"]
    pt, ox = lat["pytorch_ms"], lat["onnxruntime_ms"]
    return "\n".join([
        f"# Export of `{r['student']}` ({r['kind']}, {r['architecture']})",
        "",
        f"Format {r['format']} (opset {r['opset']}), exported with {r['exporter']}; torch {r['versions']['torch']}, "
        f"onnxruntime {r['versions']['onnxruntime']}; {r['created']}.",
        "",
        "## Parity with PyTorch",
        "",
        f"{p['texts']} sample texts batched with padding, {p['positions']} compared positions: max |Δlogit| "
        f"{p['max_abs_diff']:.3g} (tolerance {p['atol']:g}), argmax agreement {100 * p['argmax_agreement']:.1f}%: "
        + ("**passed**." if p["passed"] else "**failed**."),
        "",
        f"## CPU latency, one text per call ({lat['runs']} runs after {lat['warmup']} warm-up, {r['threads']} thread(s))",
        "",
        "| runtime | p50 ms | p95 ms | mean ms |",
        "| --- | ---: | ---: | ---: |",
        f"| PyTorch | {pt['p50']:.3f} | {pt['p95']:.3f} | {pt['mean']:.3f} |",
        f"| onnxruntime | {ox['p50']:.3f} | {ox['p95']:.3f} | {ox['mean']:.3f} |",
        "",
        f"onnxruntime is {lat['speedup_p50']:.2f}x PyTorch's speed at p50 (model call only, tokenizing excluded).",
        "",
    ])


def export_onnx(
    student_dir: Path | str,
    output: Path | str | None = None,
    *,
    atol: float | None = None,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    texts: list[str] | None = None,
) -> ExportReport:
    """Export the student in ``student_dir`` to ``output`` (default ``student_dir/FORMAT``) and return the report.

    The folder appears whole or not at all: a failed export, or a parity check outside ``atol`` (default by
    kind: DEFAULT_ATOL), raises ProtegeError and leaves any
    previous export in place. ``threads`` applies to both runtimes while timing; the default, 1, is one request
    on one core: the figure least disturbed by other work on the machine (with more threads than free cores,
    PyTorch's OpenMP pool can be 100x slower)."""
    student_dir = Path(student_dir)
    format = "onnx"
    kind, arch = student_kind(student_dir, "protege export")
    atol = DEFAULT_ATOL[kind] if atol is None else atol
    if atol < 0 or runs < 1 or warmup < 0 or threads < 1:
        raise ProtegeError("atol must be >= 0, runs >= 1, warmup >= 0 and threads >= 1")
    texts = list(texts or SAMPLE_TEXTS)
    if len(texts) < 2:
        raise ProtegeError("the parity check needs at least 2 sample texts (the batch must show padding)")
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError as e:
        raise MissingExtra(e.name or "onnxruntime", "export", "`protege export --format onnx`") from None

    out = Path(output) if output is not None else student_dir / "onnx"
    model, tokenizer = _load(student_dir, kind)
    module = _Logits(model, kind).eval()
    max_len = _max_length(model, tokenizer)
    batch = _encode(tokenizer, texts, max_len)
    singles = [_encode(tokenizer, [t], max_len) for t in texts]
    if batch["input_ids"].shape[1] < 2:
        raise ProtegeError("the sample texts tokenize to one token each; pass longer texts")
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with atomic_dir(out) as tmp:
            try:
                _export_onnx(module, batch, tmp / MODEL_FILE, external_data=n_bytes > 1_500_000_000)  # protobuf: 2 GB
            except Exception as e:  # noqa: BLE001  (the exporter raises many kinds; the user needs the gist)
                raise ProtegeError(f"torch.onnx.export failed for {arch}: {type(e).__name__}: {str(e)[:500]}") from e
            session = _ort_session(tmp / MODEL_FILE, threads)
            with torch.inference_mode():
                ref = module(**batch).numpy()
            got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
            check = {"texts": len(texts), **parity(ref, got, batch["attention_mask"].numpy(), kind, atol)}
            if not check["passed"]:
                raise ProtegeError(
                    f"the ONNX model disagrees with PyTorch: max |logit difference| {check['max_abs_diff']:.3g} "
                    f"(tolerance {atol:g}), argmax agreement {100 * check['argmax_agreement']:.1f}%; nothing was "
                    "written. Report it with the model's architecture, or loosen --atol if the difference is noise"
                )
            feeds = [{k: v.numpy() for k, v in enc.items()} for enc in singles]
            latency = compare_latency("onnxruntime", lambda i: module(**singles[i % len(singles)]),
                                      lambda i: session.run(None, feeds[i % len(feeds)]), runs, warmup)
            _copy_student_files(student_dir, tmp)
            report = write_report(tmp, ExportReport(
                student=str(student_dir), output=str(out), format=format, kind=kind, architecture=arch,
                details={"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET,
                         "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"]},
                model_bytes=sum(f.stat().st_size for f in tmp.glob(f"{MODEL_FILE}*") if f.is_file()),
                parameters=sum(p.numel() for p in model.parameters()),
                threads=threads, parity=check, latency=latency,
                versions={"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            ), _report_md)
    finally:
        torch.set_num_threads(prev_threads)
    return report
