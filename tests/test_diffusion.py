"""Rectified-flow objective and timestep sampling."""

import math

import pytest
import torch

from stdit.diffusion import (NUM_TRAIN_TIMESTEPS, RectifiedFlow, resolution_shift, sample_logit_normal,
                             shift_timesteps, token_count)
from stdit.pipeline import make_scheduler


def test_interpolation_and_target():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 5, 6, generator=g), torch.randn(3, 2, 4, 5, 6, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = RectifiedFlow.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.7 * x0[1] + 0.3 * noise[1])
    # moving along the target velocity from x_t by dt lands on x_{t+dt}
    v = RectifiedFlow.velocity(x0, noise)
    torch.testing.assert_close(xt[1] + 0.2 * v[1], RectifiedFlow.add_noise(x0, noise, torch.full((3,), 0.5))[1])


def test_shift_matches_diffusers_flow_scheduler():
    """Training's shift map is the one FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    for shift in (1.0, 3.0, 7.5):
        sched = make_scheduler("euler", shift)
        sched.set_timesteps(10)
        # diffusers spaces the steps between the shifted ends of its training sigmas, then shifts them
        lowest = shift_timesteps(torch.tensor(1 / NUM_TRAIN_TIMESTEPS), shift).item()
        base = torch.linspace(1.0, lowest, 10)
        torch.testing.assert_close(sched.sigmas[:-1].float(), shift_timesteps(base, shift).float(), rtol=1e-4,
                                   atol=1e-4)


def test_shift_properties():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 4.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all() and (s.diff() > 0).all()
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_timesteps(t, 0.0)


def test_resolution_shift_grows_with_tokens():
    assert resolution_shift(1024, 1024, 1.0) == 1.0
    assert resolution_shift(4096, 1024, 1.0) == pytest.approx(2.0)
    assert resolution_shift(256, 1024, 3.0) == pytest.approx(1.5)
    assert token_count((2, 3, 8, 32, 32), (1, 4, 4)) == 8 * 8 * 8
    flow = RectifiedFlow()
    small = flow.shift_for((1, 3, 8, 32, 32), (1, 2, 2))
    big = flow.shift_for((1, 3, 8, 64, 64), (1, 2, 2))
    assert big == pytest.approx(2 * small)
    assert RectifiedFlow(shift=5.0).shift_for((1, 3, 8, 64, 64), (1, 2, 2)) == 5.0


def test_logit_normal_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_logit_normal(200_000, mean=0.5, std=0.8, generator=g)
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    # shifting moves mass towards noise: the median follows the shift map
    shifted = RectifiedFlow(logit_mean=0.0, logit_std=1.0).sample_t(100_000, 3.0, torch.Generator().manual_seed(0))
    assert abs(shifted.median().item() - 0.75) < 0.01


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    x0 = torch.randn(4, 3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.rand(4)
    seen = {}

    def oracle(x_t, timestep, return_dict=False):
        seen["t"] = timestep
        return (noise - x0,)

    flow = RectifiedFlow()
    assert flow.loss(oracle, x0, noise=noise, t=t).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(seen["t"], t * NUM_TRAIN_TIMESTEPS)

    def zero(x_t, timestep, return_dict=False):
        return (torch.zeros_like(x_t),)

    expected = (noise - x0).pow(2).mean().item()
    assert flow.loss(zero, x0, noise=noise, t=t).item() == pytest.approx(expected, rel=1e-5)


def test_weight_t_min_caps_the_low_noise_weight_of_the_sample_error():
    x0 = torch.randn(4, 3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9])

    def zero(x_t, timestep, return_dict=False):
        return (torch.zeros_like(x_t),)

    per_sample = (noise - x0).pow(2).mean(dim=(1, 2, 3, 4))
    weight = (t / 0.3).clamp(max=1).square()  # below t = 0.3 the weight falls as t^2, above it stays 1
    got = RectifiedFlow(weight_t_min=0.3).loss(zero, x0, noise=noise, t=t)
    assert got.item() == pytest.approx((per_sample * weight).mean().item(), rel=1e-5)
    assert RectifiedFlow(weight_t_min=0.0).loss(zero, x0, noise=noise, t=t).item() == pytest.approx(
        per_sample.mean().item(), rel=1e-5)
    # the clean-first-frame path weighs its samples the same way
    keep = torch.tensor([True, False, False, False])
    cf = RectifiedFlow(weight_t_min=0.3).loss(zero, x0, noise=noise, t=t, clean_first_frame=keep)
    err = (noise - x0).pow(2)
    err[0, :, 0] = 0
    counted = err.numel() - x0[0, :, 0].numel()
    assert cf.item() == pytest.approx((err * weight.view(-1, 1, 1, 1, 1)).sum().item() / counted, rel=1e-5)


def test_loss_draws_are_reproducible_from_the_generator():
    x0 = torch.randn(2, 3, 2, 4, 4)
    model = lambda x, t, return_dict=False: (x * 0.5,)  # noqa: E731
    flow = RectifiedFlow()
    a = flow.loss(model, x0, generator=torch.Generator().manual_seed(3))
    b = flow.loss(model, x0, generator=torch.Generator().manual_seed(3))
    c = flow.loss(model, x0, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c and math.isfinite(a.item())


def test_clean_first_frame_is_wan22_ti2v_training():
    """Flagged samples enter with their first latent frame clean, its tokens at timestep 0 (the rest at t), and
    that frame gets no gradient; unflagged samples are trained exactly as without the option."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 3, 4, 6, generator=g), torch.randn(3, 2, 3, 4, 6, generator=g)
    t = torch.tensor([0.4, 0.7, 0.9])
    keep = torch.tensor([True, False, True])
    seen = {}
    out = torch.randn(3, 2, 3, 4, 6, generator=g, requires_grad=True)

    def model(x, timestep, return_dict=False):
        seen["x"], seen["t"] = x, timestep
        return (out,)

    loss = RectifiedFlow().loss(model, x0, noise=noise, t=t, patch_size=(1, 2, 2), clean_first_frame=keep)
    x_t = RectifiedFlow.add_noise(x0, noise, t)
    assert torch.equal(seen["x"][keep, :, 0], x0[keep, :, 0]) and torch.equal(seen["x"][~keep], x_t[~keep])
    assert torch.equal(seen["x"][:, :, 1:], x_t[:, :, 1:])
    per_frame = 2 * 3
    assert seen["t"].shape == (3, 3 * per_frame)
    assert torch.equal(seen["t"][keep, :per_frame], torch.zeros(2, per_frame))
    assert torch.allclose(seen["t"][~keep], torch.full((1, 3 * per_frame), 700.0))
    assert torch.allclose(seen["t"][keep, per_frame:], (t[keep] * NUM_TRAIN_TIMESTEPS)[:, None].expand(2, 12))
    counted = torch.ones(3, 1, 3, 1, 1)
    counted[keep, :, 0] = 0
    want = (((out - (noise - x0)) ** 2) * counted).sum() / (counted.sum() * 2 * 4 * 6)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.all(out.grad[keep, :, 0] == 0) and torch.all(out.grad[:, :, 1:] != 0)
    assert torch.all(out.grad[~keep, :, 0] != 0)
    # nothing flagged: the plain loss, per-sample timesteps
    plain = RectifiedFlow().loss(model, x0, noise=noise, t=t, patch_size=(1, 2, 2),
                                 clean_first_frame=torch.zeros(3, dtype=torch.bool))
    assert seen["t"].shape == (3,) and torch.equal(plain, RectifiedFlow().loss(model, x0, noise=noise, t=t))
    with pytest.raises(ValueError, match="temporal patch of 1"):
        RectifiedFlow().loss(model, x0, noise=noise, t=t, patch_size=(3, 2, 2), clean_first_frame=keep)
