"""Students: a Hugging Face encoder with a classification head, pretrained or configured from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ProtegeError
from ..recipe import StudentConfig
from ..sources import resolve_source
from .card import StudentCard

__all__ = ["build_student", "save_student", "load_student", "count_parameters"]


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


def save_student(model: Any, tokenizer: Any, path: Path, card: StudentCard) -> None:
    """save_pretrained (safetensors) plus the card, protege.json; the label names are also in config.id2label."""
    if card.kind != "classifier":
        raise ValueError(f"a classifier student is saved with a classifier's card, not a {card.kind}'s")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    card.write(path)


def load_student(path: Path) -> tuple[Any, Any, StudentCard]:
    """(model in eval mode, tokenizer, card) of a saved classifier student."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    card = StudentCard.read(path)
    if card.kind != "classifier":
        raise ProtegeError(f"{str(path)!r} is a {card.kind} student, not a classifier")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    id2label = model.config.id2label or {}
    if tuple(id2label.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)) != card.labels:
        raise ProtegeError(f"{str(path)!r}: the card's labels {list(card.labels or ())} are not those of the model's "
                           f"head (config.json id2label {id2label}); the student directory is damaged, retrain it")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, card


