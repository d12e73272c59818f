"""The one optimizer set-up of both training loops: AdamW with decoupled weight decay and a linear schedule."""

from __future__ import annotations

from typing import Any

import torch

from ..recipe import TrainingConfig

__all__ = ["make_optimizer", "no_decay"]


def no_decay(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay: biases and normalisation-layer weights.

    Decay pulls a weight toward 0; for a bias or a norm's scale (whose neutral value is 1) that is a bias of
    its own, not regularisation. A normalisation layer is any module whose class name says Norm (LayerNorm,
    Llama's RMSNorm, ...), so models that write their own are covered; decided by module, not by name.
    """
    out = set()
    for prefix, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(prefix=prefix, recurse=False):
            if p.requires_grad and (is_norm or name.rsplit(".", 1)[-1] == "bias"):
                out.add(name)
    return out


def make_optimizer(
    model: torch.nn.Module, cfg: TrainingConfig, lr: float, total_steps: int,
    lr_by_prefix: dict[str, float] | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """(AdamW over ``model``'s trainable parameters, its schedule): linear warm-up over
    ``cfg.warmup_fraction`` of ``total_steps`` optimizer steps, then linear decay to 0 at ``total_steps``.

    Two groups: ``cfg.weight_decay`` for the rest, 0 for :func:`no_decay`. Frozen parameters (a LoRA
    student's base) are left out. ``lr_by_prefix``: parameters whose name starts with a key learn at its rate
    instead of ``lr`` (an n-gram bag's), in groups of their own, on the same schedule.
    """
    from transformers import get_linear_schedule_with_warmup

    skip = no_decay(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def rate(name: str) -> float:
        return next((r for prefix, r in (lr_by_prefix or {}).items() if name.startswith(prefix)), lr)

    groups = []
    for r in dict.fromkeys([lr, *(lr_by_prefix or {}).values()]):
        for decay, names in ((cfg.weight_decay, lambda n: n not in skip), (0.0, lambda n: n in skip)):
            ps = [p for name, p in params if names(name) and rate(name) == r]
            if ps or r == lr:  # the base groups always exist (a resumed optimizer's state expects them)
                groups.append({"params": ps, "weight_decay": decay, "lr": r})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * total_steps), total_steps)
    return optimizer, scheduler
