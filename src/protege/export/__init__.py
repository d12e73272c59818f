"""Export a trained student for the edge and check the file against PyTorch before it appears.

``onnx`` (classifier and causal-LM students, run by onnxruntime) and ``gguf`` (Llama, Mistral and Qwen2 LM
students, run by llama.cpp); both share :mod:`protege.export.common` (sample texts, parity, the report).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ProtegeError
from .common import ExportReport, RuntimeLatency

__all__ = ["FORMATS", "ExportReport", "RuntimeLatency", "export_student"]

FORMATS = ("onnx", "gguf")


def export_student(
    student_dir: Path | str,
    format: str = "onnx",
    output: Path | str | None = None,
    *,
    atol: float | None = None,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    texts: list[str] | None = None,
    gguf_type: str = "f16",
) -> ExportReport:
    """Export the student in ``student_dir`` to ``output`` (default ``student_dir/FORMAT``) and return the report
    (``report.to_json()`` is what export_report.json holds).

    The folder appears whole or not at all: a failed export, or a parity check outside ``atol`` (default: by
    student kind for ONNX, :data:`protege.export.onnx.DEFAULT_ATOL`; by file type for GGUF,
    :data:`protege.export.gguf.DEFAULT_ATOL`) raises ProtegeError and leaves any previous export in place."""
    if format not in FORMATS:
        raise ProtegeError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(Path(student_dir), output, gguf_type=gguf_type, atol=atol, runs=runs, warmup=warmup,
                           threads=threads, texts=texts)
    from .onnx import export_onnx

    return export_onnx(student_dir, output, atol=atol, runs=runs, warmup=warmup, threads=threads, texts=texts)
