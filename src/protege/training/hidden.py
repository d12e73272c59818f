"""Hidden-state distillation for classifier students of a local encoder teacher (``training.hidden_weight``).

A two-label teacher's distribution is one number per text; its last layer holds a few hundred per token. When
the teacher is an 'hf:' sequence classifier or an 'embed:' sentence encoder that reads the same word pieces as the
student, each token's last
state of the student, mapped to the teacher's width by a linear map trained with it (dropped when the student is
saved), is pulled toward the teacher's state of the same token: 1 - cosine similarity, averaged over the text's
tokens, as DistilBERT's hidden-state term (Sanh et al. 2019) and TinyBERT's (Jiao et al. 2020, there with MSE).

The teacher's states are computed once, at the start of training, and held in memory in float16, one (tokens,
width) tensor per text: for the original training texts (``training.hidden_rows: original``; the augmented ones
train on the teacher's labels alone), or for every text (``all``: a teacher pass over every augmented text costs
as much as labelling them again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ProtegeError
from ..lean import encode
from ..recipe import TeacherConfig

__all__ = ["hidden_loss", "pad_states", "teacher_states"]


def teacher_states(teacher: TeacherConfig, tokenizer: Any, texts: Sequence[str], max_length: int,
                   batch_size: int = 64, device: torch.device | str | None = None) -> tuple[list[torch.Tensor], int]:
    """(the teacher's last-layer state of each token of each text, float16 (tokens, width) on the CPU, width).

    ``tokenizer`` is the student's; the teacher must use the same vocabulary, so that position t of a text is
    the same word piece for both. Texts are run shortest first, so batches carry little padding; the teacher
    runs on ``device`` (default: where it was loaded)."""
    if teacher.model.startswith("embed:"):  # a sentence-embedding encoder: its token states, before pooling
        from ..teachers.embed import EmbeddingTeacher

        base, their_tok = EmbeddingTeacher(teacher.model.split(":", 1)[1], teacher).model_and_tokenizer()
    else:
        from ..students.classifier import load_teacher_classifier

        use = "training.hidden_weight matches the student's token states to its"
        model, their_tok = load_teacher_classifier(teacher, use, "Set training.hidden_weight: 0")
        base = model.base_model
    if their_tok.get_vocab() != tokenizer.get_vocab():
        raise ProtegeError(
            f"training.hidden_weight matches the student's token states to the teacher's, token by token, but "
            f"teacher {teacher.model!r} splits text into other word pieces than the student. Set student.model to "
            "the teacher's tokenizer (its directory), or training.hidden_weight: 0"
        )
    base = base.float().eval()
    if device is not None:
        base.to(device)
    device = next(base.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            enc = encode(tokenizer, [texts[i] for i in idx], max_length)
            states = base(input_ids=enc["input_ids"].to(device),
                          attention_mask=enc["attention_mask"].to(device)).last_hidden_state.cpu()
            for b, i in enumerate(idx):
                out[i] = states[b, : int(enc["attention_mask"][b].sum())].to(torch.float16).clone()
    return [s for s in out if s is not None], base.config.hidden_size


def pad_states(states: Sequence[torch.Tensor | None], length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length, width) float32 teacher states, zeros where a row has none or past its tokens, and (B,) 1.0
    for the rows that have states."""
    out = torch.zeros(len(states), length, width)
    has = torch.zeros(len(states))
    for b, s in enumerate(states):
        if s is not None:
            n = min(len(s), length)
            out[b, :n] = s[:n].float()
            has[b] = 1.0
    return out, has


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, has: torch.Tensor,
                proj: torch.nn.Module) -> torch.Tensor:
    """Sum over rows of the mean over a row's tokens of 1 - cos(proj(student state), teacher state); rows with
    ``has`` 0 add nothing. Shapes: student (B, T, h), teacher (B, T, H), mask (B, T), has (B,)."""
    cos = F.cosine_similarity(proj(student), teacher.to(student.dtype), dim=-1, eps=1e-6)  # (B, T)
    m = mask.to(cos.dtype)
    per_row = ((1 - cos) * m).sum(1) / m.sum(1).clamp_min(1.0)
    return (per_row * has.to(cos.dtype)).sum()
