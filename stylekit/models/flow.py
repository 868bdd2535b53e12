"""Rectified-flow training helpers shared by the flow-matching families (FLUX, Qwen-Image)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def sample_sigmas(
    n: int,
    generator: torch.Generator,
    method: str = "sigmoid",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
) -> torch.Tensor:
    """Noise levels in (0, 1) for a batch: 0 is the clean image, 1 pure noise.

    `sigmoid` squashes a scaled normal draw, `logit_normal` a shifted one (both favour the middle of the
    trajectory, where FLUX and Qwen-Image learn most), `uniform` spreads evenly. `shift` > 1 moves weight to
    the noisy end, as the models' own schedulers do at high resolution.
    """
    import torch

    if method == "uniform":
        sigmas = torch.rand(n, generator=generator)
    else:
        normal = torch.randn(n, generator=generator)
        normal = normal * sigmoid_scale if method == "sigmoid" else normal * logit_std + logit_mean
        sigmas = torch.sigmoid(normal)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.clamp(1e-4, 1 - 1e-4)


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """The point on the straight path from image to noise at `sigmas`, and the velocity the model predicts."""
    shape = (-1,) + (1,) * (latents.ndim - 1)
    s = sigmas.to(latents.dtype).view(shape)
    return (1 - s) * latents + s * noise, noise - latents


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = (prediction.float() - target.float()) ** 2
    return diff.flatten(1).mean(dim=1)
