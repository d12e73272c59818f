"""The distillation loss: zero on identical inputs, equal to F.kl_div, pinned values, masking, tau^2 scaling,
and sums/counts that normalise once across micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protege.training.losses import distillation_loss, forward_kl, logit_mse


def _rand(n=6, c=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * scale).requires_grad_(True)
    t = torch.softmax(torch.randn(n, c, generator=g) * scale, -1)
    return s, t


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_identical_distributions_give_zero(tau):
    _, t = _rand()
    kl, n = forward_kl(t.log(), t, temperature=tau)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert n.item() == 6
    # and a different student gives a strictly positive KL
    kl_other, _ = forward_kl(torch.zeros_like(t), t, temperature=tau)
    assert kl_other.item() > 1e-3


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_matches_torch_kl_div(tau):
    s, t = _rand(seed=1)
    kl, n = forward_kl(s, t, None, tau)
    ref = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t.log() / tau, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(kl, ref)
    assert n.item() == 6

    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    kl_m, n_m = forward_kl(s, t, mask, tau)
    ref_m = F.kl_div(
        F.log_softmax(s[mask] / tau, -1), F.log_softmax(t[mask].log() / tau, -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(kl_m, ref_m)
    assert n_m.item() == 4
    assert kl_m.item() < kl.item()  # the masked rows really were left out


def test_pinned_kl_value():
    # q = [.5, .5], p = [.8, .2]: KL = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5)
    kl, n = forward_kl(torch.zeros(1, 2), torch.tensor([[0.8, 0.2]]))
    expected = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert expected == pytest.approx(0.19274, abs=1e-5)
    assert kl.item() == pytest.approx(expected, abs=1e-5)
    assert n.item() == 1


def test_pinned_distillation_value():
    # alpha 0.5, tau 2. Teacher [0.8, 0.2] re-tempered: softmax(log p / 2) ∝ [sqrt(.8), sqrt(.2)] = [2/3, 1/3].
    # Student logits [1, 0]: at tau 1 q = softmax([1, 0]); at tau 2 q = softmax([.5, 0]).
    loss, n, parts = distillation_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.2]]), torch.tensor([1]), alpha=0.5, temperature=2.0
    )
    ce = -math.log(1.0 / (1.0 + math.e))  # target class 1 has logit 0
    q1 = math.exp(0.5) / (math.exp(0.5) + 1.0)
    q2 = 1.0 - q1
    kl = (2 / 3) * math.log((2 / 3) / q1) + (1 / 3) * math.log((1 / 3) / q2)
    assert n.item() == 1
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert parts["kd"].item() == pytest.approx(4.0 * kl, abs=1e-5)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * 4.0 * kl, abs=1e-5)


def test_logit_mse_is_zero_for_the_teachers_logits_shifted_and_pinned_otherwise():
    _, t = _rand(seed=2)
    # the teacher's log-probabilities plus any per-row constant are its logits: distance 0
    shifted = t.log() + torch.arange(6.0)[:, None]
    d, n = logit_mse(shifted, t)
    assert d.item() == pytest.approx(0.0, abs=1e-8) and n.item() == 6
    # student [1, 0] against teacher [0.8, 0.2]: centred, [0.5, -0.5] against [ln 2, -ln 2]
    d, _ = logit_mse(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.2]]))
    assert d.item() == pytest.approx(2 * (0.5 - math.log(2.0)) ** 2, abs=1e-6)
    # through distillation_loss: the soft term, with no temperature and no tau^2
    loss, n, parts = distillation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.2]]), torch.tensor([1]),
                                       alpha=1.0, temperature=4.0, soft="logit_mse")
    assert parts["kd"].item() == pytest.approx(d.item(), abs=1e-6) and loss.item() == pytest.approx(d.item())
    with pytest.raises(ValueError, match="soft must be one of"):
        distillation_loss(torch.zeros(1, 2), torch.tensor([[0.8, 0.2]]), torch.tensor([1]), 1.0, 1.0, soft="mse")


def test_logit_mse_floors_a_zero_teacher_probability():
    # a one-hot teacher (a sampling or hard-label answer): the margin asked for is ln(1 / 1e-4), not 69 nats
    d, _ = logit_mse(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]))
    margin = math.log(1e4)
    centred = torch.tensor([2 * margin / 3, -margin / 3, -margin / 3])
    assert d.item() == pytest.approx(float(centred.square().sum()), rel=1e-5)
    assert d.item() < 60  # at a floor of 1e-30 it was above 3,000


def test_logit_mse_keeps_pulling_where_the_kl_has_stopped():
    # the student already picks the teacher's label at its confidence, but at ten times its margin: KL's gradient
    # (q - p) is nearly 0 at the teacher's side of the margin only; the logit distance's grows with the gap
    t = torch.tensor([[0.9, 0.1]])
    z = (t.log() * 10).requires_grad_(True)
    logit_mse(z, t)[0].backward()
    g_mse = z.grad.abs().sum().item()
    z.grad = None
    forward_kl(z, t)[0].backward()
    assert g_mse > 10 * z.grad.abs().sum().item()


def test_zero_teacher_probabilities_stay_finite():
    t = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4])
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for tau in (1.0, 2.0):
        kl, _ = forward_kl(s, t, None, tau)
        (g,) = torch.autograd.grad(kl, s)
        assert torch.isfinite(kl) and kl.item() >= 0.0 and torch.isfinite(g).all()
    loss, _, _ = distillation_loss(s, t, torch.tensor([0, 1, 2]), 0.7, 2.0)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # a one-hot teacher at tau 1 gives the cross-entropy with that class
    kl1, _ = forward_kl(s[:1], t[:1])
    torch.testing.assert_close(kl1, F.cross_entropy(s[:1], torch.tensor([0]), reduction="sum"))


def test_all_masked_batch_gives_zero_not_nan():
    s, t = _rand(seed=2)
    none = torch.zeros(6, dtype=torch.bool)
    kl, n_kl = forward_kl(s, t, none, 2.0)
    assert kl.item() == 0.0 and n_kl.item() == 0
    loss, n, parts = distillation_loss(s, t, torch.zeros(6, dtype=torch.long), 0.5, 2.0, none)
    assert loss.item() == 0.0 and n.item() == 0
    assert parts["ce"].item() == 0.0 and parts["kd"].item() == 0.0
    (g,) = torch.autograd.grad(loss / n.clamp_min(1), s)
    assert torch.isfinite(g).all() and g.abs().sum().item() == 0.0


def test_masked_rows_get_no_gradient():
    s, t = _rand(seed=6)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    loss, n, _ = distillation_loss(s, t, torch.arange(6) % 5, 0.5, 2.0, mask)
    (g,) = torch.autograd.grad(loss, s)
    assert n.item() == 4
    assert g[~mask].abs().sum().item() == 0.0
    assert (g[mask].abs().sum(-1) > 0).all()


def test_alpha_endpoints():
    s, t = _rand(seed=3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss0, _, _ = distillation_loss(s, t, y, 0.0, 3.0)
    torch.testing.assert_close(loss0, F.cross_entropy(s, y, reduction="sum"))
    loss1, _, _ = distillation_loss(s, t, y, 1.0, 3.0)
    torch.testing.assert_close(loss1, 9.0 * forward_kl(s, t, None, 3.0)[0])
    assert abs(loss0.item() - loss1.item()) > 1e-3  # the two endpoints are different objectives


def test_tau_squared_keeps_gradient_scale():
    """Without tau^2 the soft gradient shrinks ~1/tau^2; with it, it stays on one scale."""
    scaled, raw = {}, {}
    for tau in (2.0, 4.0, 8.0):
        s, t = _rand(n=64, c=10, seed=4, scale=0.5)
        loss, _, parts = distillation_loss(s, t, torch.zeros(64, dtype=torch.long), 1.0, tau)
        torch.testing.assert_close(loss, parts["kd"])
        (g,) = torch.autograd.grad(loss, s)
        (g_raw,) = torch.autograd.grad(forward_kl(s, t, None, tau)[0], s)
        scaled[tau], raw[tau] = g.norm().item(), g_raw.norm().item()
    # measured: raw 0.442, 0.109, 0.027 (ratio 8/2 = 0.061); scaled 1.77, 1.74, 1.73
    assert raw[8.0] / raw[2.0] < 0.2
    assert raw[4.0] < raw[2.0]
    for tau in (4.0, 8.0):
        assert 0.3 < scaled[tau] / scaled[2.0] < 3.0


def test_sums_and_counts_normalize_once_across_micro_batches():
    s, t = _rand(n=7, seed=5)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    full, n, _ = distillation_loss(s, t, y, 0.6, 2.0)
    (g_full,) = torch.autograd.grad(full / n, s)
    a, na, _ = distillation_loss(s[:3], t[:3], y[:3], 0.6, 2.0)
    b, nb, _ = distillation_loss(s[3:], t[3:], y[3:], 0.6, 2.0)
    assert (na.item(), nb.item()) == (3, 4)
    (g_split,) = torch.autograd.grad((a + b) / (na + nb), s)
    torch.testing.assert_close((a + b) / (na + nb), full / n)
    torch.testing.assert_close(g_split, g_full)
    # averaging the two per-batch means instead would give a different (wrong) objective
    assert abs(((a / na + b / nb) / 2 - full / n).item()) > 1e-4
