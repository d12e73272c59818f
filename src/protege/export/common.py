"""What every export shares: the sample texts, loading the student, the parity check, the latency comparison
with PyTorch, and the report (:class:`ExportReport`) and its writer."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from ..errors import ProtegeError
from ..evaluation.measure import LatencySummary, summarize_latency, time_calls

# Different lengths on purpose: batched together they exercise padding.
SAMPLE_TEXTS = (
    "Hi",
    "Where is my order?",
    "I was charged twice for the same invoice and the refund has not arrived yet.",
    "The app crashes every time I open the settings page on my phone, even after reinstalling it, and "
    "support has not answered my last three emails about the problem. Please help me fix it today.",
)


# Files copied beside the model when the student has them (the tokenizer is saved anew, see _copy_student_files).
META_FILES = ("config.json", "generation_config.json", "protege.json", "recipe.yaml")


def _load(student_dir: Path, kind: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..students.classifier import register_students

    register_students()  # a protege-bert (student.pooling mean) or protege-bilstm student
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    try:  # a saved student is a local folder: never reach for the hub
        model = auto.from_pretrained(student_dir, dtype="float32", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ProtegeError(f"cannot load the student in {str(student_dir)!r}: {e}") from None
    if tokenizer.pad_token is None:  # many LM tokenizers have none; padding is only for the parity batch here
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def parity(ref: Any, got: Any, mask: Any, kind: str, atol: float) -> dict[str, Any]:
    """Compare PyTorch logits ``ref`` with exported ``got`` (numpy, (B, C) or (B, T, V)) over real tokens.

    ``argmax_agreement`` is the strict fraction of equal argmaxes; ``passed`` needs max_abs_diff <= atol and
    every differing argmax to be a near-tie (the exported argmax's PyTorch logit within 2·atol of the top)."""
    import numpy as np

    if kind == "lm":
        keep = mask.astype(bool)  # (B, T): padding positions carry no meaning
        ref, got = ref[keep], got[keep]  # (N, V)
    diff = float(np.abs(ref - got).max())
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = float((top_ref == top_got).mean())
    picked = np.take_along_axis(ref, top_got[:, None], -1)[:, 0]
    near_ties = bool((picked >= ref.max(-1) - 2 * atol).all())
    return {"positions": int(ref.shape[0]), "max_abs_diff": diff, "atol": atol, "argmax_agreement": agree,
            "passed": bool(diff <= atol and near_ties)}


@dataclass(frozen=True)
class RuntimeLatency:
    """CPU latency of one input per call through PyTorch and the exported ``runtime``, timed alternately."""

    runtime: str  # "onnxruntime" | "llama.cpp"
    runs: int
    warmup: int
    pytorch: LatencySummary
    exported: LatencySummary

    @property
    def speedup_p50(self) -> float | None:
        """How many times faster the exported runtime is at p50 (above 1: faster than PyTorch)."""
        return self.pytorch.p50 / self.exported.p50 if self.exported.p50 > 0 else None

    @property
    def key(self) -> str:
        """The exported runtime's key in the JSON report: ``onnxruntime_ms``, ``llama_cpp_ms``."""
        return self.runtime.replace(".", "_") + "_ms"

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "warmup": self.warmup, "pytorch_ms": self.pytorch.as_ms(),
                self.key: self.exported.as_ms(), "speedup_p50": self.speedup_p50}


def compare_latency(runtime: str, pytorch: Callable[[int], object], exported: Callable[[int], object], runs: int,
                    warmup: int) -> RuntimeLatency:
    """Time ``pytorch(i)`` and ``exported(i)`` (``i``: the run, to pick the input) alternating run by run, so
    both see the same machine; PyTorch under ``torch.inference_mode``."""
    import torch

    with torch.inference_mode():
        torch_s, exported_s = time_calls([pytorch, exported], runs, warmup)
    return RuntimeLatency(runtime, runs, warmup, summarize_latency(torch_s), summarize_latency(exported_s))


@dataclass(frozen=True, kw_only=True)
class ExportReport:
    """What an export made and measured; :meth:`to_json` is export_report.json. ``details`` holds what only
    one format has (ONNX: exporter, opset, inputs, outputs; GGUF: gguf_type, converter, tokenizer,
    tokenization) and ``versions`` the libraries used; both are written at the top level of the JSON."""

    student: str
    output: str
    format: str
    kind: str
    architecture: str
    model_bytes: int
    parameters: int
    threads: int
    parity: dict[str, Any]  # protege.export.common.parity's figures, plus what the format's check adds
    latency: RuntimeLatency
    versions: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # set by write_report
    files: tuple[str, ...] = ()  # set by write_report

    def to_json(self) -> dict[str, Any]:
        return {"student": self.student, "output": self.output, "format": self.format, "kind": self.kind,
                "architecture": self.architecture, **self.details, "model_bytes": self.model_bytes,
                "parameters": self.parameters, "threads": self.threads, "parity": self.parity,
                "latency": self.latency.to_json(), "versions": self.versions, "created": self.created,
                "files": list(self.files)}


def write_report(tmp: Path, report: ExportReport, markdown: Callable[[dict[str, Any]], str]) -> ExportReport:
    """Finish an export's ``report`` (the files beside it, when it was made) and write it into the export's
    folder as export_report.json and ``markdown(its JSON)`` as export_report.md; return it."""
    files = [p.name for p in tmp.iterdir() if p.is_file()]
    report = dataclasses.replace(report, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 files=tuple(sorted(files + ["export_report.json", "export_report.md"])))
    data = report.to_json()
    write_json_atomic(tmp / "export_report.json", data)
    write_text_atomic(tmp / "export_report.md", markdown(data))
    return report


def _copy_student_files(student_dir: Path, out: Path) -> None:
    """The tokenizer (loaded fresh and saved, so every file it needs is there and nothing we changed) and the
    student's config and metadata: the folder needs nothing from the student directory."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(student_dir, local_files_only=True).save_pretrained(out)
    for name in META_FILES:
        if (student_dir / name).is_file():
            shutil.copy2(student_dir / name, out / name)


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Any]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _max_length(model: Any, tokenizer: Any) -> int:
    """Sample length cap: enough for the sample texts, within what the model takes."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min([x for x in limits if isinstance(x, int) and x > 1] + [128])
