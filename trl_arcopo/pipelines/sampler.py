"""The few-step sampler of Self-Forcing-style generators: schedule, x̂0 prediction and re-noising.

Flow-matching convention (Wan, Self-Forcing, diffusers): ``x_t = (1 - σ)·x0 + σ·ε``, the network predicts the flow
``v ≈ ε - x0`` and is conditioned on ``t = 1000·σ`` (for warped schedules). One chunk runs ``T`` steps; every non-final
step re-noises its x̂0 prediction with fresh Gaussian noise to the next sigma (a consistency-model step, not Euler).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["few_step_schedule", "predict_x0", "renoise"]


def few_step_schedule(
    denoising_step_list: Sequence[float],
    *,
    warp: bool = True,
    shift: float = 5.0,
    num_train_timesteps: int = 1000,
) -> tuple[list[float], list[float]]:
    """Timesteps ``t_s`` fed to the model and sigmas ``σ_s`` of a few-step schedule.

    The training table has ``num_train_timesteps`` sigmas ``linspace(1, 0, N + 1)[:-1]`` shifted by
    ``σ' = shift·σ / (1 + (shift - 1)·σ)`` and timesteps ``N·σ'`` (plus a trailing 0). Warped lists
    (Self-Forcing) look each step up in that table at index ``N - step``, so ``σ_s = t_s / N``; unwarped lists
    (CausVid) feed the step as the timestep and take ``σ_s`` from the nearest table entry.

    Returns:
        ``(timesteps, sigmas)``, each a list of ``T`` floats (float32 values), e.g. ``[1000, 937.5, 833.33, 625]``
        and ``[1, 0.9375, 0.8333, 0.625]`` for ``[1000, 750, 500, 250]`` warped with shift 5.
    """
    n = num_train_timesteps
    base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    sigma_table = shift * base / (1 + (shift - 1) * base)
    table = torch.cat([sigma_table * n, torch.zeros(1, dtype=torch.float64)])
    steps = torch.tensor([float(s) for s in denoising_step_list], dtype=torch.float64)
    if warp:
        timesteps = table[(n - steps).long()]
        sigmas = timesteps / n
    else:
        timesteps = steps
        nearest = (table[:-1, None] - steps[None]).abs().argmin(dim=0)
        sigmas = sigma_table[nearest]
    return timesteps.float().tolist(), sigmas.float().tolist()


def predict_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x̂0 = x_t - σ·v`` computed in float64 (as the reference implementation does), returned in ``x_t``'s dtype.

    ``sigma`` is a float or a tensor broadcastable to ``x_t`` (e.g. ``[B, 1, 1, 1, 1]``, one per row)."""
    return (x_t.double() - sigma * flow.double()).to(x_t.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """The next step's input ``(1 - σ_{s+1})·x̂0 + σ_{s+1}·η`` (float32 math, returned in ``x0``'s dtype): also the
    flow-matching interpolation of clean latents at ``σ``.

    ``sigma_next`` is a float or a tensor broadcastable to ``x0`` and ``noise`` (e.g. ``[B, 1, 1, 1, 1]``, one per row)."""
    return ((1 - sigma_next) * x0.float() + sigma_next * noise.float()).to(x0.dtype)
