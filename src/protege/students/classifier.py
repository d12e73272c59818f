"""Students: a Hugging Face encoder with a classification head, pretrained or configured from scratch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import write_json_atomic
from ..errors import ProtegeError
from ..recipe import StudentConfig
from ..sources import resolve_source
from . import META

__all__ = ["build_student", "load_student", "count_parameters", "student_kind"]


def build_student(cfg: StudentConfig, labels: tuple[str, ...], seed: int) -> tuple[Any, Any]:
    """(model, tokenizer) for a new student whose head predicts ``labels`` in order."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    source = resolve_source(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    except OSError as e:
        raise ProtegeError(f"cannot load the student's tokenizer from {cfg.model!r}: {e}") from None
    label_kw = dict(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    torch.manual_seed(seed)  # the new head (and a scratch model) start the same way every run
    if cfg.init == "scratch":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
            max_position_embeddings=max(512, cfg.max_length),
            pad_token_id=tokenizer.pad_token_id or 0,
            **label_kw,
        )
        model = BertForSequenceClassification(config)
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path, ignore_mismatched_sizes=True, **label_kw, **source.kwargs()
            )
        except OSError as e:
            raise ProtegeError(f"cannot load the student model {cfg.model!r}: {e}") from None
    return model, tokenizer


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def save_student(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    """save_pretrained (safetensors) plus protege.json; the label names are also in config.id2label."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    write_json_atomic(path / META, meta)


def load_student(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (path / META).is_file():
        raise ProtegeError(f"{str(path)!r} is not a trained protege student; run `protege train` first")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, json.loads((path / META).read_text())


