"""``stdit sample``: sample videos from a saved StDiT and write them as mp4 / GIF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n  stdit sample --model runs/tiny/model --class-label 0 1 2 3 --out samples.gif\n"
                     "  stdit sample --model DIR --vae VAE_DIR --prompt-embeds text.safetensors --frames 17 "
                     "--height 256 --width 256 --out clip.mp4")
    parser.add_argument("--model", required=True, help="directory written by save_pretrained (e.g. runs/tiny/model)")
    parser.add_argument("--out", default="sample.mp4", help="output file (.mp4 or .gif); several videos are tiled")
    parser.add_argument("--class-label", type=int, nargs="*", help="class labels, one video each (class models)")
    parser.add_argument("--prompt-embeds", help="safetensors file with prompt_embeds [B, L, D] or [L, D] "
                        "(and optionally negative_prompt_embeds) for text models")
    parser.add_argument("--image", help="first frame (image file) for image-to-video models")
    parser.add_argument("--num-videos", type=int, default=1, help="videos to sample (unconditional models)")
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


def _scheduler(model_dir: Path, name: str | None, shift: float | None):
    from stdit.pipeline import make_scheduler

    saved = model_dir / "scheduler_config.json"
    if name is None and saved.is_file():
        import json

        cfg = json.loads(saved.read_text())
        name = "unipc" if cfg.get("_class_name") == "UniPCMultistepScheduler" else "euler"
        if shift is None:
            shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
    return make_scheduler(name or "euler", shift if shift is not None else 1.0)


def run(args: argparse.Namespace) -> int:
    from stdit.export import export_video, video_grid
    from stdit.model import StDiT
    from stdit.pipeline import StDiTPipeline

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir} is not a saved model directory (no config.json).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = StDiT.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    vae = None
    if args.vae:
        from diffusers import AutoModel

        vae = AutoModel.from_pretrained(args.vae).to(device).eval()
    pipe = StDiTPipeline(model, _scheduler(model_dir, args.scheduler, args.shift), vae)
    pipe.set_progress_bar_config(disable=args.no_progress)
    kwargs = {}
    if args.class_label:
        kwargs["class_labels"] = args.class_label
    else:
        kwargs["batch_size"] = args.num_videos
    if args.prompt_embeds:
        from safetensors.torch import load_file

        t = load_file(args.prompt_embeds)
        emb = t["prompt_embeds"]
        kwargs["prompt_embeds"] = emb[None] if emb.ndim == 2 else emb
        if "negative_prompt_embeds" in t:
            neg = t["negative_prompt_embeds"]
            kwargs["negative_prompt_embeds"] = neg[None] if neg.ndim == 2 else neg
    if args.image:
        from PIL import Image

        kwargs["image"] = Image.open(args.image).convert("RGB")
    try:
        frames = pipe(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                      output_type="pt", **kwargs).frames
        video = frames[0] if len(frames) == 1 else video_grid(list(frames.float().cpu()))
        path = export_video(video, args.out, fps=args.fps, scale=args.scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
