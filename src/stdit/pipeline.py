"""StDiTPipeline: text-, class- or un-conditioned video sampling with a StDiT, in pixel or VAE-latent space.

A diffusers ``DiffusionPipeline`` (``save_pretrained``, ``from_pretrained``, offloading, progress bars, step-end
callbacks) with flow-matching schedulers (``FlowMatchEulerDiscreteScheduler`` or ``UniPCMultistepScheduler`` with
flow sigmas), classifier-free guidance, prompts through an optional text encoder + tokenizer (UMT5 as Wan uses, or
any encoder giving ``[B, L, text_dim]``) with Wan's padding of the features, image-to-video from a first frame, and
any diffusers video autoencoder (e.g. ``AutoencoderKLWan``) for latent models.
"""

from __future__ import annotations

import contextlib
import html
import re
import time
from collections import defaultdict
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


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's text fixes where ftfy is installed, HTML entities, runs of whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _as_prompts(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got {prompt!r}.")
    return prompts


def _repeat(x, n: int):
    """Each row ``n`` times in a row (the videos of one prompt stay together, as diffusers orders them)."""
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


def make_scheduler(name: str = "euler", shift: float = 1.0):
    """A diffusers flow-matching scheduler whose sigmas are shifted like the training timesteps."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if name == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}.")


def _sigma(scheduler, step: int) -> float | None:
    sigmas = getattr(scheduler, "sigmas", None)
    return float(sigmas[step]) if sigmas is not None and step < len(sigmas) else None


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


class PartTimer:
    """Seconds spent in each part of a sampling run (text encoder, transformer, scheduler, VAE decode).

    On a GPU each part is bracketed by CUDA events on the current stream and the spans are summed after one
    synchronize at the end, so timing adds no synchronization between steps (the host keeps queueing work ahead);
    on a CPU the parts run synchronously and ``perf_counter`` times them."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: dict[str, list] = defaultdict(list)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                yield
            finally:
                end.record()
                self.spans[name].append((begin, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.spans[name].append(time.perf_counter() - t0)

    def seconds(self) -> dict[str, float]:
        """Each part's seconds and ``total`` (wall time from construction, after the GPU finished)."""
        if self.cuda:
            torch.cuda.synchronize()
            out = {k: sum(b.elapsed_time(e) for b, e in v) / 1e3 for k, v in self.spans.items()}
        else:
            out = {k: float(sum(v)) for k, v in self.spans.items()}
        out["total"] = time.perf_counter() - self.start
        return out


def format_timings(timings: dict[str, float]) -> str:
    """``transformer 12.3 s, scheduler 0.1 s, ..., total 14.0 s`` for the end of a run."""
    return ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in timings.items() if isinstance(v, float))


def layout_name(labels: list[str]) -> str:
    """The cache-context name of a batch whose rows belong to the branches ``labels`` (one per row, each branch's
    rows together): ``"cond"``, ``"uncond+cond"``, or with row counts where the shares differ (see
    :func:`stdit.cache.parse_layout`)."""
    groups: list[list] = []
    for label in labels:
        if groups and groups[-1][0] == label:
            groups[-1][1] += 1
        else:
            groups.append([label, 1])
    if len({n for _, n in groups}) == 1:
        return "+".join(g for g, _ in groups)
    return "+".join(f"{g}:{n}" for g, n in groups)


def stack_branches(uncond: dict, cond: dict) -> dict:
    """The transformer inputs of both guidance branches as one batch, unconditional rows first. Text of different
    lengths is padded with masked-out tokens and a branch without a mask gets an all-true one, so every row attends
    to exactly the tokens it attends to in a call of its own: the batched call is exact up to rounding."""
    out = {k: torch.cat([uncond[k], cond[k]]) for k in cond if k not in ("encoder_hidden_states",
                                                                        "encoder_attention_mask")}
    if "encoder_hidden_states" not in cond:
        return out
    texts = [uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]
    masks = [uncond.get("encoder_attention_mask"), cond.get("encoder_attention_mask")]
    length = max(t.shape[1] for t in texts)
    if all(m is None for m in masks) and all(t.shape[1] == length for t in texts):
        out["encoder_hidden_states"] = torch.cat(texts)
        return out
    masks = [torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
             for t, m in zip(texts, masks)]
    out["encoder_hidden_states"] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))
                                              for t in texts])
    out["encoder_attention_mask"] = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False)
                                               for m in masks])
    return out


@dataclass
class StDiTPipelineOutput(BaseOutput):
    """``frames``: ``[B, T, C, H, W]`` tensor in [0, 1] ("pt"), ``[B, T, H, W, C]`` array ("np"), a list of lists
    of PIL images ("pil"), or latents ``[B, C, T, H, W]`` ("latent"). ``timings``: seconds per part of the run
    (``text_encoder``, ``transformer``, ``scheduler``, ``vae_decode``, ``total``) and, with a step cache on, the
    block-stack calls computed and skipped."""

    frames: torch.Tensor | np.ndarray | list
    timings: dict | None = None


class StDiTPipeline(DiffusionPipeline):
    """Sample videos from a :class:`~stdit.model.StDiT`.

    Args:
        transformer: the StDiT.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` or ``UniPCMultistepScheduler`` (flow sigmas); see
            :func:`make_scheduler`.
        vae: optional diffusers video autoencoder; None samples in pixel space ([-1, 1]).
        text_encoder, tokenizer: optional, for ``prompt=`` strings: a transformers encoder (``UMT5EncoderModel``
            as Wan uses, or any module whose output, or its ``last_hidden_state``, is ``[B, L, text_dim]``) and
            its tokenizer. Without them a text model takes precomputed ``prompt_embeds``.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        t, s = vae_scale_factors(vae)
        self.vae_scale_factor_temporal, self.vae_scale_factor_spatial = t, s
        self.video_processor = VideoProcessor(vae_scale_factor=s)

    def enable_cfg_parallel(self, group=None) -> None:
        """Classifier-free guidance parallel over the ranks of ``group`` (default: the whole world), as xDiT's CFG
        parallel: each step the guidance batch's rows (unconditional, then conditional) are split into one contiguous
        share per rank, each rank runs the transformer on its share, and an all-gather gives every rank the whole
        prediction, so the ranks step the same latents. Every rank calls the pipeline with the same inputs. Needs
        at least as many rows (2 x videos) as ranks; the model's own sequence parallelism must use another group."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("enable_cfg_parallel needs torch.distributed initialized (torchrun, "
                             "init_process_group) on every rank.")
        self._cfg_group = group if group is not None else dist.group.WORLD

    def disable_cfg_parallel(self) -> None:
        self._cfg_group = None

    def _denoise(self, x, t, inputs: dict, labels: list[str], step: int, steps: int) -> torch.Tensor:
        """The transformer's prediction for the rows ``x`` (branch ``labels[i]`` for row i), inside a cache context
        that names the branches of the rows (so step caches keep one state per branch), split over the ranks of the
        CFG-parallel group when there is one."""
        group = getattr(self, "_cfg_group", None)
        rows = slice(None)
        if group is not None:
            import torch.distributed as dist

            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if x.shape[0] < world:
                raise ValueError(f"CFG parallel over {world} ranks needs at least {world} rows (2 x videos); this "
                                 f"call has {x.shape[0]}.")
            bounds = [len(part) for part in torch.arange(x.shape[0]).tensor_split(world)]
            start = sum(bounds[:rank])
            rows = slice(start, start + bounds[rank])
        context = getattr(self.transformer, "cache_context", None)
        context = (context(layout_name(labels[rows]), step_index=step, num_inference_steps=steps,
                           sigma=_sigma(self.scheduler, step))
                   if context is not None else contextlib.nullcontext())
        with context:
            out = self.transformer(x[rows], t[rows], return_dict=False, **{k: v[rows] for k, v in inputs.items()})[0]
        if group is None:
            return out
        import torch.distributed as dist

        most = max(bounds)  # all_gather takes equal shapes: pad each share to the largest
        padded = torch.nn.functional.pad(out, (0,) * (2 * (out.ndim - 1)) + (0, most - out.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, bounds)])

    # what diffusers' callbacks (e.g. diffusers.callbacks) read from the pipeline while it runs
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._do_cfg

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    def latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """The latents' shape for these sizes; a ValueError naming the size (and a valid one) otherwise."""
        for name, size in (("num_frames", num_frames), ("height", height), ("width", width),
                           ("batch_size", batch_size)):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"{name}={size!r}: must be a positive integer.")
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
            valid = max(pt, num_frames // pt * pt)
            raise ValueError(f"num_frames gives {num_frames} latent frames, not divisible by the temporal patch {pt}; "
                             f"try num_frames={valid if self.vae is None else (valid - 1) * t + 1}.")
        return batch_size, cfg.in_channels, num_frames, height // s, width // s

    def _get_prompt_embeds(self, prompt, max_sequence_length: int, device, dtype) -> torch.Tensor:
        """Wan's text features: the encoder's output over each prompt's real tokens, zeros after them, every
        prompt ``max_sequence_length`` long (Wan trains on and its checkpoints expect this zero padding, with no
        mask). ``[len(prompt), max_sequence_length, D]``."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt strings need a text encoder and its tokenizer: build the pipeline with "
                             "text_encoder= and tokenizer= (e.g. UMT5EncoderModel + AutoTokenizer from a Wan "
                             "checkpoint's text_encoder/ and tokenizer/), or pass prompt_embeds.")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length}: must be a positive integer.")
        prompts = [clean_prompt(p) for p in prompt]
        tok = self.tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        from diffusers.utils.torch_utils import get_module_execution_device

        enc_device = get_module_execution_device(self.text_encoder)
        out = self.text_encoder(tok.input_ids.to(enc_device), attention_mask=tok.attention_mask.to(enc_device))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        text_dim = self.transformer.config.text_dim
        if hidden.ndim != 3 or hidden.shape[-1] != text_dim:
            raise ValueError(f"the text encoder ({type(self.text_encoder).__name__}) gives features of shape "
                             f"{tuple(hidden.shape)}, but the model takes [B, L, text_dim={text_dim}]: use the "
                             "encoder the model was trained with.")
        lengths = tok.attention_mask.gt(0).sum(dim=1).to(hidden.device)
        real = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
        return hidden.masked_fill(~real[..., None], 0).to(device=device, dtype=dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt=None, negative_prompt=None, do_classifier_free_guidance: bool = True,
                      num_videos_per_prompt: int = 1, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, max_sequence_length: int = 512,
                      device=None, dtype=None):
        """``(prompt_embeds, negative_prompt_embeds)``, each ``[B * num_videos_per_prompt, L, D]``, as diffusers'
        ``WanPipeline.encode_prompt`` gives them, except that without a negative prompt the negative features are
        None (the pipeline's unconditional branch then uses zeros, the null text stdit trains with; pass
        ``negative_prompt=""`` for Wan's default)."""
        device = device or self._execution_device
        if dtype is None:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else torch.float32
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both.")
        if prompt is not None:
            prompts = _as_prompts(prompt, "prompt")
            prompt_embeds = self._get_prompt_embeds(prompts, max_sequence_length, device, dtype)
        elif prompt_embeds is None:
            raise ValueError("pass prompt or prompt_embeds.")
        b = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt is not None:
            negs = _as_prompts(negative_prompt, "negative_prompt")
            negs = negs * b if len(negs) == 1 else negs
            if len(negs) != b:
                raise ValueError(f"{len(negs)} negative prompts for {b} prompts: give one, or one per prompt.")
            negative_prompt_embeds = self._get_prompt_embeds(negs, prompt_embeds.shape[1], device, dtype)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        return _repeat(prompt_embeds, num_videos_per_prompt), _repeat(negative_prompt_embeds, num_videos_per_prompt)

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

    def _check_text_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        text_dim = self.transformer.config.text_dim
        given = [n for n, x in (("prompt", prompt), ("negative_prompt", negative_prompt),
                                ("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds))
                 if x is not None]
        if text_dim is None:
            if given:
                raise ValueError(f"{given[0]} was given but this model takes no text (its text_dim is not set).")
            return
        if prompt is None and prompt_embeds is None:
            raise ValueError("this model is text-conditioned: pass prompt_embeds [B, L, text_dim], or prompt strings "
                             "with a text encoder and tokenizer in the pipeline.")
        for name, x in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if x is not None and (x.ndim != 3 or x.shape[-1] != text_dim):
                raise ValueError(f"{name} has shape {tuple(x.shape)}; this model takes [B, L, text_dim={text_dim}].")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
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
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 512,
        guidance_batching: bool = True,
    ):
        """Sample videos.

        Conditioning: ``prompt`` strings (a pipeline with a text encoder; features padded as Wan pads them, to
        ``max_sequence_length``) or precomputed ``prompt_embeds`` ``[B, L, text_dim]`` (text models; the
        unconditional branch uses ``negative_prompt`` / ``negative_prompt_embeds``, else zeros), ``class_labels``
        ``[B]`` (class models; the null class is the unconditional branch), or nothing (``batch_size`` videos).
        ``num_videos_per_prompt`` videos are sampled per prompt, label or first frame. ``image``: the first frame
        (PIL image, or an array / ``[B, 3, H, W]`` tensor in [0, 1], as diffusers' image processor takes) for
        image-to-video models. ``guidance_scale > 1`` enables classifier-free guidance.
        ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` runs after each step with the
        tensors named in ``callback_on_step_end_tensor_inputs`` (of ``_callback_tensor_inputs``); the tensors it
        returns replace them (a diffusers ``PipelineCallback`` works too). ``output_type``: "pt", "np", "pil" or
        "latent" (see :class:`StDiTPipelineOutput`). ``guidance_batching``: both guidance branches in one
        transformer call of twice the batch (exact: each row sees what it sees alone; False: two calls, half the
        activation memory). A step cache on the transformer (:mod:`stdit.cache`) keeps one state per branch.
        The progress bar shows the time left and, with a step cache, the block-stack calls it skipped.
        """
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not among {self._callback_tensor_inputs}.")
        for name, n in (("num_videos_per_prompt", num_videos_per_prompt), ("num_inference_steps", num_inference_steps)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{name}={n!r}: must be a positive integer.")
        cfg = self.transformer.config
        self._check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if class_labels is not None and not cfg.num_classes:
            raise ValueError("class_labels were given but this model has no classes (num_classes is not set).")
        device = self._execution_device
        dtype = self.transformer.dtype
        timer = PartTimer(device)
        n = num_videos_per_prompt
        prompt_count = len(_as_prompts(prompt, "prompt")) if prompt is not None else None
        b0 = prompt_count or self._batch_size(prompt_embeds, class_labels, image, batch_size)
        b = b0 * n
        shape = self.latent_shape(b, num_frames, height, width)  # before any encoding: a bad size fails at once
        do_cfg = guidance_scale > 1.0 and (cfg.text_dim is not None or bool(cfg.num_classes))
        self._guidance_scale, self._do_cfg, self._interrupt, self._current_timestep = guidance_scale, do_cfg, False, None

        cond, uncond = {}, {}
        if cfg.text_dim is not None:
            with timer.part("text_encoder"):
                prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                    prompt, negative_prompt, do_cfg, n, prompt_embeds, negative_prompt_embeds, max_sequence_length,
                    device, dtype)
            if prompt_attention_mask is not None:
                # bool, 0/1 integer or additive float masks, as the model reads them (a plain .bool() would invert
                # an additive mask); one dtype for both branches, which guidance may batch together
                cond["encoder_attention_mask"] = _repeat(
                    as_keep_mask(prompt_attention_mask.to(device), "prompt_attention_mask"), n)
                neg_mask = negative_prompt_attention_mask
                if neg_mask is None and negative_prompt_embeds is None:
                    neg_mask = prompt_attention_mask
                if neg_mask is not None:
                    uncond["encoder_attention_mask"] = _repeat(
                        as_keep_mask(neg_mask.to(device), "negative_prompt_attention_mask"), n)
        if cfg.num_classes:
            labels = torch.as_tensor(class_labels if class_labels is not None else [cfg.num_classes] * b0)
            cond["class_labels"] = _repeat(labels.to(device=device, dtype=torch.long).reshape(b0), n)
            uncond["class_labels"] = torch.full((b,), cfg.num_classes, device=device, dtype=torch.long)
        if image is not None or cfg.condition_channels:
            if image is None:
                raise ValueError("this is an image-to-video model: pass image= (the first frame).")
            cond["condition"] = uncond["condition"] = _repeat(self._first_frame_condition(
                image, b0, shape[2], height, width, device, dtype), n)

        def set_text(prompt_embeds, negative_prompt_embeds):
            if cfg.text_dim is not None:
                cond["encoder_hidden_states"] = prompt_embeds.to(device, dtype)
                neg = negative_prompt_embeds if negative_prompt_embeds is not None else torch.zeros_like(prompt_embeds)
                uncond["encoder_hidden_states"] = neg.to(device, dtype)
            return stack_branches(uncond, cond) if do_cfg and guidance_batching else None

        both = set_text(prompt_embeds, negative_prompt_embeds)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        latents = latents.to(device, torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = steps = len(timesteps)
        from stdit.cache import get_step_cache

        cache = get_step_cache(self.transformer)
        if cache is not None and cache.config.calibrate:  # a calibration run skips nothing: nothing to report
            cache = None
        skipped0, computed0 = (cache.skipped, cache.computed) if cache is not None else (0, 0)
        with self.progress_bar(total=steps) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                with timer.part("transformer"):
                    if do_cfg and guidance_batching:
                        x = torch.cat([latents, latents]).to(dtype)
                        out = self._denoise(x, t.expand(2 * b), both, ["uncond"] * b + ["cond"] * b, i, steps)
                        out_u, out_c = out.float().chunk(2)
                    elif do_cfg:
                        x = latents.to(dtype)
                        out_c = self._denoise(x, t.expand(b), cond, ["cond"] * b, i, steps).float()
                        out_u = self._denoise(x, t.expand(b), uncond, ["uncond"] * b, i, steps).float()
                    else:
                        out_c = self._denoise(latents.to(dtype), t.expand(b), cond, ["cond"] * b, i, steps).float()
                    velocity = out_u + guidance_scale * (out_c - out_u) if do_cfg else out_c
                with timer.part("scheduler"):
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    if "prompt_embeds" in outputs or "negative_prompt_embeds" in outputs:
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        both = set_text(prompt_embeds, negative_prompt_embeds)
                if cache is not None:  # tqdm's bar itself shows the elapsed and the remaining time
                    skipped = cache.skipped - skipped0
                    bar.set_postfix_str(f"skipped {skipped}/{skipped + cache.computed - computed0}", refresh=False)
                bar.update()
        self._current_timestep = None

        if output_type == "latent":
            frames = latents
        else:
            video = latents
            if self.vae is not None:
                with timer.part("vae_decode"):
                    z = denormalize_latents(self.vae, latents).to(self.vae.dtype)
                    video = self.vae.decode(z, return_dict=False)[0]
            frames = self.video_processor.postprocess_video(video.float().clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        timings = timer.seconds()
        if cache is not None:
            timings.update(blocks_computed=cache.computed - computed0, blocks_skipped=cache.skipped - skipped0)
        if not return_dict:
            return (frames,)
        return StDiTPipelineOutput(frames=frames, timings=timings)
