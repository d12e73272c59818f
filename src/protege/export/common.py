"""What every export shares: the sample texts, loading the student, the parity check, latency summary and the
report writer."""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from ..errors import ProtegeError

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

    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(student_dir, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
    except (OSError, ValueError) as e:
        raise ProtegeError(f"cannot load the student in {str(student_dir)!r}: {e}") from None
    if tokenizer.pad_token is None:  # many LM tokenizers have none; padding is only for the parity batch here
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def _ms(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=20) if len(samples) > 1 else samples * 19
    return {"p50": 1e3 * statistics.median(samples), "p95": 1e3 * q[18], "mean": 1e3 * statistics.fmean(samples)}


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


def write_report(tmp: Path, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Finish an export's ``report`` (the files beside it, when it was made) and write it into the export's
    folder as export_report.json and ``markdown(report)`` as export_report.md; return it."""
    files = [p.name for p in tmp.iterdir() if p.is_file()]
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["files"] = sorted(files + ["export_report.json", "export_report.md"])
    write_json_atomic(tmp / "export_report.json", report)
    write_text_atomic(tmp / "export_report.md", markdown(report))
    return report


def _copy_student_files(student_dir: Path, out: Path) -> None:
    """The tokenizer (loaded fresh and saved, so every file it needs is there and nothing we changed) and the
    student's config and metadata: the folder needs nothing from the student directory."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(student_dir).save_pretrained(out)
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
