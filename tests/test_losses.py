"""The distillation loss: zero on identical inputs, equal to F.kl_div, pinned values, masking, tau^2 scaling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protege.losses import distillation_loss, forward_kl


def _rand(n=6, c=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * scale).requires_grad_(True)
    t = torch.softmax(torch.randn(n, c, generator=g) * scale, -1)
    return s, t


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_identical_inputs_give_zero(tau):
    _, t = _rand()
    kl, n = forward_kl(t.log(), t, temperature=tau)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and n.item() == 6


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_matches_torch_kl_div(tau):
    s, t = _rand(seed=1)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    kl, n = forward_kl(s, t, mask, tau)
    ref = F.kl_div(F.log_softmax(s[mask] / tau, -1), F.log_softmax(t[mask].log() / tau, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(kl, ref)
    assert n.item() == 4


def test_pinned_values():
    kl, _ = forward_kl(torch.zeros(1, 2), torch.tensor([[0.8, 0.2]]))
    assert kl.item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), abs=1e-6)  # 0.192745
    # alpha 0.5, tau 2: teacher [0.8, 0.2] re-tempered is softmax(log p / 2) = [2/3, 1/3]; student [0, 0] -> [.5, .5]
    loss, n, parts = distillation_loss(torch.zeros(1, 2), torch.tensor([[0.8, 0.2]]), torch.tensor([0]), 0.5, 2.0)
    ce = math.log(2.0)
    kl2 = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * 4 * kl2, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6) and parts["kd"].item() == pytest.approx(4 * kl2, abs=1e-6)


def test_zero_teacher_probabilities_stay_finite():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4])
    loss, _, _ = distillation_loss(s, t, torch.tensor([0, 1, 2]), 0.7, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_all_masked_batch_gives_zero_not_nan():
    s, t = _rand(seed=2)
    loss, n, _ = distillation_loss(s, t, torch.zeros(6, dtype=torch.long), 0.5, 2.0, torch.zeros(6, dtype=torch.bool))
    assert loss.item() == 0.0 and n.item() == 0
    (loss / n.clamp_min(1)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum().item() == 0.0


def test_alpha_endpoints():
    s, t = _rand(seed=3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss0, _, _ = distillation_loss(s, t, y, 0.0, 3.0)
    torch.testing.assert_close(loss0, F.cross_entropy(s, y, reduction="sum"))
    loss1, _, _ = distillation_loss(s, t, y, 1.0, 3.0)
    torch.testing.assert_close(loss1, 9.0 * forward_kl(s, t, None, 3.0)[0])


def test_tau_squared_keeps_gradient_scale():
    """Without tau^2 the soft gradient shrinks ~1/tau^2; with it, it stays on one scale."""
    norms, raw = {}, {}
    for tau in (2.0, 4.0, 8.0):
        s, t = _rand(n=64, c=10, seed=4, scale=0.5)
        loss, _, _ = distillation_loss(s, t, torch.zeros(64, dtype=torch.long), 1.0, tau)
        (g,) = torch.autograd.grad(loss, s)
        norms[tau], raw[tau] = g.norm().item(), g.norm().item() / tau**2
    assert raw[8.0] / raw[2.0] < 0.1
    assert 0.3 < norms[8.0] / norms[2.0] < 3.0


def test_sums_and_counts_normalize_once_across_micro_batches():
    s, t = _rand(n=7, seed=5)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    full, n, _ = distillation_loss(s, t, y, 0.6, 2.0)
    (g_full,) = torch.autograd.grad(full / n, s)
    a, na, _ = distillation_loss(s[:3], t[:3], y[:3], 0.6, 2.0)
    b, nb, _ = distillation_loss(s[3:], t[3:], y[3:], 0.6, 2.0)
    (g_split,) = torch.autograd.grad((a + b) / (na + nb), s)
    torch.testing.assert_close((a + b) / (na + nb), full / n)
    torch.testing.assert_close(g_split, g_full)
