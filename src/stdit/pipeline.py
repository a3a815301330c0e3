"""StDiTPipeline: text-, class- or un-conditioned video sampling with a StDiT, in pixel or VAE-latent space.

A diffusers ``DiffusionPipeline`` (``save_pretrained``, ``from_pretrained``, offloading, progress bars) with
flow-matching schedulers (``FlowMatchEulerDiscreteScheduler`` or ``UniPCMultistepScheduler`` with flow sigmas),
classifier-free guidance, image-to-video from a first frame, and any diffusers video autoencoder (e.g.
``AutoencoderKLWan``) for latent models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from stdit.attention import as_keep_mask

SCHEDULERS = ("euler", "unipc")
OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def make_scheduler(name: str = "euler", shift: float = 1.0):
    """A diffusers flow-matching scheduler whose sigmas are shifted like the training timesteps."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if name == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}.")


def vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers video autoencoder; (1, 1) without one."""
    if vae is None:
        return 1, 1
    if hasattr(vae, "temperal_downsample"):  # AutoencoderKLWan: the architecture, not the (defaulted) config
        return 2 ** sum(vae.temperal_downsample), 2 ** len(vae.temperal_downsample)
    cfg = vae.config
    t = getattr(cfg, "scale_factor_temporal", None) or getattr(vae, "temporal_compression_ratio", None)
    s = getattr(cfg, "scale_factor_spatial", None) or getattr(vae, "spatial_compression_ratio", None)
    if t is None or s is None:
        raise ValueError(f"cannot tell the compression of {type(vae).__name__}; it needs scale_factor_temporal/"
                         "scale_factor_spatial in its config or temporal/spatial_compression_ratio attributes.")
    return int(t), int(s)


def _latent_stats(vae, z: torch.Tensor):
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(shape)
        return mean, 1 / std
    return getattr(cfg, "shift_factor", None) or 0.0, getattr(cfg, "scaling_factor", None) or 1.0


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the roughly unit-variance space the transformer is trained in."""
    shift, scale = _latent_stats(vae, z)
    return (z - shift) * scale


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    shift, scale = _latent_stats(vae, z)
    return z / scale + shift


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in [-1, 1] -> normalized latents (the posterior mode, so caches are deterministic)."""
    out = vae.encode(video.to(device=vae.device, dtype=vae.dtype))
    dist = out.latent_dist if hasattr(out, "latent_dist") else out[0]
    z = dist.mode() if hasattr(dist, "mode") else dist
    return normalize_latents(vae, z.float())


@dataclass
class StDiTPipelineOutput(BaseOutput):
    """``frames``: ``[B, T, C, H, W]`` tensor in [0, 1] ("pt"), ``[B, T, H, W, C]`` array ("np"), a list of lists
    of PIL images ("pil"), or latents ``[B, C, T, H, W]`` ("latent")."""

    frames: torch.Tensor | np.ndarray | list


class StDiTPipeline(DiffusionPipeline):
    """Sample videos from a :class:`~stdit.model.StDiT`.

    Args:
        transformer: the StDiT.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` or ``UniPCMultistepScheduler`` (flow sigmas); see
            :func:`make_scheduler`.
        vae: optional diffusers video autoencoder; None samples in pixel space ([-1, 1]).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        t, s = vae_scale_factors(vae)
        self.vae_scale_factor_temporal, self.vae_scale_factor_spatial = t, s
        self.video_processor = VideoProcessor(vae_scale_factor=s)

    def latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        cfg = self.transformer.config
        t, s = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        if self.vae is not None:
            if (num_frames - 1) % t:
                raise ValueError(f"num_frames={num_frames}: with this VAE num_frames - 1 must be divisible by {t} "
                                 f"(e.g. {(num_frames - 1) // t * t + 1}).")
            num_frames = (num_frames - 1) // t + 1
        pt, ph, pw = cfg.patch_size
        for name, size, mult in (("height", height, s * ph), ("width", width, s * pw)):
            if size % mult:
                raise ValueError(f"{name}={size} must be a multiple of {mult} (VAE factor x patch size); "
                                 f"try {max(mult, size // mult * mult)}.")
        if num_frames % pt:
            raise ValueError(f"num_frames gives {num_frames} latent frames, not divisible by the temporal patch {pt}.")
        return batch_size, cfg.in_channels, num_frames, height // s, width // s

    def _batch_size(self, prompt_embeds, class_labels, image, batch_size):
        for x in (prompt_embeds, class_labels):
            if x is not None:
                return len(x)
        if isinstance(image, list):
            return len(image)
        if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
            return int(image.shape[0])
        return 1 if image is not None else batch_size

    def _first_frame_condition(self, image, batch_size, num_latent_frames, height, width, device, dtype):
        if self.transformer.config.condition_channels == 0:
            raise ValueError("image= was given but this model has condition_channels=0 (not an image-to-video model).")
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        if pixels.shape[0] == 1 and batch_size > 1:
            pixels = pixels.expand(batch_size, -1, -1, -1)
        first = pixels[:, :, None]
        if self.vae is not None:
            first = vae_encode(self.vae, first)
        return self.transformer.i2v_condition(first.to(dtype), num_latent_frames)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        image=None,
        num_frames: int = 8,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 30,
        guidance_scale: float = 1.0,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Sample videos.

        Conditioning: ``prompt_embeds`` ``[B, L, text_dim]`` (text models; the unconditional branch uses
        ``negative_prompt_embeds`` or zeros), ``class_labels`` ``[B]`` (class models; the null class is the
        unconditional branch), or nothing. ``image``: the first frame (PIL image, or an array / ``[B, 3, H, W]``
        tensor in [0, 1], as diffusers' image processor takes) for image-to-video models.
        ``guidance_scale > 1`` enables classifier-free guidance.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}.")
        cfg = self.transformer.config
        device = self._execution_device
        dtype = self.transformer.dtype
        if cfg.text_dim is not None and prompt_embeds is None:
            raise ValueError("this model is text-conditioned: pass prompt_embeds [B, L, text_dim].")
        if class_labels is not None and not cfg.num_classes:
            raise ValueError("class_labels were given but this model has no classes (num_classes is not set).")
        b = self._batch_size(prompt_embeds, class_labels, image, batch_size)
        shape = self.latent_shape(b, num_frames, height, width)
        do_cfg = guidance_scale > 1.0 and (cfg.text_dim is not None or bool(cfg.num_classes))

        cond, uncond = {}, {}
        if cfg.text_dim is not None:
            cond["encoder_hidden_states"] = prompt_embeds.to(device, dtype)
            neg = negative_prompt_embeds if negative_prompt_embeds is not None else torch.zeros_like(prompt_embeds)
            uncond["encoder_hidden_states"] = neg.to(device, dtype)
            if prompt_attention_mask is not None:
                # bool, 0/1 integer or additive float masks, as the model reads them (a plain .bool() would invert
                # an additive mask); one dtype for both branches, which guidance may batch together
                cond["encoder_attention_mask"] = as_keep_mask(prompt_attention_mask.to(device), "prompt_attention_mask")
                neg_mask = negative_prompt_attention_mask
                if neg_mask is None and negative_prompt_embeds is None:
                    neg_mask = prompt_attention_mask
                if neg_mask is not None:
                    uncond["encoder_attention_mask"] = as_keep_mask(neg_mask.to(device),
                                                                    "negative_prompt_attention_mask")
        if cfg.num_classes:
            labels = torch.as_tensor(class_labels if class_labels is not None else [cfg.num_classes] * b)
            cond["class_labels"] = labels.to(device=device, dtype=torch.long).reshape(b)
            uncond["class_labels"] = torch.full((b,), cfg.num_classes, device=device, dtype=torch.long)
        if image is not None or cfg.condition_channels:
            if image is None:
                raise ValueError("this is an image-to-video model: pass image= (the first frame).")
            cond["condition"] = uncond["condition"] = self._first_frame_condition(
                image, b, shape[2], height, width, device, dtype)

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        latents = latents.to(device, torch.float32)

        if do_cfg:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                if do_cfg:
                    x = torch.cat([latents, latents]).to(dtype)
                    out = self.transformer(x, t.expand(2 * b), return_dict=False, **both)[0].float()
                    out_u, out_c = out.chunk(2)
                    velocity = out_u + guidance_scale * (out_c - out_u)
                else:
                    velocity = self.transformer(latents.to(dtype), t.expand(b), return_dict=False, **cond)[0].float()
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                bar.update()

        if output_type == "latent":
            frames = latents
        else:
            video = latents
            if self.vae is not None:
                z = denormalize_latents(self.vae, latents).to(self.vae.dtype)
                video = self.vae.decode(z, return_dict=False)[0]
            frames = self.video_processor.postprocess_video(video.float().clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return StDiTPipelineOutput(frames=frames)
