"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the replies, the teacher scores them.

On a sampled step the student, in eval mode and without gradients, samples a reply to each prompt of the step;
the loss is then the token-level divergence D(p_teacher, q_student) at every token it wrote, against the local
teacher's full next-token distribution there (reverse KL by default), through the same chunked LM-head loss as
``distill: logits`` with alpha = 1. Learning on its own samples removes the mismatch between the teacher-written
prefixes a student trains on and the self-written ones it generates from.

Which steps sample (GKD's lambda, ``training.on_policy_fraction``) and every draw of the sampling are fixed by the
seed and the step's index, like the step's rows (``steps.micro_batches``): a resumed run samples exactly what
the uninterrupted run did, with nothing to add to the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from ..sources import cache_kwarg
from ..students.generate import decode

__all__ = ["sample_replies", "sample_seed", "sampled_step"]


def sampled_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` learns from the student's own samples: a draw u ~ U(0, 1) fixed by the
    seed and the step, u < fraction (so every step at 1, none at 0); the same on every process."""
    g = torch.Generator().manual_seed(seed * 100_003 + step + 7_919)  # apart from the data order's streams
    return bool(torch.rand((), generator=g) < fraction)


def sample_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of the generator that samples micro-batch ``micro`` of process ``rank`` at ``step``."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank) % (2**63)


def sample_replies(
    model: Any,
    prompts: list[list[int]],
    *,
    stop_ids: tuple[int, ...],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[int]]:
    """The student's reply to each prompt, sampled at ``temperature`` from softmax(logits / temperature) with one
    generator seeded by ``seed``. A reply ends with the stop token that ended it (the student chose to stop: the
    teacher scores that choice too) or after ``max_new_tokens`` tokens.

    One prompt decodes through the serving loop (:func:`protege.students.generate.decode`); several decode
    together, left-padded on one KV cache, one forward pass per token for all of them (a row that stopped rides
    along, its tokens dropped): a step's sampling costs about one prompt's, not one per prompt.

    Runs without gradients and with the model in eval mode (no dropout), then puts the mode back.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:
        return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))  # logits (V,)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(prompts) == 1:
                return [[s.token for s in decode(model, prompts[0], stop_ids, max_new_tokens, pick)]]
            return _sample_batch(model, prompts, stop_ids, max_new_tokens, temperature, gen)
    finally:
        model.train(was_training)


def _sample_batch(model: Any, prompts: list[list[int]], stop_ids: tuple[int, ...], max_new_tokens: int,
                  temperature: float, gen: torch.Generator) -> list[list[int]]:
    """:func:`sample_replies` for several prompts at once (see there)."""
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = min(max_new_tokens, max(0, context - T))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((B, T), int(pad), dtype=torch.long, device=device)  # (B, T) left-padded
    mask = torch.zeros((B, T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T): each row counts from its first real token
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    replies: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    past, cache_kw = None, cache_kwarg(model)
    for _ in range(budget):
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **({} if past is None else {cache_kw: past}))
        past = getattr(res, "cache", None) or res.past_key_values
        probs = torch.softmax(res.logits[:, -1].float() / temperature, -1)  # (B, V)
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
        for i in torch.nonzero(~done).flatten().tolist():
            replies[i].append(int(tokens[i]))
        done |= torch.isin(tokens, stops)
        if bool(done.all()):
            break
        ids = tokens[:, None]  # (B, 1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long, device=device)], 1)
        positions = positions[:, -1:] + 1
    return replies
