"""Rectified-flow training objective (Wan / SD3 convention).

``x_t = (1 - t) * x0 + t * noise`` for ``t`` in [0, 1]; the model predicts the velocity ``noise - x0`` and sees
the timestep on the 0..1000 scale that diffusers' flow-matching schedulers use at sampling time.

Timesteps are drawn logit-normal (SD3: ``t = sigmoid(N(mean, std))``) and then shifted towards noise,
``t' = s t / (1 + (s - 1) t)``: the same map ``FlowMatchEulerDiscreteScheduler(shift=s)`` applies to its
sigmas, so training and sampling agree. Larger inputs keep more signal at the same ``t`` and need more noise,
so ``s`` grows with the token count: ``s = base_shift * sqrt(seq_len / base_seq_len)`` (SD3, section 5.3.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map ``t`` in [0, 1] towards 1 (more noise) for ``shift > 1``; the identity for ``shift == 1``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}.")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(seq_len: int, base_seq_len: int = 1024, base_shift: float = 1.0) -> float:
    """The timestep shift for an input of ``seq_len`` tokens: ``base_shift * sqrt(seq_len / base_seq_len)``."""
    if seq_len < 1 or base_seq_len < 1:
        raise ValueError(f"seq_len and base_seq_len must be >= 1; got {seq_len}, {base_seq_len}.")
    return base_shift * math.sqrt(seq_len / base_seq_len)


def token_count(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens the model sees for an input of shape ``[..., T, H, W]``."""
    t, h, w = shape[-3:]
    pt, ph, pw = patch_size
    return max(1, t // pt) * max(1, h // ph) * max(1, w // pw)


def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` timesteps in (0, 1) from ``sigmoid(N(mean, std))``."""
    u = torch.randn(n, generator=generator, device=device if generator is None else generator.device)
    return torch.sigmoid(mean + std * u).to(device)


@dataclass
class RectifiedFlow:
    """Training-side rectified flow.

    Args:
        logit_mean, logit_std: parameters of the logit-normal timestep density.
        shift: a fixed timestep shift, or None to derive it from the input size (see :func:`resolution_shift`).
        base_seq_len, base_shift: the resolution rule used when ``shift`` is None.
        weight_t_min: the flow error ``v - v*`` is the clean-sample error divided by ``t``, so the plain flow MSE
            weighs a sample's x0 error by ``1 / t^2``: unbounded at low noise, where those few samples then dominate
            the gradient. With ``weight_t_min > 0`` a sample's loss is scaled by ``min(1, t / weight_t_min)^2``,
            capping its x0 weight at ``1 / weight_t_min^2``, so a density that trains more low noise stays stable.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    base_seq_len: int = 1024
    base_shift: float = 1.0
    weight_t_min: float = 0.0

    def shift_for(self, shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> float:
        if self.shift is not None:
            return float(self.shift)
        return resolution_shift(token_count(shape, patch_size), self.base_seq_len, self.base_shift)

    def sample_t(self, n: int, shift: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        t = sample_logit_normal(n, self.logit_mean, self.logit_std, generator, device)
        return shift_timesteps(t, shift)

    def t_from_normal(self, u: torch.Tensor, shift: float) -> torch.Tensor:
        """Timesteps from standard-normal draws ``u`` (for callers that draw their own randomness)."""
        return shift_timesteps(torch.sigmoid(self.logit_mean + self.logit_std * u), shift)

    def sample_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Each sample's loss weight ``min(1, t / weight_t_min)^2`` (fp32, shape of ``t``)."""
        return (t.float() / self.weight_t_min).clamp(max=1.0).square()

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t noise``, with ``t`` of shape [B] broadcast over the other dims."""
        t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss(self, model, x0: torch.Tensor, noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
             generator: torch.Generator | None = None, patch_size: tuple[int, int, int] = (1, 1, 1),
             clean_first_frame: torch.Tensor | None = None, input_condition: torch.Tensor | None = None,
             **model_kwargs) -> torch.Tensor:
        """Mean squared error between the model's velocity and ``noise - x0`` (fp32), one scalar.

        ``noise`` and ``t`` (in [0, 1]) are drawn from ``generator`` unless given, so a caller that derives them
        from its own seeds can replay a run exactly. ``clean_first_frame`` ([B] bool) trains those samples as Wan 2.2
        TI2V's image-to-video: the first latent frame enters clean, its tokens get timestep 0 (per-token timesteps
        ``[B, S]``, as ``WanImageToVideoPipeline`` passes them with ``expand_timesteps``) and it is left out of the
        loss; needs a temporal patch of 1. ``input_condition`` ``[B, C_cond, T, H, W]``: channels concatenated to the
        noisy latents as the model's input (Wan 2.1 image-to-video: the known-frame mask and condition latents).
        """
        b = x0.shape[0]
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        if t is None:
            t = self.sample_t(b, self.shift_for(tuple(x0.shape), patch_size), generator, x0.device)
        t = t.to(x0.device)
        x_t = self.add_noise(x0, noise, t)
        if input_condition is not None:
            def model(x, timestep, _model=model, **kw):
                return _model(torch.cat([x, input_condition.to(x.dtype)], dim=1), timestep, **kw)
        if clean_first_frame is None or not bool(clean_first_frame.any()):
            out = model(x_t, t * NUM_TRAIN_TIMESTEPS, return_dict=False, **model_kwargs)[0]
            if self.weight_t_min <= 0:
                return F.mse_loss(out.float(), self.velocity(x0, noise).float())
            err = (out.float() - self.velocity(x0, noise).float()).square()
            return (err * self.sample_weight(t).view(-1, *([1] * (err.ndim - 1)))).mean()
        if patch_size[0] != 1:
            raise ValueError(f"a clean first frame needs a temporal patch of 1; got patch_size={tuple(patch_size)}.")
        keep = clean_first_frame.to(x0.device).view(-1, 1, 1, 1)
        x_t = x_t.clone()
        x_t[:, :, 0] = torch.where(keep, x0[:, :, 0], x_t[:, :, 0])
        b, _, frames, h, w = x0.shape
        per_frame = (h // patch_size[1]) * (w // patch_size[2])
        first_tokens = torch.zeros(frames * per_frame, dtype=torch.bool, device=x0.device)
        first_tokens[:per_frame] = True
        t_tok = torch.where(first_tokens & keep.view(-1, 1), torch.zeros((), device=x0.device), t.view(-1, 1))
        out = model(x_t, t_tok * NUM_TRAIN_TIMESTEPS, return_dict=False, **model_kwargs)[0]
        weight = torch.ones(b, 1, frames, 1, 1, device=x0.device)
        weight[:, :, 0] = (~keep).float()
        counted = weight.sum() * x0.shape[1] * h * w  # the mean is over the frames that count
        if self.weight_t_min > 0:
            weight = weight * self.sample_weight(t).view(-1, 1, 1, 1, 1)
        err = (out.float() - self.velocity(x0, noise).float()).square() * weight
        return err.sum() / counted
