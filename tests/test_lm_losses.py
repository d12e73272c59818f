"""Token-level LM distillation losses: zero on identical inputs, independent references (torch.distributions,
a float64 numpy JSD), beta limits, hand-computed values, masking, -inf padding, the top-k tail bucket, the
chunked loss against the plain one in values and gradients, normalisation across micro-batches, check_vocab."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from protege.errors import ProtegeError
from protege.training.losses import (
    check_vocab,
    chunked_lm_distillation_loss,
    lm_distillation_loss,
    token_divergence,
    topk_distillation_loss,
)

DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def _logits(n=6, v=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def _close(actual, expected, rel):
    """Max abs difference within rel of the reference's largest magnitude (elementwise rtol is meaningless for
    gradient entries near 0)."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = (actual.detach().float() - expected.detach().float()).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} vs allowed {rel * scale:.3g}"


# --- token_divergence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_identical_inputs_give_zero(divergence, beta, tau):
    s, t = _logits()
    total, n = token_divergence(t, t, divergence=divergence, temperature=tau, beta=beta)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert n.item() == 6
    other, _ = token_divergence(s, t, divergence=divergence, temperature=tau, beta=beta)
    assert other.item() > 1e-2


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kls_match_torch_distributions(tau):
    s, t = _logits(seed=1)
    p = Categorical(logits=t.double() / tau)  # teacher
    q = Categorical(logits=s.double() / tau)  # student
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    fwd, n = token_divergence(s, t, mask, divergence="forward_kl", temperature=tau)
    rev, _ = token_divergence(s, t, mask, divergence="reverse_kl", temperature=tau)
    assert n.item() == 4
    assert fwd.item() == pytest.approx(kl_divergence(p, q)[mask].sum().item(), rel=1e-5)
    assert rev.item() == pytest.approx(kl_divergence(q, p)[mask].sum().item(), rel=1e-5)
    assert abs(fwd.item() - rev.item()) > 1e-3  # the two directions really differ here


def _jsd_numpy(s, t, beta, tau):
    """Generalized JSD written out in float64 numpy, mixture in probability space."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(t.numpy().astype(np.float64) / tau), softmax(s.numpy().astype(np.float64) / tau)
    m = beta * p + (1 - beta) * q
    return float((beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)).sum())


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_jsd_matches_numpy_reference(beta, tau):
    s, t = _logits(seed=2)
    total, _ = token_divergence(s, t, divergence="jsd", temperature=tau, beta=beta)
    assert total.item() == pytest.approx(_jsd_numpy(s, t, beta, tau), rel=1e-5)


def test_jsd_beta_limits():
    """beta = 0 is exactly forward KL(p || q), beta = 1 exactly reverse KL(q || p) (TRL's convention); close to
    the ends JSD_beta ~ beta * KL(p || q) and (1 - beta) * KL(q || p)."""
    s, t = _logits(seed=3)
    fwd, _ = token_divergence(s, t, divergence="forward_kl")
    rev, _ = token_divergence(s, t, divergence="reverse_kl")
    j0, _ = token_divergence(s, t, divergence="jsd", beta=0.0)
    j1, _ = token_divergence(s, t, divergence="jsd", beta=1.0)
    assert j0.item() == fwd.item() and j1.item() == rev.item()
    assert math.isfinite(j0.item()) and math.isfinite(j1.item())
    eps = 1e-3
    near0, _ = token_divergence(s, t, divergence="jsd", beta=eps)
    near1, _ = token_divergence(s, t, divergence="jsd", beta=1 - eps)
    assert near0.item() / eps == pytest.approx(fwd.item(), rel=2e-2)
    assert near1.item() / eps == pytest.approx(rev.item(), rel=2e-2)


def test_pinned_values_three_token_vocab():
    # teacher p = [.7, .2, .1], student uniform q = [1/3] * 3
    t = torch.tensor([[0.7, 0.2, 0.1]]).log()
    s = torch.zeros(1, 3)
    fwd, _ = token_divergence(s, t, divergence="forward_kl")  # .7 ln 2.1 + .2 ln .6 + .1 ln .3
    rev, _ = token_divergence(s, t, divergence="reverse_kl")  # (ln(1/2.1) + ln(1/.6) + ln(1/.3)) / 3
    jsd, _ = token_divergence(s, t, divergence="jsd", beta=0.5)  # m = [.51667, .26667, .21667]
    assert fwd.item() == pytest.approx(0.296794, abs=1e-5)
    assert rev.item() == pytest.approx(0.324287, abs=1e-5)
    assert jsd.item() == pytest.approx(0.074806, abs=1e-5)
    # full loss, target token 0: 0.5 * CE (ln 3) + 0.5 * 1^2 * KL
    loss, n, parts = lm_distillation_loss(s, t, torch.tensor([0]), alpha=0.5, temperature=1.0)
    assert parts["ce"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert loss.item() == pytest.approx(0.697703, abs=1e-5)
    assert n.item() == 1


def test_tau_squared_scaling():
    s, t = _logits(seed=4)
    y = torch.zeros(6, dtype=torch.long)
    _, _, parts = lm_distillation_loss(s, t, y, alpha=1.0, temperature=3.0, divergence="reverse_kl")
    raw, _ = token_divergence(s, t, divergence="reverse_kl", temperature=3.0)
    assert parts["kd"].item() == pytest.approx(9.0 * raw.item(), rel=1e-6)


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_all_masked_gives_zero_and_zero_grads(divergence, beta):
    s, t = _logits()
    s = s.clone().requires_grad_(True)
    t_pad = t.clone()
    t_pad[0] = float("-inf")  # a padding row of all -inf, masked
    none = torch.zeros(6, dtype=torch.bool)
    total, n = token_divergence(s, t_pad, none, divergence=divergence, beta=beta)
    assert (total.item(), n.item()) == (0.0, 0)
    total.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # targets of -100 count as masked too
    y = torch.full((6,), -100)
    loss, n, parts = lm_distillation_loss(s, t_pad, y, alpha=0.5, temperature=2.0, divergence=divergence, beta=beta)
    assert (loss.item(), n.item(), parts["ce"].item(), parts["kd"].item()) == (0.0, 0, 0.0, 0.0)


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_minus_inf_padding_is_finite(divergence, beta):
    """A teacher whose padded vocabulary ids sit at -inf, plus a masked padding row of all -inf: finite loss and
    gradients, and the masked row contributes nothing."""
    s, t = _logits(v=10, seed=5)
    t[:, 7:] = float("-inf")
    t[5] = float("-inf")
    s = s.requires_grad_(True)
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    loss, n, _ = lm_distillation_loss(s, t, y, mask, alpha=0.5, temperature=2.0, divergence=divergence, beta=beta)
    loss.backward()
    assert n.item() == 5 and math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and torch.equal(s.grad[5], torch.zeros(10))
    # where the student pads the same ids, the padded columns contribute exactly 0 (0 log 0 = 0)
    s_pad = s.detach().clone()
    s_pad[:, 7:] = float("-inf")
    total, _ = token_divergence(s_pad, t, mask, divergence=divergence, beta=beta)
    trimmed, _ = token_divergence(s_pad[:, :7], t[:, :7], mask, divergence=divergence, beta=beta)
    assert total.item() == pytest.approx(trimmed.item(), rel=1e-6)
    if divergence == "forward_kl":  # the reference handles zero teacher probabilities the same way
        p, q = Categorical(logits=t[:5].double()), Categorical(logits=s.detach()[:5].double())
        fwd, _ = token_divergence(s.detach(), t, mask)
        assert fwd.item() == pytest.approx(kl_divergence(p, q).sum().item(), rel=1e-5)


def test_vocab_mismatch_raises():
    with pytest.raises(ValueError, match="check_vocab"):
        token_divergence(torch.zeros(2, 5), torch.zeros(2, 6))


# --- top-k ------------------------------------------------------------------------------------------------------


def test_topk_at_full_vocab_equals_full_forward_kl():
    s, t = _logits(n=5, v=8, seed=6)
    s = s.requires_grad_(True)
    y = torch.tensor([1, 2, 3, -100, 5])
    ids = torch.randperm(8).repeat(5, 1)  # every token, in some order
    lp = torch.log_softmax(t, -1).gather(1, ids)
    loss_k, n_k, parts_k = topk_distillation_loss(s, ids, lp, y, alpha=0.6, temperature=1.0)
    (g_k,) = torch.autograd.grad(loss_k, s)
    loss, n, parts = lm_distillation_loss(s, t, y, alpha=0.6, temperature=1.0)
    (g,) = torch.autograd.grad(loss, s)
    assert n_k.item() == n.item() == 4
    assert parts_k["kd"].item() == pytest.approx(parts["kd"].item(), rel=1e-5)
    assert loss_k.item() == pytest.approx(loss.item(), rel=1e-5)
    _close(g_k, g, 1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_identical_inputs_give_zero(tau):
    s, _ = _logits(n=4, v=12, seed=7)
    lp_full = torch.log_softmax(s, -1)
    lp, ids = lp_full.topk(3, dim=-1)
    ids[0, 2], lp[0, 2] = -1, 0.0  # an empty slot: its mass is part of the tail
    y = torch.tensor([0, 1, 2, 3])
    _, _, parts = topk_distillation_loss(s, ids, lp, y, alpha=0.5, temperature=tau)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    _, _, other = topk_distillation_loss(torch.zeros_like(s), ids, lp, y, alpha=0.5, temperature=tau)
    assert other["kd"].item() > 1e-3


def test_topk_pinned_tail_values():
    # V = 4, teacher top-2 [.5, .3] (tail .2), one empty slot; student uniform: buckets [.25, .25, .5]
    s = torch.zeros(1, 4)
    ids = torch.tensor([[2, 0, -1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.3), 0.0]])
    y = torch.tensor([1])
    _, _, p1 = topk_distillation_loss(s, ids, lp, y, alpha=0.5, temperature=1.0)
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert kl1 == pytest.approx(0.218012, abs=1e-6)
    assert p1["kd"].item() == pytest.approx(kl1, abs=1e-6)
    # tau = 2: known p_i -> sqrt(p_i); tail .2 over R = 2 tokens -> 2 * sqrt(.1); renormalize. The uniform
    # student stays [.25, .25, .5] under the same rule.
    w = [math.sqrt(0.5), math.sqrt(0.3), 2 * math.sqrt(0.1)]
    P = [x / sum(w) for x in w]
    kl2 = sum(a * math.log(a / b) for a, b in zip(P, [0.25, 0.25, 0.5]))
    assert kl2 == pytest.approx(0.060784, abs=1e-6)
    _, _, p2 = topk_distillation_loss(s, ids, lp, y, alpha=0.5, temperature=2.0)
    assert p2["kd"].item() == pytest.approx(4.0 * kl2, abs=1e-5)  # tau^2 applied


def test_topk_all_masked():
    s = torch.randn(3, 6).requires_grad_(True)
    ids = torch.full((3, 2), -1)
    lp = torch.full((3, 2), float("-inf"))
    loss, n, parts = topk_distillation_loss(s, ids, lp, torch.full((3,), -100), alpha=0.5, temperature=2.0)
    loss.backward()
    assert (loss.item(), n.item(), parts["kd"].item()) == (0.0, 0, 0.0)
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_topk_divergences_at_full_vocab_equal_the_full_ones(divergence, beta):
    """On-policy from a served teacher: reverse KL / JSD on top-k + tail buckets; with every token known (no
    tail) they are the full-vocabulary divergences, in values and gradients."""
    s, t = _logits(n=5, v=8, seed=11)
    s = s.requires_grad_(True)
    y = torch.tensor([1, 2, 3, -100, 5])
    ids = torch.randperm(8).repeat(5, 1)
    lp = torch.log_softmax(t, -1).gather(1, ids)
    loss_k, _, parts_k = topk_distillation_loss(s, ids, lp, y, alpha=1.0, temperature=1.0, divergence=divergence,
                                                beta=beta)
    (g_k,) = torch.autograd.grad(loss_k, s)
    loss, _, parts = lm_distillation_loss(s, t, y, alpha=1.0, temperature=1.0, divergence=divergence, beta=beta)
    (g,) = torch.autograd.grad(loss, s)
    assert parts_k["kd"].item() == pytest.approx(parts["kd"].item(), rel=1e-5, abs=1e-7)
    _close(g_k, g, 1e-5)


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_topk_divergences_identical_give_zero_and_pinned_reverse_kl(divergence, beta):
    s, _ = _logits(n=4, v=12, seed=7)
    lp, ids = torch.log_softmax(s, -1).topk(3, dim=-1)
    y = torch.tensor([0, 1, 2, 3])
    _, _, parts = topk_distillation_loss(s, ids, lp, y, alpha=1.0, temperature=1.0, divergence=divergence, beta=beta)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    # V = 4, teacher top-2 [.5, .3] (tail .2); student uniform, buckets [.25, .25, .5]: KL(q || p) by hand
    _, _, p1 = topk_distillation_loss(torch.zeros(1, 4), torch.tensor([[2, 0]]), torch.tensor([[math.log(0.5),
                                      math.log(0.3)]]), torch.tensor([1]), alpha=1.0, temperature=1.0,
                                      divergence="reverse_kl")
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.2)
    assert p1["kd"].item() == pytest.approx(rkl, abs=1e-6)


# --- chunked ----------------------------------------------------------------------------------------------------


def _heads(n=29, hs=16, ht=24, v=40, v_t=48, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    x = {
        "student_hidden": r(n, hs).to(dtype).requires_grad_(True),
        "student_weight": (r(v, hs) * hs**-0.5).to(dtype).requires_grad_(True),
        "teacher_hidden": r(n, ht).to(dtype),
        "teacher_weight": (r(v_t, ht) * 2 * ht**-0.5).to(dtype),
    }
    if bias:
        x["student_bias"] = (r(v) * 0.1).to(dtype).requires_grad_(True)
        x["teacher_bias"] = (r(v_t) * 0.1).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[[0, 5, 6]] = False
    return x, y, mask


def _plain(x, y, mask, **kw):
    """The materialized reference: both heads as nn.Linear computes them, teacher cut to the student's V."""
    v = x["student_weight"].shape[0]
    zs = F.linear(x["student_hidden"], x["student_weight"], x.get("student_bias"))  # (N, V)
    zt = F.linear(x["teacher_hidden"], x["teacher_weight"], x.get("teacher_bias"))[:, :v]  # padded head: first V
    return lm_distillation_loss(zs, zt, y, mask, **kw)


def _grads(x, loss):
    keys = [k for k in ("student_hidden", "student_weight", "student_bias") if k in x]
    return dict(zip(keys, torch.autograd.grad(loss, [x[k] for k in keys])))


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("chunk_size", [1, 8, 29, 64])  # 8 does not divide 29; 64 > N
def test_chunked_equals_plain_fp32(divergence, beta, chunk_size):
    x, y, mask = _heads()
    kw = {"alpha": 0.7, "temperature": 2.0, "divergence": divergence, "beta": beta}
    loss, n, parts = _plain(x, y, mask, **kw)
    g = _grads(x, loss)
    loss_c, n_c, parts_c = chunked_lm_distillation_loss(**x, targets=y, mask=mask, chunk_size=chunk_size, **kw)
    g_c = _grads(x, loss_c)
    assert n_c.item() == n.item() == 25
    for got, want in [(loss_c, loss), (parts_c["ce"], parts["ce"]), (parts_c["kd"], parts["kd"])]:
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for k in g:
        _close(g_c[k], g[k], 1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])  # hard labels only, mixed, soft targets only
def test_chunked_equals_plain_tau1_no_bias(alpha):
    x, y, mask = _heads(bias=False, seed=1)
    loss, _, _ = _plain(x, y, mask, alpha=alpha, temperature=1.0)
    g = _grads(x, loss)
    loss_c, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, alpha=alpha, temperature=1.0, chunk_size=7)
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-5)
    for k, v in _grads(x, loss_c).items():
        _close(v, g[k], 1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_equals_plain_bf16(divergence):
    x, y, mask = _heads(n=33, v=64, v_t=72, dtype=torch.bfloat16, seed=2)
    kw = {"alpha": 0.9, "temperature": 2.0, "divergence": divergence}
    loss, _, _ = _plain(x, y, mask, **kw)
    g = _grads(x, loss)
    loss_c, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, chunk_size=10, **kw)
    g_c = _grads(x, loss_c)
    assert loss_c.dtype == torch.float32
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-2)
    for k in g:
        assert g_c[k].dtype == torch.bfloat16
        _close(g_c[k], g[k], 1e-2)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
@pytest.mark.parametrize("alpha,dtype", [(0.0, torch.float32), (0.7, torch.float32), (1.0, torch.float32),
                                         (0.7, torch.bfloat16)])
def test_chunked_fused_path_equals_plain(monkeypatch, divergence, beta, alpha, dtype):
    """The path CUDA takes (the chunk's arithmetic as one function for torch.compile), run eagerly here: the same
    values and gradients as the materialized loss, masked rows, -100 targets, a padded teacher head and a bias."""
    from protege.training import losses

    monkeypatch.setattr(losses, "_compiled_chunk_terms", lambda: losses._chunk_terms)
    x, y, mask = _heads(dtype=dtype, seed=5)
    x["student_hidden"].data[0] = float("nan")  # a masked row's garbage must not leak through the fused path
    kw = {"alpha": alpha, "temperature": 2.0, "divergence": divergence, "beta": beta}
    clean = dict(x, student_hidden=x["student_hidden"].detach().nan_to_num(0.0).requires_grad_(True))
    loss, n, parts = _plain(clean, y, mask, **kw)
    g = _grads(clean, loss)
    loss_c, n_c, parts_c = chunked_lm_distillation_loss(**x, targets=y, mask=mask, chunk_size=8, compile=True, **kw)
    g_c = _grads(x, loss_c)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert n_c.item() == n.item() == 25
    for got, want in [(loss_c, loss), (parts_c["ce"], parts["ce"]), (parts_c["kd"], parts["kd"])]:
        assert got.item() == pytest.approx(want.item(), rel=tol, abs=tol)
    for k in g:
        assert g_c[k].dtype == dtype
        _close(g_c[k].float(), g[k].float(), tol)


def test_chunked_compiled_equals_eager():
    """torch.compile of the chunk's arithmetic (Inductor's C++ backend here, Triton on CUDA) against the eager
    in-place path: chunks of 8 over 29 rows (a last chunk of 5: a second compile with a symbolic row count), then
    another token count that must not need a third."""
    x, y, mask = _heads(seed=6)
    kw = {"alpha": 0.6, "temperature": 2.0, "divergence": "jsd", "beta": 0.3, "chunk_size": 8}
    for n in (29, 21):
        xs = dict(x, student_hidden=x["student_hidden"][:n], teacher_hidden=x["teacher_hidden"][:n])
        eager, _, _ = chunked_lm_distillation_loss(**xs, targets=y[:n], mask=mask[:n], compile=False, **kw)
        fused, _, _ = chunked_lm_distillation_loss(**xs, targets=y[:n], mask=mask[:n], compile=True, **kw)
        assert fused.item() == pytest.approx(eager.item(), rel=1e-5)
        g_e, g_f = _grads(x, eager), _grads(x, fused)
        for k in g_e:
            _close(g_f[k], g_e[k], 1e-5)


def test_chunked_falls_back_to_eager_once_compiling_fails(monkeypatch, caplog):
    """A machine where torch.compile cannot build (no working Triton, say): one warning naming why, then the eager
    path for the rest of the process, with the same values; the failing function is not tried again."""
    from protege.training import losses

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(losses, "_COMPILED", {"fn": broken})
    x, y, mask = _heads(seed=8)
    kw = {"alpha": 0.5, "temperature": 2.0, "chunk_size": 8}
    eager, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, compile=False, **kw)
    with caplog.at_level(logging.WARNING, logger="protege.training.losses"):
        fused, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, compile=True, **kw)
        again, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, compile=True, **kw)
    assert fused.item() == again.item() == eager.item()
    assert len(calls) == 1
    warned = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: Cannot find a working triton installation" in warned[0]


def test_chunked_all_masked_and_no_teacher_grad():
    x, y, _ = _heads()
    x["teacher_weight"].requires_grad_(True)
    x["student_hidden"].data[:3] = float("nan")  # garbage in masked rows must not leak
    none = torch.zeros(len(y), dtype=torch.bool)
    loss, n, parts = chunked_lm_distillation_loss(**x, targets=y, mask=none, alpha=0.5, temperature=2.0, chunk_size=8)
    loss.backward()
    assert (loss.item(), n.item(), parts["ce"].item(), parts["kd"].item()) == (0.0, 0, 0.0, 0.0)
    for k in ("student_hidden", "student_weight", "student_bias"):
        assert torch.equal(x[k].grad, torch.zeros_like(x[k]))
    assert x["teacher_weight"].grad is None
    with torch.no_grad():  # evaluation: value only
        val, _, _ = chunked_lm_distillation_loss(**x, targets=y, alpha=0.5, temperature=2.0)
    assert math.isnan(val.item())  # the NaN rows are unmasked now: garbage is reported, not hidden


def test_gradient_accumulation_normalizes_once():
    """Two micro-batches with different token counts: sum the (sum, count) pairs, divide once, and the loss and
    the accumulated gradients equal those of the whole batch."""
    x, y, mask = _heads(n=30, seed=3)
    mask[:12] = False  # first half has 3 tokens, second 15: a mean of the two means would be wrong
    kw = {"alpha": 0.5, "temperature": 2.0, "divergence": "jsd"}
    full, n_full, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, chunk_size=4, **kw)
    g_full = _grads(x, full / n_full)
    halves = [slice(0, 15), slice(15, 30)]
    parts = []
    for h in halves:
        xh = dict(x, student_hidden=x["student_hidden"][h], teacher_hidden=x["teacher_hidden"][h])
        parts.append(chunked_lm_distillation_loss(**xh, targets=y[h], mask=mask[h], chunk_size=4, **kw)[:2])
    total = sum(c for _, c in parts)
    assert [c.item() for _, c in parts] == [3, 15] and total.item() == n_full.item()
    assert (sum(s for s, _ in parts) / total).item() == pytest.approx((full / n_full).item(), rel=1e-6)
    for s, _ in parts:
        (s / total).backward()  # the loop's accumulation: each micro-batch divided by the whole batch's count
    for k, g in g_full.items():
        _close(x[k].grad, g, 1e-5)
    # the plain loss normalises the same way
    plain_parts = [_plain({**x, "student_hidden": x["student_hidden"][h], "teacher_hidden": x["teacher_hidden"][h]},
                          y[h], mask[h], **kw)[:2] for h in halves]
    plain = sum(s for s, _ in plain_parts) / sum(c for _, c in plain_parts)
    assert plain.item() == pytest.approx((full / n_full).item(), rel=1e-5)


def test_chunked_refuses_a_second_backward():
    """Its gradients are scaled in place by the first backward; a second one (retain_graph) would scale them again,
    so it is refused rather than silently wrong."""
    x, y, mask = _heads(seed=7)
    loss, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, alpha=0.5, temperature=2.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


def test_chunked_scales_by_grad_output():
    x, y, mask = _heads(seed=4)
    loss, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, alpha=0.5, temperature=2.0)
    g1 = _grads(x, loss)
    loss, _, _ = chunked_lm_distillation_loss(**x, targets=y, mask=mask, alpha=0.5, temperature=2.0)
    g3 = _grads(x, -3.0 * loss)
    for k in g1:
        _close(g3[k], -3.0 * g1[k], 1e-6)


# --- check_vocab ------------------------------------------------------------------------------------------------


def _tokenizer(words):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))


def test_check_vocab_padded_heads_same_tokenizer(caplog):
    words = ["<unk>", "the", "cat", "sat"]
    with caplog.at_level(logging.INFO, logger="protege.training.losses"):
        assert check_vocab(6, 8, _tokenizer(words), _tokenizer(list(words))) == 6
    assert "first 6" in caplog.text
    assert check_vocab(151_936, 152_064) == 151_936  # Qwen2.5 0.5B vs 7B heads, tokenizers not given
    assert check_vocab(50, 50) == 50


def test_check_vocab_different_tokenizers_refused():
    student = _tokenizer(["<unk>", "the", "cat", "sat"])
    teacher = _tokenizer(["<unk>", "the", "dog", "sat", "mat"])
    with pytest.raises(ProtegeError) as err:
        check_vocab(8, 8, student, teacher)
    msg = str(err.value)
    assert "'cat': student id 2, teacher id none" in msg and "'dog'" in msg
    assert "training.distill: topk" in msg and "sequence" in msg
    with pytest.raises(ProtegeError, match="token id 3"):  # the tokenizer does not fit the smaller head
        check_vocab(3, 8, student, _tokenizer(["<unk>", "the", "cat", "sat"]))
