"""Distillation losses: pure functions of tensors that return (sum, count).

The training loop adds sums and counts over the whole accumulated batch and divides once, so gradient
accumulation and uneven last batches give the same objective as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["forward_kl", "distillation_loss"]


def forward_kl(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL from teacher to student at temperature tau, summed over rows.

        KL(p || q) = sum_c p_c (log p_c - log q_c),   p = softmax(log p_teacher / tau),  q = softmax(z / tau)

    Direction: forward (mode-covering): the student is penalised for putting little mass where the teacher
    puts mass. Re-tempering the teacher from probabilities is exact: softmax(log softmax(z) / tau) equals
    softmax(z / tau). Zero teacher probabilities contribute 0 (0 log 0 = 0).

    Shapes: student_logits (N, C); teacher_probs (N, C), rows summing to 1; mask (N,) bool or None.
    Returns (sum over unmasked rows, number of unmasked rows); both 0 for an all-masked batch.
    Computed in float32 whatever the input dtype.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, C)
    log_p = F.log_softmax(teacher_probs.float().clamp_min(1e-30).log() / temperature, dim=-1)  # (N, C)
    p = log_p.exp()
    # where p == 0, the term is 0 regardless of log_p (which is ~-69 after the clamp, never -inf or NaN)
    per_row = (p * (log_p - log_q)).sum(-1)  # (N,)
    if mask is None:
        return per_row.sum(), torch.tensor(per_row.shape[0], device=per_row.device)
    mask = mask.to(per_row.device, torch.bool)
    return per_row.masked_fill(~mask, 0.0).sum(), mask.sum()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton et al. (2015) knowledge distillation, summed over rows:

        L = (1 - alpha) * CE(y, softmax(z)) + alpha * tau^2 * KL(p_teacher^tau || q_student^tau)

    CE is the cross-entropy with the hard target y at temperature 1; the KL is :func:`forward_kl`. The tau^2
    factor keeps the soft term's gradient on the same scale as tau changes (its gradient shrinks as 1/tau^2).

    Shapes: student_logits (N, C); teacher_probs (N, C); targets (N,) class indices; mask (N,) or None.
    Returns (loss sum, row count, {"ce": ce sum, "kd": tau^2-scaled KL sum}); divide by the count of the
    whole accumulated batch.
    """
    kl_sum, count = forward_kl(student_logits, teacher_probs, mask, temperature)
    ce_rows = F.cross_entropy(student_logits.float(), targets, reduction="none")  # (N,)
    if mask is not None:
        ce_rows = ce_rows.masked_fill(~mask.to(ce_rows.device, torch.bool), 0.0)
    ce_sum = ce_rows.sum()
    kd_sum = temperature**2 * kl_sum
    return (1.0 - alpha) * ce_sum + alpha * kd_sum, count, {"ce": ce_sum, "kd": kd_sum}
