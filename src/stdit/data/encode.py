"""``stdit encode``: a folder of videos -> VAE latents + text features in safetensors shards for training.

Text features come from a text encoder (a local transformers model directory: T5/UMT5 encoders as Wan uses, or any
``AutoModel`` with ``last_hidden_state``) applied to each video's sidecar caption, or are read precomputed from
``<stem>.safetensors`` files (key ``prompt_embeds`` ``[L, D]``) beside the videos or in ``--text-features``.
Without a VAE the "latents" are the pixel clips themselves (for pixel-space models).

For Wan 2.1 image-to-video models, ``--image-encoder`` (a CLIP vision model directory, as Wan I2V ships it) adds each
clip's CLIP image features and ``--image-condition first|first-last`` the condition input the model concatenates to
its noisy latents, both computed exactly as diffusers' ``WanImageToVideoPipeline`` computes them at sampling time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from stdit.cli import format_size
from stdit.data.latents import INDEX, write_shard

TextEncoder = Callable[[list[str]], list[torch.Tensor]]
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
IMAGE_CONDITIONS = ("first", "first-last")


def load_text_encoder(path: str | Path, device: torch.device, max_length: int = 512) -> TextEncoder:
    """A function ``captions -> [L_i, D] features`` (padding removed) from a local transformers directory."""
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("--text-encoder needs the transformers package (pip install transformers); or pass "
                          "precomputed features with --text-features.") from e
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in ("t5", "mt5", "umt5"):
        import transformers

        cls = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}[model_type]
        model = getattr(transformers, cls).from_pretrained(path)
    else:
        model = AutoModel.from_pretrained(path)
    model = model.to(device).eval()

    @torch.no_grad()
    def encode(captions: list[str]) -> list[torch.Tensor]:
        tok = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").to(device)
        hidden = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        lengths = tok.attention_mask.sum(dim=1).tolist()
        return [h[:max(1, n)].float().cpu() for h, n in zip(hidden, lengths)]

    return encode


def load_image_encoder(path: str | Path, device: torch.device) -> ImageEncoder:
    """A function ``frames [N, 3, H, W] in [-1, 1] -> [N * L, D]`` CLIP image features from a local transformers
    directory (``CLIPVisionModel`` + its image processor): the penultimate hidden states, as
    ``WanImageToVideoPipeline.encode_image`` takes them. The N images' tokens are concatenated, which is the layout
    a first-last-frame model's image embedder (``pos_embed_seq_len = 2 L``) reads."""
    try:
        from transformers import AutoImageProcessor, CLIPVisionModel
    except ImportError as e:
        raise ImportError("--image-encoder needs the transformers package (pip install transformers).") from e
    processor = AutoImageProcessor.from_pretrained(path)
    model = CLIPVisionModel.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def encode(frames: torch.Tensor) -> torch.Tensor:
        # the processor is given uint8 images, as the pipeline gives it PIL images, so it rescales them the same way
        images = [((f.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
                  for f in frames]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device, model.dtype)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return hidden.float().cpu().flatten(0, 1)

    return encode


def image_condition(video: torch.Tensor, vae, kind: str) -> torch.Tensor:
    """Wan 2.1 I2V's condition input for one clip ``[3, T, H, W]`` in [-1, 1]: ``[tf + C, T', H', W']``, the mask
    of known frames at the latent frame rate (``tf`` channels, one per frame a latent frame covers) followed by the
    latents of the clip with every unknown frame set to 0, as ``WanImageToVideoPipeline.prepare_latents`` builds it
    (``kind="first-last"``: the last frame is known too, as for first-last-frame models). Without a VAE: the pixels,
    with one mask channel."""
    from stdit.pipeline import vae_encode, vae_scale_factors

    if kind not in IMAGE_CONDITIONS:
        raise ValueError(f"image condition {kind!r}; choose one of {IMAGE_CONDITIONS}.")
    frames = video.shape[1]
    known = torch.zeros(frames, dtype=torch.bool)
    known[0] = True
    if kind == "first-last":
        known[-1] = True
    cond_video = video * known.view(1, -1, 1, 1).to(video.dtype)
    z = vae_encode(vae, cond_video[None])[0].float().cpu() if vae is not None else cond_video.float()
    tf, _ = vae_scale_factors(vae)
    # the first frame alone makes the first latent frame: its mask is repeated over the tf frames it stands for
    mask = torch.cat([known[:1].repeat(tf), known[1:]]).float()
    if mask.numel() != tf * z.shape[1]:
        raise ValueError(f"a {frames}-frame clip does not fit this VAE's {tf}x temporal compression "
                         f"({z.shape[1]} latent frames).")
    mask = mask.view(z.shape[1], tf).t()  # [tf, T']
    return torch.cat([mask[:, :, None, None].expand(-1, -1, *z.shape[2:]), z])


def precomputed_text(video_path: Path, features_dir: Path | None) -> torch.Tensor:
    from safetensors.torch import load_file

    candidates = [(features_dir / video_path.stem) if features_dir else None, video_path.with_suffix("")]
    for c in candidates:
        if c is not None and c.with_suffix(".safetensors").is_file():
            f = c.with_suffix(".safetensors")
            try:
                tensors = load_file(str(f))
            except Exception as e:  # safetensors' errors do not name the file
                raise ValueError(f"{f}: cannot read these text features as safetensors ({e}).") from e
            if "prompt_embeds" not in tensors:
                raise ValueError(f"{f} has no 'prompt_embeds' tensor (it has: {', '.join(sorted(tensors)) or 'none'}).")
            emb = tensors["prompt_embeds"]
            return emb[0] if emb.ndim == 3 else emb
    raise FileNotFoundError(f"no precomputed text features for {video_path.name}: expected "
                            f"{video_path.stem}.safetensors beside it or in the --text-features folder.")


def encode_dataset(dataset, out_dir: str | Path, vae=None, text_encoder: TextEncoder | None = None,
                   text_features_dir: str | Path | None = None, shard_size: int = 256, progress: bool = True,
                   image_encoder: ImageEncoder | None = None, image_condition_kind: str | None = None) -> Path:
    """Encode every clip of ``dataset`` (a :class:`~stdit.data.video_folder.VideoFolderDataset`) into shards.

    ``image_encoder`` adds each clip's CLIP features of its first frame (and last, with
    ``image_condition_kind="first-last"``); ``image_condition_kind`` adds its I2V condition input
    (:func:`image_condition`).

    Returns the path of ``index.json``, written last so a folder with an index is always complete.
    """
    from tqdm.auto import tqdm

    from stdit.pipeline import vae_encode, vae_scale_factors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features_dir = Path(text_features_dir) if text_features_dir else None
    first_path = Path(dataset.items[0][0]) if hasattr(dataset, "items") else None
    beside = first_path is not None and first_path.with_suffix(".safetensors").is_file()
    use_text = text_encoder is not None or features_dir is not None or beside
    if vae is not None:
        tf, _ = vae_scale_factors(vae)
        bad = sorted({b[0] for b in dataset.bucket_ids if (b[0] - 1) % tf})
        if bad:
            raise ValueError(f"clip lengths {bad} do not fit this VAE: frames - 1 must be divisible by {tf} "
                             f"(e.g. {(bad[0] - 1) // tf * tf + 1}).")
    if text_encoder is not None and not getattr(dataset, "has_captions", True) \
            and not getattr(dataset, "allow_missing_captions", False):
        raise ValueError(f"no video under {getattr(dataset, 'root', 'the dataset')} has a caption (<stem>.txt beside "
                         "it), so the text encoder has nothing to encode; add captions or pass precomputed features "
                         "with --text-features.")
    if image_condition_kind is not None and image_condition_kind not in IMAGE_CONDITIONS:
        raise ValueError(f"image condition {image_condition_kind!r}; choose one of {IMAGE_CONDITIONS}.")
    shards, latents, embeds, shapes, captions, paths = [], [], [], [], [], []
    extra: dict[str, list[torch.Tensor]] = {"image_embeds": [], "condition": []}

    def flush():
        name = f"shard-{len(shards):05d}.safetensors"
        write_shard(out / name, latents, embeds if use_text else None, {k: v for k, v in extra.items() if v})
        shards.append({"file": name, "shapes": [list(s) for s in shapes], "captions": list(captions),
                       "paths": list(paths)})
        for lst in (latents, embeds, shapes, captions, paths, *extra.values()):
            lst.clear()

    for i in tqdm(range(len(dataset)), desc="encode", disable=not progress):
        item = dataset[i]
        video = item["video"][None]
        z = vae_encode(vae, video)[0] if vae is not None else video[0]
        latents.append(z.float().cpu())
        shapes.append(tuple(z.shape))
        captions.append(item.get("caption", ""))
        paths.append(item.get("path", ""))
        if text_encoder is not None:
            embeds.append(text_encoder([item.get("caption", "")])[0])
        elif use_text:
            embeds.append(precomputed_text(Path(item["path"]), features_dir).float())
        if image_encoder is not None:
            last = image_condition_kind == "first-last"
            extra["image_embeds"].append(image_encoder(item["video"][:, [0, -1] if last else [0]].transpose(0, 1)))
        if image_condition_kind is not None:
            extra["condition"].append(image_condition(item["video"], vae, image_condition_kind))
        if len(latents) == shard_size:
            flush()
    if latents:
        flush()
    index = {"shards": shards, "text_features": use_text, "image_features": image_encoder is not None,
             "image_condition": image_condition_kind, "count": sum(len(s["shapes"]) for s in shards),
             "vae": getattr(getattr(vae, "config", None), "_name_or_path", None) if vae is not None else None}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / INDEX)
    return out / INDEX


def _parse_buckets(text: str | None):
    if not text:
        return None
    try:
        return [tuple(int(x) for x in b.lower().split("x")) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--buckets {text!r}: use FRAMESxHEIGHTxWIDTH separated by commas, e.g. 17x256x256,"
                         "17x256x448.") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", required=True, help="folder of videos (mp4/webm/mov/mkv/gif), searched "
                        "recursively; captions from sidecar .txt files")
    parser.add_argument("--out", required=True, help="output folder for shards + index.json")
    parser.add_argument("--vae", help="diffusers video autoencoder directory (e.g. AutoencoderKLWan); omit to "
                        "store pixels")
    parser.add_argument("--text-encoder", help="transformers text-encoder directory (tokenizer + model)")
    parser.add_argument("--text-features", help="folder of precomputed <video-stem>.safetensors text features "
                        "(key prompt_embeds)")
    parser.add_argument("--image-encoder", help="CLIP vision model directory (Wan 2.1 I2V's image_encoder, with "
                        "its image processor): store each clip's image features for image-to-video training")
    parser.add_argument("--image-condition", choices=IMAGE_CONDITIONS, help="store each clip's image-to-video "
                        "condition input (first frame, or first and last, known): for Wan 2.1 I2V / FLF2V models")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--buckets", help="FxHxW buckets, comma-separated (overrides --frames/--height/--width)")
    parser.add_argument("--max-text-length", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    parser.add_argument("--allow-missing-captions", action="store_true", help="encode videos without a .txt "
                        "caption with an empty caption (default: an error listing them)")
    parser.add_argument("--seed", type=int, default=0, help="seed for clip start positions")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Errors are raised; ``stdit.cli.run_command`` prints them as one ``error:`` line."""
    from stdit.data.video_folder import VideoFolderDataset
    from stdit.hub import check_local_or_repo

    start = time.perf_counter()
    if args.text_encoder and args.text_features:
        raise ValueError("give --text-encoder or --text-features, not both.")
    if args.text_features and not Path(args.text_features).is_dir():
        raise FileNotFoundError(f"--text-features {args.text_features}: no such folder.")
    if args.image_encoder and not args.image_condition:
        raise ValueError("--image-encoder is for image-to-video training, which also needs the condition input: "
                         "add --image-condition first (or first-last).")
    for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder),
                        ("--image-encoder", args.image_encoder)):
        if value:
            check_local_or_repo(value, flag)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dataset = VideoFolderDataset(args.videos, num_frames=args.frames, height=args.height, width=args.width,
                                 frame_stride=args.frame_stride, buckets=_parse_buckets(args.buckets),
                                 seed=args.seed, allow_missing_captions=args.allow_missing_captions)
    vae = None
    if args.vae:
        from diffusers import AutoModel

        vae = AutoModel.from_pretrained(args.vae).to(device).eval()
    text_encoder = load_text_encoder(args.text_encoder, device, args.max_text_length) if args.text_encoder else None
    image_encoder = load_image_encoder(args.image_encoder, device) if args.image_encoder else None
    index = encode_dataset(dataset, args.out, vae, text_encoder, args.text_features, args.shard_size,
                           progress=not args.no_progress, image_encoder=image_encoder,
                           image_condition_kind=args.image_condition)
    info = json.loads(index.read_text())
    size = sum((index.parent / s["file"]).stat().st_size for s in info["shards"])
    n = len(info["shards"])
    print(f"wrote {info['count']} clips in {n} shard{'s' * (n != 1)} ({format_size(size)}, "
          f"{'latents' if vae is not None else 'pixels'}{' + text features' if info['text_features'] else ''}"
          f"{' + image features' if info['image_features'] else ''}"
          f"{' + ' + info['image_condition'] + '-frame condition' if info['image_condition'] else ''}) to "
          f"{index.parent}/ in {time.perf_counter() - start:.0f} s (train with data.kind=latents "
          f"data.root={index.parent})")
    return 0
