"""Distillation losses: pure functions of tensors that return (sum, count).

The training loop adds sums and counts over the whole accumulated batch and divides once, so gradient
accumulation and uneven last batches give the same objective as one big batch.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..errors import ProtegeError

__all__ = [
    "check_vocab",
    "chunked_lm_distillation_loss",
    "distillation_loss",
    "forward_kl",
    "lm_distillation_loss",
    "logit_mse",
    "token_divergence",
    "topk_distillation_loss",
]

log = logging.getLogger(__name__)


def _masked_sum(per_row: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``per_row`` (N,) over the rows ``mask`` keeps, their count); every row without a mask."""
    if mask is None:
        return per_row.sum(), torch.tensor(per_row.shape[0], device=per_row.device)
    mask = mask.to(per_row.device, torch.bool)
    return per_row.masked_fill(~mask, 0.0).sum(), mask.sum()


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
    return _masked_sum(per_row, mask)


LOGIT_FLOOR = 1e-4  # logit_mse: the least teacher probability it matches a margin to


def logit_mse(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance between the student's logits and the teacher's, summed over rows (Ba & Caruana 2014;
    Tang et al. 2019, who found it better than KL for a small student distilled from BERT):

        sum_c ((z_c - mean z) - (log p_c - mean log p))^2

    The teacher's logits are known only up to a constant from its probabilities, so both sides are centred over
    the labels. Unlike the KL, whose gradient (q - p) vanishes once the student picks the teacher's label with
    about its confidence, this keeps pulling the student's margins to the teacher's on every row.

    A teacher probability below :data:`LOGIT_FLOOR` counts as it: every label weighs alike here, so a 0 (a
    teacher that answered with one label, or whose samples never named one) would ask for a margin of 69 nats and
    swamp everything else; the floor caps a margin at ln(1e4), about 9.2.

    Shapes and return as :func:`forward_kl`; computed in float32.
    """
    z = student_logits.float()
    log_p = teacher_probs.float().clamp_min(LOGIT_FLOOR).log()
    d = (z - z.mean(-1, keepdim=True)) - (log_p - log_p.mean(-1, keepdim=True))  # (N, C)
    per_row = d.square().sum(-1)  # (N,)
    return _masked_sum(per_row, mask)


SOFT_LOSSES = ("kl", "logit_mse")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    mask: torch.Tensor | None = None,
    soft: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton et al. (2015) knowledge distillation, summed over rows:

        L = (1 - alpha) * CE(y, softmax(z)) + alpha * tau^2 * KL(p_teacher^tau || q_student^tau)

    CE is the cross-entropy with the hard target y at temperature 1; the KL is :func:`forward_kl`. The tau^2
    factor keeps the soft term's gradient on the same scale as tau changes (its gradient shrinks as 1/tau^2).

    With ``soft="logit_mse"`` the soft term is :func:`logit_mse` instead of tau^2 KL (no temperature: a distance
    between logits does not change its minimum with their scale).

    Shapes: student_logits (N, C); teacher_probs (N, C); targets (N,) class indices; mask (N,) or None.
    Returns (loss sum, row count, {"ce": ce sum, "kd": the soft term's sum}); divide by the count of the
    whole accumulated batch.
    """
    if soft not in SOFT_LOSSES:
        raise ValueError(f"soft must be one of {SOFT_LOSSES}, got {soft!r}")
    if soft == "logit_mse":
        kl_sum, count = logit_mse(student_logits, teacher_probs, mask)
        temperature = 1.0
    else:
        kl_sum, count = forward_kl(student_logits, teacher_probs, mask, temperature)
    ce_rows = F.cross_entropy(student_logits.float(), targets, reduction="none")  # (N,)
    if mask is not None:
        ce_rows = ce_rows.masked_fill(~mask.to(ce_rows.device, torch.bool), 0.0)
    ce_sum = ce_rows.sum()
    kd_sum = temperature**2 * kl_sum
    return (1.0 - alpha) * ce_sum + alpha * kd_sum, count, {"ce": ce_sum, "kd": kd_sum}


# ---------------------------------------------------------------------------------------------------------------
# Token-level losses for causal LM students. Rows are token positions (N = batch x sequence, flattened); the
# training loop adds the sums and counts of a whole accumulated batch and divides once.
# ---------------------------------------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_LOG_FLOOR = math.log(1e-30)  # reverse KL: a teacher probability of 0 counts as 1e-30, as in forward_kl above
_NEG = -1e4  # stands in for -inf inside log(mixture): exp(-1e4) is 0 in fp32, and its gradient is not NaN


def _check_args(divergence: str, beta: float, temperature: float, alpha: float = 0.0) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _valid_rows(n: int, device, mask: torch.Tensor | None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: rows that count. A target of -100 (the Hugging Face ignore index) is masked too."""
    valid = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1).to(device, torch.bool)
    if targets is not None:
        valid = valid & (targets.reshape(-1).to(device) != -100)
    return valid


def _clean_logits(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 (N, V) logits; masked rows set to 0, because a padding row of all -inf would make log_softmax NaN and
    the NaN would reach the gradient even though the row is masked."""
    z = logits.reshape(-1, logits.shape[-1]).float()
    return z.masked_fill(~valid[:, None], 0.0)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """(N,) KL(a || b) = sum_c a_c (log a_c - log b_c) from log-probs, with 0 log 0 = 0 in value and gradient."""
    a = log_a.exp()
    diff = (log_a - log_b).masked_fill(a == 0, 0.0)  # -inf - -inf is NaN; those terms are 0 by definition
    return (a * diff).sum(-1)


def _divergence_rows(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """(N,) divergence between teacher log-probs log_p and student log-probs log_q (both (N, V), tempered)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl_rows(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl_rows(log_q, log_p.clamp_min(_LOG_FLOOR))
    log_m = torch.logaddexp(log_p.clamp_min(_NEG) + math.log(beta), log_q.clamp_min(_NEG) + math.log1p(-beta))
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence between teacher and student next-token distributions, summed over unmasked tokens.

    With p = softmax(teacher_logits / tau) (teacher) and q = softmax(student_logits / tau) (student), per token:

        forward_kl:  KL(p || q) = sum_v p_v (log p_v - log q_v)     (mode-covering; Hinton-style KD)
        reverse_kl:  KL(q || p) = sum_v q_v (log q_v - log p_v)     (mode-seeking; MiniLLM)
        jsd:         JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

    The generalized JSD follows GKD (Agarwal et al. 2024, eq. 1) and TRL's ``GKDTrainer.generalized_jsd_loss``:
    beta weighs the teacher in the mixture. JSD_beta itself vanishes at both ends (m becomes p or q); near them
    JSD_beta ~ beta KL(p || q) as beta -> 0 and ~ (1 - beta) KL(q || p) as beta -> 1. Like TRL, the endpoints are
    defined as those KLs without the vanishing factor: beta = 0 is exactly forward KL(p || q), beta = 1 exactly
    reverse KL(q || p). The scale therefore jumps at the ends: use 0 or 1 for the KLs, not a tiny beta.

    Zero probabilities (a -inf logit, e.g. a teacher's padded vocabulary ids) follow 0 log 0 = 0. In reverse KL a
    teacher probability of 0 under student mass would make the loss infinite; it counts as 1e-30 instead (as in
    :func:`forward_kl`), a finite penalty whose gradient still moves the student's mass off that token. Forward
    KL is infinite only where the student itself has a -inf logit and the teacher does not. Masked rows are
    ignored even if they are all -inf.

    Shapes: student_logits, teacher_logits (N, V) (or (B, T, V), flattened); mask (N,) bool or None. A different V
    raises ValueError: trim to :func:`check_vocab`'s column count first. Computed in float32.
    Returns (sum over unmasked tokens, number of unmasked tokens); (0, 0) for an all-masked batch.
    """
    _check_args(divergence, beta, temperature)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student logits have {student_logits.shape[-1]} columns and teacher logits {teacher_logits.shape[-1]}; "
            "slice both to check_vocab(...) columns before comparing them"
        )
    valid = _valid_rows(student_logits.reshape(-1, student_logits.shape[-1]).shape[0], student_logits.device, mask)
    log_q = F.log_softmax(_clean_logits(student_logits, valid) / temperature, dim=-1)  # (N, V)
    log_p = F.log_softmax(_clean_logits(teacher_logits.to(student_logits.device), valid) / temperature, dim=-1)
    rows = _divergence_rows(log_q, log_p, divergence, beta)  # (N,)
    return rows.masked_fill(~valid, 0.0).sum(), valid.sum()


def lm_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level knowledge distillation for a causal LM, summed over unmasked tokens:

        L = (1 - alpha) * CE(y, softmax(z_student)) + alpha * tau^2 * D(teacher^tau, student^tau)

    CE is the next-token cross-entropy at temperature 1; D is :func:`token_divergence` (forward KL, reverse KL or
    JSD_beta) at temperature tau; tau^2 keeps the soft term's gradient scale independent of tau.

    Shapes: student_logits, teacher_logits (N, V); targets (N,) token ids, -100 = ignore; mask (N,) or None.
    A token counts when mask is true and its target is not -100.
    Returns (loss sum, token count, {"ce": CE sum, "kd": tau^2-scaled D sum}); divide by the token count of the
    whole accumulated batch. All masked: (0, 0), zero gradients.
    """
    _check_args(divergence, beta, temperature, alpha)
    z = student_logits.reshape(-1, student_logits.shape[-1])  # (N, V)
    y = targets.reshape(-1).to(z.device)
    valid = _valid_rows(z.shape[0], z.device, mask, y)
    kd_sum, count = token_divergence(
        z, teacher_logits, valid, divergence=divergence, temperature=temperature, beta=beta
    )
    ce_rows = F.cross_entropy(_clean_logits(z, valid), y.masked_fill(~valid, 0), reduction="none")  # (N,)
    ce_sum = ce_rows.masked_fill(~valid, 0.0).sum()
    kd_sum = temperature**2 * kd_sum
    return (1.0 - alpha) * ce_sum + alpha * kd_sum, count, {"ce": ce_sum, "kd": kd_sum}


def _tempered_buckets(log_k: torch.Tensor, log_tail: torch.Tensor, n_rest: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, K+1) log-probs of K known tokens plus one tail bucket, re-tempered at tau.

    Known tokens: p_i -> p_i^(1/tau). Tail: its mass t is taken as spread evenly over the n_rest tokens outside the
    top-k, each t / n_rest, so it becomes n_rest * (t / n_rest)^(1/tau). Then renormalize. At tau = 1 this is the
    identity. No tail when n_rest is 0.
    """
    log_n = n_rest.clamp_min(1).float().log()  # (N,)
    log_w_tail = log_n + (log_tail - log_n) / tau  # (N,)
    log_w_tail = torch.where(n_rest > 0, log_w_tail, float("-inf"))
    return F.log_softmax(torch.cat([log_k / tau, log_w_tail[:, None]], dim=1), dim=-1)  # (N, K+1)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation from a teacher's top-k log-probs (as APIs return them), summed over unmasked tokens:

        L = (1 - alpha) * CE(y, softmax(z)) + alpha * tau^2 * KL(P^tau || Q^tau)   on K+1 buckets

    (``divergence``: forward KL as written; reverse KL(Q^tau || P^tau) or the generalized JSD with ``beta`` on
    the same K+1 buckets, as :func:`token_divergence` over a full vocabulary: on-policy distillation from a
    served teacher's top-k.)

    The teacher is known only at K token ids; the rest of its mass is one tail bucket, 1 - sum_i exp(logprob_i)
    (clamped at 0). The student's full distribution q = softmax(z) is collapsed onto the same K+1 buckets: q at
    the K ids, and the rest of its mass as its tail. Forward KL(P || Q) over the buckets.

    Re-tempering (tau != 1). Exact re-tempering of the teacher needs the logits of its tail tokens, which are
    unknown. Approximation: each known probability becomes p_i^(1/tau), and the tail mass t is taken as spread
    evenly over the R = V - K tokens outside the top-k (t / R each), so it becomes R * (t / R)^(1/tau); the K+1
    weights are then renormalized. For tau > 1 this is the most the tail can weigh (x^(1/tau) is concave, so
    any uneven split of the same mass weighs less): an upper bound, and for tau < 1 a lower bound. The
    student's buckets go through the same rule (not its exact tempered softmax), so identical inputs give 0 at
    any tau, and at tau = 1 the loss is the exact forward KL on the collapsed (K+1)-way support. At K = V (no
    tail) and tau = 1 it equals the full-vocabulary forward KL.

    Shapes: student_logits (N, V); topk_ids (N, K) int64, distinct per row, -1 for empty slots; topk_logprobs
    (N, K) at temperature 1; targets (N,) with -100 = ignore; mask (N,) or None. Computed in float32.
    Returns (loss sum, token count, {"ce": CE sum, "kd": tau^2-scaled KL sum}).
    """
    _check_args(divergence, beta, temperature, alpha)
    z = student_logits.reshape(-1, student_logits.shape[-1])  # (N, V)
    n_rows, vocab = z.shape
    ids = topk_ids.reshape(n_rows, -1).to(z.device)  # (N, K)
    y = targets.reshape(-1).to(z.device)
    valid = _valid_rows(n_rows, z.device, mask, y)
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"top-k ids go up to {int(ids.max())}, beyond the student's {vocab} logit columns")
    slot = (ids >= 0) & valid[:, None]  # (N, K); masked rows get no slots, so their buckets stay finite
    ids = ids.clamp_min(0)
    n_rest = vocab - slot.sum(-1)  # (N,) tokens in the tail

    # teacher: K known log-probs and the tail 1 - sum p_i (API rounding can make the sum pass 1 slightly)
    lp = topk_logprobs.reshape(n_rows, -1).to(z.device).float().masked_fill(~slot, float("-inf"))  # (N, K)
    log_tail_p = (1.0 - lp.exp().sum(-1)).clamp_min(0.0).log()  # (N,)
    log_p = _tempered_buckets(lp, log_tail_p, n_rest, temperature)  # (N, K+1)

    # student: its log-probs at the same ids, and the log of the mass elsewhere (logsumexp, not 1 - sum: exact
    # even when the top-k hold nearly all of it)
    log_q_full = F.log_softmax(_clean_logits(z, valid), dim=-1)  # (N, V)
    in_topk = torch.zeros_like(log_q_full, dtype=torch.int32).scatter_add_(1, ids, slot.int()) > 0  # (N, V)
    log_q_k = log_q_full.gather(1, ids).masked_fill(~slot, float("-inf"))  # (N, K)
    log_tail_q = torch.logsumexp(log_q_full.masked_fill(in_topk, float("-inf")), dim=-1)  # (N,)
    log_tail_q = torch.where(n_rest > 0, log_tail_q, float("-inf"))
    log_q = _tempered_buckets(log_q_k, log_tail_q, n_rest, temperature)  # (N, K+1)

    kd_rows = _divergence_rows(log_q, log_p, divergence, beta)  # (N,)
    kd_sum = temperature**2 * kd_rows.masked_fill(~valid, 0.0).sum()
    ce_rows = -log_q_full.gather(1, y.masked_fill(~valid, 0)[:, None]).squeeze(1)  # (N,)
    ce_sum = ce_rows.masked_fill(~valid, 0.0).sum()
    return (1.0 - alpha) * ce_sum + alpha * kd_sum, valid.sum(), {"ce": ce_sum, "kd": kd_sum}


def check_vocab(
    student_vocab_size: int,
    teacher_vocab_size: int,
    student_tokenizer=None,
    teacher_tokenizer=None,
) -> int:
    """Number of logit columns to compare between student and teacher heads.

    Heads are often padded past the tokenizer (Qwen2.5: 151,936 columns for the 0.5B-3B models, 152,064 for 7B
    and up, with the same 151,665-token tokenizer); the extra columns are never a real token, so the first
    min(V_student, V_teacher) columns are compared. Given both tokenizers, their ``get_vocab()`` must be equal
    and fit in those columns, else ProtegeError naming the first differing tokens: with different tokenizers,
    column i means different tokens, and token-level distillation would teach nonsense.
    """
    n = min(student_vocab_size, teacher_vocab_size)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if s_vocab != t_vocab:
            differ = [tok for tok in s_vocab.keys() | t_vocab.keys() if s_vocab.get(tok) != t_vocab.get(tok)]
            differ.sort(key=lambda tok: min(s_vocab.get(tok, math.inf), t_vocab.get(tok, math.inf)))
            shown = "; ".join(
                f"{tok!r}: student id {s_vocab.get(tok, 'none')}, teacher id {t_vocab.get(tok, 'none')}"
                for tok in differ[:5]
            )
            raise ProtegeError(
                f"The student and teacher tokenizers differ in {len(differ)} tokens ({shown}), so their logit "
                "columns stand for different tokens and cannot be compared one to one. Use `training.distill: "
                "topk` or `sequence`, or pick a student that shares the teacher's tokenizer."
            )
        top_id = max(s_vocab.values(), default=-1)
        if top_id >= n:
            raise ProtegeError(
                f"The tokenizer has token id {top_id}, but the smaller LM head has only {n} columns "
                f"(student {student_vocab_size}, teacher {teacher_vocab_size}); resize the head to the tokenizer "
                "(model.resize_token_embeddings) before distilling."
            )
    if student_vocab_size != teacher_vocab_size:
        log.info(
            "student head has %d logit columns and teacher head %d: comparing the first %d, the rest are padding",
            student_vocab_size, teacher_vocab_size, n,
        )
    return n


# ---------------------------------------------------------------------------------------------------------------
# The same loss over the LM heads, chunked so that the N x V logits are never all in memory.
# ---------------------------------------------------------------------------------------------------------------


def _divergence_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) divergence as in :func:`_divergence_rows`, and its (N, V) gradient w.r.t. the tempered student logits
    s = z / tau, in closed form (no autograd graph, so a chunk needs only a few (chunk, V) buffers):

        forward KL(p || q):  q - p
        reverse KL(q || p):  q * (a - KL),  a = log q - log p
        JSD_beta:            q * (g - sum_v q_v g_v),  g = (1 - beta)(log q - log m)   (d JSD / d q = g)

    Consumes its inputs: log_q and log_p are overwritten in place to keep the peak at ~3 (chunk, V) buffers.
    """
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        p = log_p.exp()
        rows = log_p.sub_(log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(-1)  # sum p (log p - log q), 0 log 0 = 0
        del log_p
        return rows, log_q.exp_().sub_(p)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        q = log_q.exp()
        a = log_q.sub_(log_p.clamp_min_(_LOG_FLOOR)).masked_fill_(q == 0, 0.0)  # (N, V) log q - log p
        del log_p
        rows = (q * a).sum(-1)
        return rows, q.mul_(a.sub_(rows[:, None]))
    log_m = log_p.clamp_min(_NEG).add_(math.log(beta))
    log_m = torch.logaddexp(log_m, log_q.clamp_min(_NEG).add_(math.log1p(-beta)), out=log_m)  # log(b p + (1-b) q)
    p = log_p.exp()
    kl_p = log_p.sub_(log_m).masked_fill_(p == 0, 0.0).mul_(p).sum(-1)
    del p, log_p
    q = log_q.exp()
    g = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)  # (N, V) log q - log m
    del log_m
    kl_q = (q * g).sum(-1)
    rows = beta * kl_p + (1.0 - beta) * kl_q
    return rows, q.mul_(g.sub_(kl_q[:, None]).mul_(1.0 - beta))


def _chunk_loss_and_grad(
    z: torch.Tensor,
    log_p: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    tau: float,
    divergence: str,
    beta: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of :func:`lm_distillation_loss` from the student's logits z (c, V) and the teacher's tempered
    log-probs (c, V), both fp32 and both consumed: CE sum, tau^2-scaled divergence sum, d loss / d z (c, V)."""
    y0 = y.masked_fill(~valid, 0)[:, None]  # (c, 1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
    ce_rows = (lse - z.gather(1, y0)).squeeze(1)  # (c,)  CE = logsumexp(z) - z_y
    log_q = z - lse if tau == 1.0 else F.log_softmax(z / tau, dim=-1)  # (c, V)
    kd_rows, grad = _divergence_and_grad(log_q, log_p, divergence, beta)
    del log_q, log_p
    ce_sum = ce_rows.masked_fill(~valid, 0.0).sum()
    kd_sum = tau**2 * kd_rows.masked_fill(~valid, 0.0).sum()
    if not need_grad:
        return ce_sum, kd_sum, None
    # d/dz = (1 - alpha)(softmax(z) - onehot(y)) + alpha tau^2 (1/tau) dD/ds
    grad.mul_(alpha * tau)
    if alpha != 1.0:  # alpha = 1 (soft targets only): skip two passes over (c, V)
        grad.add_(z.sub_(lse).exp_(), alpha=1.0 - alpha)  # z is spent: its buffer becomes softmax(z)
        grad.scatter_add_(1, y0, torch.full_like(ce_rows[:, None], alpha - 1.0))
    return ce_sum, kd_sum, grad.masked_fill_(~valid[:, None], 0.0)


def _chunk_terms(
    z: torch.Tensor,
    zt: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    tau: float,
    divergence: str,
    beta: float,
    need_grad: bool,
    need_colsum: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_chunk_loss_and_grad` written without in-place ops, from the raw student and teacher logits (c, V)
    in the model's dtype, for torch.compile: Inductor fuses the upcast, both log-softmaxes, the divergence, its
    gradient and the downcast into a few passes over the chunk, where eager PyTorch makes about twenty (on a GPU
    those passes, not the matmuls, set the time). Returns CE sum, tau^2-scaled divergence sum, d loss / d z in
    out_dtype (None without need_grad) and its column sums in fp32 for a bias (None without need_colsum)."""
    z, zt = z.float(), zt.float()
    y0 = y.masked_fill(~valid, 0)[:, None]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ce_rows = (lse - z.gather(1, y0)).squeeze(1)
    log_q = F.log_softmax(z / tau, dim=-1)
    log_p = F.log_softmax(zt / tau, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        p = log_p.exp()
        rows = torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)
        g = log_q.exp() - p
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        q = log_q.exp()
        a = torch.where(q == 0, 0.0, log_q - log_p.clamp_min(_LOG_FLOOR))
        rows = (q * a).sum(-1)
        g = q * (a - rows[:, None])
    else:
        log_m = torch.logaddexp(log_p.clamp_min(_NEG) + math.log(beta), log_q.clamp_min(_NEG) + math.log1p(-beta))
        p, q = log_p.exp(), log_q.exp()
        kl_p = torch.where(p == 0, 0.0, p * (log_p - log_m)).sum(-1)
        gq = torch.where(q == 0, 0.0, log_q - log_m)
        kl_q = (q * gq).sum(-1)
        rows = beta * kl_p + (1.0 - beta) * kl_q
        g = q * (gq - kl_q[:, None]) * (1.0 - beta)
    ce_sum = ce_rows.masked_fill(~valid, 0.0).sum()
    kd_sum = tau**2 * rows.masked_fill(~valid, 0.0).sum()
    if not need_grad:
        return ce_sum, kd_sum, None, None
    grad = g * (alpha * tau)
    if alpha != 1.0:
        onehot = torch.zeros_like(z).scatter_(1, y0, 1.0)
        grad = grad + (1.0 - alpha) * ((z - lse).exp() - onehot)
    grad = grad.masked_fill(~valid[:, None], 0.0)
    return ce_sum, kd_sum, grad.to(out_dtype), grad.sum(0) if need_colsum else None


_COMPILED: dict[str, object] = {}


def _compiled_chunk_terms():
    """torch.compile(_chunk_terms), built once per process. Inductor compiles once per alpha / tau / divergence
    (constants), and a second time when a chunk of another row count comes (the last one), then with the row
    count symbolic, so the varying token counts of a training's batches do not recompile."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_chunk_terms)
    return _COMPILED["fn"]


def _run_fused(fn, *args):
    """``fn(*args)``, or None once the compiled function has failed in this process (no working Triton, say): the
    eager path takes over, with one warning that says why. Running out of memory is not a compile failure and is
    raised as it is."""
    if "failed" in _COMPILED:
        return None
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001  dynamo and Inductor raise many types; the eager path gives the same values
        _COMPILED["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
        log.warning("the LM-head loss could not be compiled (%s); it runs eager for the rest of this process: the "
                    "same values, in more time", _COMPILED["failed"])
        return None


class _ChunkedLMDistillation(torch.autograd.Function):
    """Forward computes the loss and all student gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, y, valid, opts):
        alpha, tau, divergence, beta, chunk_size, need, fuse = opts
        n_cols = min(s_weight.shape[0], t_weight.shape[0])  # extra columns on either side are padding
        ws, wt = s_weight[:n_cols], t_weight[:n_cols]  # row slices: views, no copy
        bs = s_bias[:n_cols] if s_bias is not None else None
        bt = t_bias[:n_cols] if t_bias is not None else None
        need_h, need_w, need_b = need
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        # fp32 accumulators: summing a bf16 weight gradient chunk by chunk would round at every chunk
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=torch.float32, device=s_bias.device) if need_b else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, s_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = s_hidden[rows]  # (c, Hs)
            z = h @ ws.T if bs is None else torch.addmm(bs, h, ws.T)  # (c, V), the model's dtype
            zt = t_hidden[rows] @ wt.T if bt is None else torch.addmm(bt, t_hidden[rows], wt.T)
            fused = None if fuse is None else _run_fused(
                fuse, z, zt, y[rows], valid[rows], alpha, tau, divergence, beta, any(need), need_b, s_hidden.dtype
            )
            if fused is not None:
                ce, kd, g_lp, g_sum = fused
                del z, zt
            else:
                log_p = F.log_softmax(zt.float().div_(tau), dim=-1)  # (c, V)
                del zt
                ce, kd, g = _chunk_loss_and_grad(z.float(), log_p, y[rows], valid[rows], alpha, tau, divergence, beta,
                                                 any(need))
                del z, log_p  # the chunk's buffers go before the gradient matmuls allocate theirs
                g_sum = g.sum(0) if g is not None and need_b else None
                g_lp = g.to(s_hidden.dtype) if g is not None else None  # matmuls in the model's dtype, as autograd
                del g
            ce_sum += ce
            kd_sum += kd
            if g_lp is None:
                continue
            if need_b:
                grad_b[:n_cols] += g_sum
            if need_h:
                grad_h[rows] = g_lp @ ws  # (c, Hs)
            if need_w:
                # masked rows have g = 0, but a NaN hidden state there would still poison 0 * NaN
                h = h.masked_fill(~valid[rows, None], 0)
                grad_w[:n_cols] += g_lp.T @ h  # (V, Hs)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_weight.dtype, s_bias.dtype if s_bias is not None else None)
        ctx.scaled = False
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return (1.0 - alpha) * ce_sum + alpha * kd_sum, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if ctx.scaled:
            raise RuntimeError("chunked_lm_distillation_loss takes one backward pass per forward: its gradients are "
                               "computed in the forward pass and scaled in place by the first backward")
        ctx.scaled = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # in place: a scaled copy of the fp32 weight gradient (V x Hs) would be the step's peak allocation
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_lm_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`lm_distillation_loss` over the LM heads, without ever holding all N x V logits.

    Equal in value and gradients to ``lm_distillation_loss(student_hidden @ student_weight.T (+ student_bias),
    teacher_hidden @ teacher_weight.T (+ teacher_bias), targets, mask, ...)`` on the first min(V, V') columns
    (check_vocab: a teacher head padded to V' > V is compared on the student's V columns; the student's weight
    rows past V', if any, get zero gradient). Like Liger-Kernel's fused linear losses, the forward pass walks
    chunk_size tokens at a time: the chunk's student and teacher logits (fp32), the loss, and the gradient of
    the loss w.r.t. the chunk's logits in closed form; from it, the gradient for the chunk's hidden states and
    the running gradient of the student's weight and bias. Only those gradients are kept (N x Hs, and V x Hs /
    V in fp32), and backward scales them by the incoming gradient. Peak memory beyond them is a few
    chunk_size x V fp32 buffers. The teacher gets no gradient; neither do targets or mask.

    compile: the per-chunk arithmetic between the matmuls through torch.compile (fused into a few passes;
    the first call of each chunk shape compiles) or eager, in place. None (default): compiled on a CUDA device,
    where those passes cost more than the matmuls, eager elsewhere.

    Shapes: student_hidden (N, Hs); student_weight (V, Hs); teacher_hidden (N, Ht); teacher_weight (V', Ht);
    biases (V,), (V',) or None; targets (N,) with -100 = ignore; mask (N,) or None ((B, T, ...) is flattened).
    Returns (loss sum, token count, {"ce": CE sum, "kd": tau^2-scaled divergence sum}); the parts are for
    logging and carry no gradient. All masked: (0, 0) and zero gradients.
    """
    _check_args(divergence, beta, temperature, alpha)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, Hs)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(hs.device).detach()  # (N, Ht)
    if hs.shape[0] != ht.shape[0] or hs.shape[1] != student_weight.shape[1] or ht.shape[1] != teacher_weight.shape[1]:
        raise ValueError(
            f"shapes do not line up: student hidden {tuple(hs.shape)} with weight {tuple(student_weight.shape)}, "
            f"teacher hidden {tuple(ht.shape)} with weight {tuple(teacher_weight.shape)}"
        )
    y = targets.reshape(-1).to(hs.device)
    valid = _valid_rows(hs.shape[0], hs.device, mask, y)
    n_cols = min(student_weight.shape[0], teacher_weight.shape[0])
    if valid.any() and int(y[valid].max()) >= n_cols:
        raise ValueError(f"a target id ({int(y[valid].max())}) is past the {n_cols} logit columns compared")
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hs.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    if compile is None:
        compile = hs.is_cuda
    opts = (alpha, temperature, divergence, beta, chunk_size, need, _compiled_chunk_terms() if compile else None)
    loss, ce_sum, kd_sum = _ChunkedLMDistillation.apply(
        hs, student_weight, student_bias, ht, teacher_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None, y, valid, opts,
    )
    return loss, valid.sum(), {"ce": ce_sum, "kd": kd_sum}
