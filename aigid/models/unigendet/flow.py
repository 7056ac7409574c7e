"""Rectified-flow utilities for UniGenDet's generation branch (BAGEL's convention).

The paper writes the target as ``v − (x0 − x_t)``; the public code (and this module) uses the
standard rectified-flow velocity instead, with t = 1 pure noise and t = 0 clean data:

    x_t = (1 − t)·x0 + t·ε,        target v* = dx_t/dt = ε − x0,

t drawn as ``sigmoid(randn)`` and warped by the timestep shift ``s·t / (1 + (s − 1)·t)``
(s = 1 in training, 3 when sampling: more steps are spent near pure noise). Sampling integrates
``x ← x − v·dt`` from t = 1 down to 0 with Euler steps, applying text classifier-free guidance
``v = v_u + w·(v_c − v_u)`` for t in (lo, hi] (BAGEL: w = 4, (0.4, 1]) and, as BAGEL does by
default, rescaling the guided velocity so that its norm never exceeds the conditional one's
(``renorm="global"``, per sample here; BAGEL computes it over the whole pack).
The loss and the sampler share these functions, so they cannot disagree on the convention.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["shift_timesteps", "sample_timesteps", "interpolate", "velocity_target", "flow_loss",
           "sampling_schedule", "guide", "euler_sample"]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·t / (1 + (s − 1)·t)``: identity for s = 1, pushes t towards 1 (noise) for s > 1."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, shift: float = 1.0, *, generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
    """(n,) training timesteps in (0, 1): ``sigmoid(randn)`` (logit-normal), then shifted."""
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift_timesteps(t, shift)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·noise; t is a scalar or has x0's leading dims (broadcast on the rest)."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity dx_t/dt = noise − x0 (points from data to noise)."""
    return noise - x0


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (float32 reduction)."""
    return (pred.float() - velocity_target(x0, noise).float()).pow(2).mean()


def sampling_schedule(steps: int, shift: float = 3.0, device=None) -> torch.Tensor:
    """(steps,) shifted times from 1 to 0: BAGEL's ``num_timesteps`` grid points, so ``steps − 1``
    Euler steps (model calls); the last point is the end, never evaluated."""
    if steps < 2:
        raise ValueError(f"steps (grid points, BAGEL's num_timesteps) must be >= 2, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps, device=device), shift)


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float,
          renorm: Optional[str] = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on leading-dim batches (N, ...).

    renorm ``"global"`` rescales each sample's guided velocity to at most the conditional norm
    (factor clamped to [renorm_min, 1]); ``"channel"`` does it per token (last dim); None is off.
    """
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm is None:
        return v
    if renorm == "global":
        dims = tuple(range(1, v.ndim))
        n_c, n_g = v_cond.norm(dim=dims, keepdim=True), v.norm(dim=dims, keepdim=True)
    elif renorm == "channel":
        n_c, n_g = v_cond.norm(dim=-1, keepdim=True), v.norm(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown CFG renorm {renorm!r} (global, channel or None)")
    return v * (n_c / (n_g + 1e-8)).clamp(min=renorm_min, max=1.0)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, Optional[torch.Tensor]]]


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, *, steps: int = 50, shift: float = 3.0,
                 cfg_scale: float = 4.0, cfg_interval: tuple[float, float] = (0.4, 1.0),
                 renorm: Optional[str] = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (``noise``, (N, ...)) to t = 0 over ``steps`` grid points
    (``steps − 1`` Euler steps and model calls, as BAGEL's ``num_timesteps=50`` makes 49).

    ``velocity(x, t, guided)`` gets the batch and its time t ((N,) tensor) and returns
    ``(v_cond, v_uncond)``; it must compute ``v_uncond`` only when ``guided`` (else None).
    Guidance applies where ``lo < t <= hi`` and ``cfg_scale > 1``.
    """
    times = sampling_schedule(steps, shift, device=noise.device)
    x = noise
    lo, hi = cfg_interval
    for i in range(steps - 1):
        t, dt = times[i], times[i] - times[i + 1]
        guided = cfg_scale > 1.0 and lo < float(t) <= hi
        v_c, v_u = velocity(x, t.expand(x.shape[0]), guided)
        v = guide(v_c, v_u, cfg_scale, renorm, renorm_min) if guided else v_c
        x = x - v.to(x.dtype) * dt
    return x
