"""Rectified-flow utilities: conventions, schedule, guidance, and the Euler sampler."""
import pytest
import torch

from aigid.models.unigendet import flow


def test_shift_fixes_endpoints_and_pushes_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    s = flow.shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert (s[1:-1] > t[1:-1]).all() and (s.diff() > 0).all()
    assert torch.allclose(s[5], torch.tensor(1.5 / 2.0))  # 3·0.5 / (1 + 2·0.5)
    with pytest.raises(ValueError):
        flow.shift_timesteps(t, 0.0)


def test_sample_timesteps_seeded_and_in_range():
    a = flow.sample_timesteps(1000, 1.0, generator=torch.Generator().manual_seed(3))
    b = flow.sample_timesteps(1000, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and ((a > 0) & (a < 1)).all()
    assert abs(a.median().item() - 0.5) < 0.05  # logit-normal around 0.5
    c = flow.sample_timesteps(1000, 3.0, generator=torch.Generator().manual_seed(3))
    assert c.median() > 0.7


def test_interpolation_convention_t1_is_noise():
    x0, eps = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(4)), eps)
    t = torch.rand(4)
    xt = flow.interpolate(x0, eps, t)
    # the target is the time derivative of x_t
    h = 1e-3
    fd = (flow.interpolate(x0, eps, t + h) - xt) / h
    assert torch.allclose(fd, flow.velocity_target(x0, eps), atol=1e-2)
    assert flow.flow_loss(flow.velocity_target(x0, eps), x0, eps).item() == 0.0


def test_schedule_runs_from_noise_to_data():
    # BAGEL's num_timesteps=50 is 50 grid points from 1 to 0.
    ts = flow.sampling_schedule(50, 3.0)
    assert ts.shape == (50,) and ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    with pytest.raises(ValueError):
        flow.sampling_schedule(1)


def test_fifty_steps_make_forty_nine_model_calls_as_bagel():
    calls = []

    def velocity(x, t, guided):
        calls.append(float(t[0]))
        return torch.zeros_like(x), None

    flow.euler_sample(velocity, torch.zeros(1, 4), steps=50, shift=3.0, cfg_scale=1.0)
    assert len(calls) == 49 and calls[0] == 1.0 and min(calls) > 0


def test_euler_with_the_exact_velocity_lands_on_the_data_point():
    # For a single data point x0 the exact rectified-flow field is (x − x0)/t: straight lines.
    x0 = torch.randn(3, 8)

    def velocity(x, t, guided):
        assert not guided
        return (x - x0) / t[:, None], None

    out = flow.euler_sample(velocity, torch.randn(3, 8), steps=7, shift=3.0, cfg_scale=1.0)
    assert torch.allclose(out, x0, atol=1e-5)


def test_guidance_only_inside_its_interval():
    seen = []

    def velocity(x, t, guided):
        seen.append((float(t[0]), guided))
        return torch.ones_like(x), (torch.zeros_like(x) if guided else None)

    flow.euler_sample(velocity, torch.zeros(2, 4), steps=20, shift=3.0, cfg_scale=4.0,
                      cfg_interval=(0.4, 1.0))
    assert len(seen) == 19
    assert all(g == (0.4 < t <= 1.0) for t, g in seen)
    assert any(g for _, g in seen) and not all(g for _, g in seen)


def test_guide_formula_and_renorm():
    vc, vu = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.allclose(flow.guide(vc, vu, 1.0, renorm=None), vc)
    plain = flow.guide(vc, vu, 4.0, renorm=None)
    assert torch.allclose(plain, vu + 4.0 * (vc - vu))
    g = flow.guide(vc, vu, 4.0, renorm="global")
    n_c, n_g = vc.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1)
    assert (n_g <= n_c + 1e-5).all()
    # renorm only rescales: same direction as the plain guided velocity
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), plain.flatten(1))
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)
    ch = flow.guide(vc, vu, 4.0, renorm="channel")
    assert (ch.norm(dim=-1) <= vc.norm(dim=-1) + 1e-5).all()
    with pytest.raises(ValueError):
        flow.guide(vc, vu, 4.0, renorm="bogus")
