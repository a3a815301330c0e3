"""``stdit sample``: sample videos from a saved StDiT (or a saved StDiTPipeline) and write them as mp4 / GIF.

Every check a user can fail (output path and format, sizes, conditioning flags) runs before the model is sampled,
and the heavy components load in order of need, so a typo costs seconds, not a text encoder load and a sampling
run. Errors are raised as ``ValueError`` / ``OSError``; :func:`stdit.cli.run_command` prints them as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n  stdit sample --model runs/tiny/model --class-label 0 1 2 3 --out samples.gif\n"
                     "  stdit sample --model DIR --vae VAE_DIR --prompt-embeds text.safetensors --frames 17 "
                     "--height 256 --width 256 --out clip.mp4\n"
                     "  stdit sample --model DIR --vae VAE_DIR --text-encoder Wan2.1-T2V-1.3B-Diffusers "
                     "--prompt \"a red square moves left\" --negative-prompt \"blurry\" --guidance 5 --out clip.mp4")
    parser.add_argument("--model", required=True, help="directory written by save_pretrained: a model "
                        "(config.json, e.g. runs/tiny/model) or a StDiTPipeline (model_index.json)")
    parser.add_argument("--out", default="sample.mp4", help="output file (.mp4 or .gif); several videos are tiled")
    parser.add_argument("--class-label", type=int, nargs="*", help="class labels, one video each (class models)")
    parser.add_argument("--prompt", nargs="+", help="text prompt(s), one video each (text models with a text "
                        "encoder: in the model/pipeline directory or given with --text-encoder)")
    parser.add_argument("--negative-prompt", help="negative prompt for classifier-free guidance (default: zeros, "
                        "the null text stdit trains with)")
    parser.add_argument("--text-encoder", help="text encoder directory (transformers; tokenizer beside it), or a "
                        "directory holding text_encoder/ and tokenizer/ (a Wan diffusers checkpoint)")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens (Wan: 512)")
    parser.add_argument("--prompt-embeds", help="safetensors file with prompt_embeds [B, L, D] or [L, D] "
                        "(and optionally negative_prompt_embeds) for text models")
    parser.add_argument("--image", help="first frame (image file) for image-to-video models")
    parser.add_argument("--num-videos", type=int, default=1, help="videos per prompt / label / first frame (or in "
                        "all, for unconditional models)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    parser.add_argument("--scheduler", choices=("euler", "unipc"), default=None,
                        help="default: the model directory's scheduler_config.json, else euler")
    parser.add_argument("--shift", type=float, default=None, help="timestep shift (default: the saved scheduler's)")
    parser.add_argument("--vae", help="diffusers video autoencoder directory for latent models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4, help="pixel repeat factor of the written video")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--cache", choices=("teacache", "magcache"), help="step cache: skip the block stack on "
                        "steps where it would change little (stdit.cache), calibrated by --calibrate-cache")
    parser.add_argument("--cache-threshold", type=float, help="the step cache's threshold (higher: faster, "
                        "further from the uncached video; default 0.1)")
    parser.add_argument("--tile-attention", choices=("window", "topk"), help="sparse self-attention over 3D tiles "
                        "of latent tokens (stdit.sparse): a window of neighbouring tiles, or the top-k tiles by "
                        "pooled score")
    parser.add_argument("--tile", type=int, nargs=3, default=(4, 4, 4), metavar=("T", "H", "W"),
                        help="tokens per tile with --tile-attention (their product a power of two >= 16)")
    parser.add_argument("--window", type=int, nargs=3, default=(3, 3, 3), metavar=("T", "H", "W"),
                        help="key tiles around each query tile with --tile-attention window")
    parser.add_argument("--keep", type=float, default=0.125, help="fraction of key tiles with --tile-attention topk")
    parser.add_argument("--dense-above", type=float, default=1000.0, help="with --tile-attention: timesteps above "
                        "this (0..1000, the noisiest steps) attend densely")
    parser.add_argument("--fp8", choices=("attention", "all"), help="FP8 inference on a GPU (stdit.fp8): 8-bit "
                        "attention in every block, or that and the blocks' linears in FP8 (needs torchao: "
                        "pip install 'stdit[fp8]')")
    parser.add_argument("--calibrate-cache", action="store_true", help="sample uncached and write the step cache's "
                        "calibration (step_cache.json) into the model directory, for later --cache runs with the "
                        "same scheduler and steps")


def _scheduler(scheduler_dir: Path, name: str | None, shift: float | None):
    from stdit.pipeline import make_scheduler

    saved = scheduler_dir / "scheduler_config.json"
    if name is None and saved.is_file():
        cfg = json.loads(saved.read_text())
        name = "unipc" if cfg.get("_class_name") == "UniPCMultistepScheduler" else "euler"
        if shift is None:
            shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
    return make_scheduler(name or "euler", shift if shift is not None else 1.0)


def check_output(out: str | Path) -> Path:
    """The output path, if a video can be written there: a supported suffix, not a directory, and a writable
    directory (or a missing one that a writable parent can hold)."""
    from stdit.export import FORMATS

    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: unsupported video format {path.suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(FORMATS)}.")
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; name a file such as {path / ('sample' + FORMATS[0])}.")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write to {parent} (permission denied).")
    return path


def check_args(args: argparse.Namespace) -> None:
    """Everything that needs no model: sizes, counts and which flags go together."""
    check_output(args.out)
    for flag, value in (("--frames", args.frames), ("--height", args.height), ("--width", args.width),
                        ("--steps", args.steps), ("--num-videos", args.num_videos), ("--fps", args.fps),
                        ("--scale", args.scale), ("--max-sequence-length", args.max_sequence_length)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer.")
    if args.prompt and args.prompt_embeds:
        raise ValueError("give --prompt or --prompt-embeds, not both.")
    if args.prompt and args.class_label:
        raise ValueError("give --prompt or --class-label, not both.")
    for flag, value in (("--model", args.model), ("--vae", args.vae), ("--text-encoder", args.text_encoder),
                        ("--prompt-embeds", args.prompt_embeds), ("--image", args.image)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value}: no such file or directory.")
    model_dir = Path(args.model)
    if not ((model_dir / "config.json").is_file() or (model_dir / "model_index.json").is_file()):
        raise ValueError(f"{model_dir} is not a saved model directory (no config.json, and no model_index.json of "
                         "a saved pipeline).")
    tile_attention(args)  # one clear error for bad settings, before anything loads
    if args.fp8 and (args.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("--fp8 runs 8-bit kernels on a CUDA GPU; this run is on the CPU (drop --fp8).")
    if args.fp8 == "all":
        from stdit.fp8 import _torchao

        _torchao()  # the install hint now, not after the model loaded
    if args.cache and args.calibrate_cache:
        raise ValueError("give --cache or --calibrate-cache, not both (calibration samples uncached).")
    if args.cache_threshold is not None and not args.cache:
        raise ValueError("--cache-threshold needs --cache teacache|magcache.")
    if args.cache_threshold is not None and not args.cache_threshold >= 0:
        raise ValueError(f"--cache-threshold {args.cache_threshold}: must be >= 0 (0 never skips).")
    from stdit.cache import CALIBRATION_FILE

    calibration = calibration_dir(args) / CALIBRATION_FILE
    if args.cache == "magcache" and not calibration.is_file():
        raise ValueError(f"--cache magcache needs the model's calibration, and {calibration} does not exist: run "
                         "the same command once with --calibrate-cache instead of --cache.")
    if args.calibrate_cache and not os.access(calibration.parent, os.W_OK):
        raise ValueError(f"--calibrate-cache writes {calibration}, but {calibration.parent} is not writable.")


def tile_attention(args: argparse.Namespace):
    """The ``--tile-attention`` settings as a :class:`stdit.sparse.TileAttention`, or None without the flag."""
    if not args.tile_attention:
        return None
    from stdit.sparse import TileAttention

    return TileAttention(tile=args.tile, window=args.window, select=args.tile_attention, keep=args.keep,
                         max_timestep=args.dense_above)


def calibration_dir(args: argparse.Namespace) -> Path:
    """Where the step cache's calibration lives: beside the transformer's config.json."""
    model_dir = Path(args.model)
    return model_dir / "transformer" if (model_dir / "model_index.json").is_file() else model_dir


def load_text_encoder(path: str | Path, dtype: torch.dtype):
    """``(text_encoder, tokenizer)`` from a transformers directory, or from the text_encoder/ and tokenizer/
    folders of a pipeline checkpoint. T5 / mT5 / UMT5 load as their encoder-only models, as Wan uses them."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("--prompt needs the transformers package: pip install transformers") from e
    path = Path(path)
    enc_dir, tok_dir = path, path
    if (path / "text_encoder").is_dir():
        enc_dir, tok_dir = path / "text_encoder", path / "tokenizer"
        if not tok_dir.is_dir():
            tok_dir = enc_dir
    if not (enc_dir / "config.json").is_file():
        raise ValueError(f"--text-encoder {path}: no config.json (a transformers model directory, or one with "
                         "text_encoder/ and tokenizer/ in it).")
    model_type = AutoConfig.from_pretrained(enc_dir).model_type
    cls = {"t5": transformers.T5EncoderModel, "mt5": transformers.MT5EncoderModel,
           "umt5": transformers.UMT5EncoderModel}.get(model_type, AutoModel)
    return cls.from_pretrained(enc_dir).to(dtype).eval(), AutoTokenizer.from_pretrained(tok_dir)


def _has_text_encoder(d: Path) -> bool:
    return (d / "text_encoder" / "config.json").is_file()


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The pipeline without its text encoder (loaded later, once the sizes are known to be valid), and where the
    text encoder will come from (a directory, or None)."""
    from stdit.model import StDiT
    from stdit.pipeline import StDiTPipeline

    model_dir = Path(args.model)
    if (model_dir / "model_index.json").is_file():
        pipe = StDiTPipeline.from_pretrained(model_dir, text_encoder=None, tokenizer=None)
        pipe.transformer.to(dtype)  # (the VAE stays in its saved precision, as --vae loads one)
        if args.scheduler is not None or args.shift is not None:
            pipe.scheduler = _scheduler(model_dir / "scheduler", args.scheduler, args.shift)
    else:
        model = StDiT.from_pretrained(model_dir, torch_dtype=dtype)
        pipe = StDiTPipeline(model, _scheduler(model_dir, args.scheduler, args.shift))
    if args.vae:
        from diffusers import AutoModel

        pipe = StDiTPipeline(pipe.transformer, pipe.scheduler, AutoModel.from_pretrained(args.vae).eval())
    pipe.to(device)
    pipe.transformer.eval()
    text_dir = args.text_encoder or (str(model_dir) if _has_text_encoder(model_dir) else None)
    return pipe, text_dir


def _conditioning(args: argparse.Namespace, pipe, text_dir) -> dict:
    cfg = pipe.transformer.config
    kwargs = {}
    if args.prompt or args.negative_prompt:
        if cfg.text_dim is None:
            raise ValueError("--prompt was given but this model takes no text (its text_dim is not set).")
        if text_dir is None:
            raise ValueError(f"--prompt needs a text encoder and {args.model} holds none (no text_encoder/): pass "
                             "--text-encoder DIR (e.g. a Wan checkpoint's text_encoder/ folder), or use "
                             "--prompt-embeds.")
    if args.class_label:
        kwargs["class_labels"] = args.class_label
    if args.prompt:
        kwargs["prompt"] = args.prompt
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.prompt_embeds:
        from safetensors.torch import load_file

        t = load_file(args.prompt_embeds)
        if "prompt_embeds" not in t:
            raise ValueError(f"--prompt-embeds {args.prompt_embeds}: no 'prompt_embeds' tensor in it.")
        emb = t["prompt_embeds"]
        kwargs["prompt_embeds"] = emb[None] if emb.ndim == 2 else emb
        if "negative_prompt_embeds" in t and args.negative_prompt is None:
            neg = t["negative_prompt_embeds"]
            kwargs["negative_prompt_embeds"] = neg[None] if neg.ndim == 2 else neg
    if args.image:
        from PIL import Image

        kwargs["image"] = Image.open(args.image).convert("RGB")
    return kwargs


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from stdit.export import export_video, video_grid

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, text_dir = build_pipeline(args, device, dtype)
    pipe.latent_shape(1, args.frames, args.height, args.width)  # sizes the patch and VAE take, before sampling
    kwargs = _conditioning(args, pipe, text_dir)
    if args.prompt or args.negative_prompt:
        text_encoder, tokenizer = load_text_encoder(text_dir, dtype)
        pipe.register_modules(text_encoder=text_encoder.to(device), tokenizer=tokenizer)
    if any(k in kwargs for k in ("class_labels", "prompt", "prompt_embeds", "image")):
        kwargs["num_videos_per_prompt"] = args.num_videos
    else:
        kwargs["batch_size"] = args.num_videos
    pipe.set_progress_bar_config(disable=args.no_progress)
    if args.tile_attention:
        pipe.transformer.set_tile_attention(tile_attention(args))
    if args.fp8:
        from stdit.fp8 import FP8Attention

        if args.fp8 == "all":
            pipe.transformer.quantize_fp8()
        pipe.transformer.set_fp8_attention(FP8Attention())
    with _step_cache(args, pipe) as calibrator:
        out = pipe(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                   max_sequence_length=args.max_sequence_length, output_type="pt", **kwargs)
    frames = out.frames
    video = frames[0] if len(frames) == 1 else video_grid(list(frames.float().cpu()))
    path = export_video(video, args.out, fps=args.fps, scale=args.scale)
    print(f"wrote {path} ({len(frames)} video{'s' if len(frames) > 1 else ''}, {args.frames} frames, "
          f"{args.height}x{args.width}, {args.steps} steps)")
    if calibrator is not None:
        print(f"wrote the step cache calibration {calibrator.result().save(calibration_dir(args))} (for --cache "
              "teacache|magcache runs with this scheduler and step count)")
    print("time: " + time_summary(out.timings))
    return 0


def time_summary(timings: dict) -> str:
    """``transformer 12.31 s, scheduler 0.08 s, ..., total 14.20 s; step cache skipped 18 of 30 block-stack
    calls``."""
    from stdit.pipeline import format_timings

    text = format_timings(timings)
    if "blocks_skipped" in timings:
        done = timings["blocks_skipped"] + timings["blocks_computed"]
        text += f"; step cache skipped {timings['blocks_skipped']} of {done} block-stack calls"
    return text


@contextlib.contextmanager
def _step_cache(args: argparse.Namespace, pipe):
    """The step cache for this run: on (``--cache``), recording a calibration (``--calibrate-cache``, yields the
    calibrator), or off; the transformer is left as it was afterwards."""
    from stdit.cache import (CALIBRATION_FILE, StepCacheConfig, calibrating, disable_step_cache,
                             enable_step_cache)

    if args.calibrate_cache:
        info = {"scheduler": type(pipe.scheduler).__name__, "steps": args.steps, "guidance": args.guidance,
                "frames": args.frames, "height": args.height, "width": args.width}
        with calibrating(pipe.transformer, info=info) as calibrator:
            yield calibrator
        return
    if not args.cache:
        yield None
        return
    settings = {"method": args.cache}
    if args.cache_threshold is not None:
        settings["threshold"] = args.cache_threshold
    if (calibration_dir(args) / CALIBRATION_FILE).is_file():
        config = StepCacheConfig.from_pretrained(calibration_dir(args), **settings)
    else:
        print(f"note: no {CALIBRATION_FILE} in {calibration_dir(args)}: the step cache reads the indicator's raw "
              "change (run once with --calibrate-cache to calibrate it)")
        config = StepCacheConfig(**settings)
    enable_step_cache(pipe.transformer, config)
    try:
        yield None
    finally:
        disable_step_cache(pipe.transformer)
