"""Write videos to mp4 (imageio-ffmpeg, libx264, yuv420p) or GIF (Pillow).

Accepts what the pipeline returns and what datasets hold: a tensor ``[C, T, H, W]`` or ``[T, C, H, W]`` or
``[T, H, W, C]`` in [-1, 1] or [0, 1] (floats) or uint8, a numpy array of the same, or a list of PIL images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

FORMATS = (".mp4", ".gif")
LLOYD_STEPS = 3  # k-means refinements of a GIF palette


def to_uint8_frames(video, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 frames from any supported video layout.

    Float inputs are read as [-1, 1] when they hold negative values, else [0, 1], unless ``value_range`` says.
    A single channel is repeated to RGB.
    """
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return np.stack([np.asarray(f.convert("RGB")) for f in video])
    arr = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if arr.ndim != 4:
        raise ValueError(f"a video must have 4 dims ([C,T,H,W], [T,C,H,W] or [T,H,W,C]); got shape {arr.shape}.")
    if arr.shape[-1] in (1, 3):
        pass
    elif arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    elif arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 3, 0)
    else:
        raise ValueError(f"cannot find a channel axis of size 1 or 3 in video shape {arr.shape}.")
    if arr.dtype != np.uint8:
        lo, hi = value_range or ((-1.0, 1.0) if arr.min() < 0 else (0.0, 1.0))
        arr = np.clip((arr - lo) / (hi - lo), 0, 1) * 255
        arr = np.round(arr).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def video_grid(videos: Sequence, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile several videos of one size into one ``[T, H', W', 3]`` uint8 video (white gutters)."""
    frames = [to_uint8_frames(v) for v in videos]
    if not frames:
        raise ValueError("video_grid needs at least one video.")
    t, h, w, _ = frames[0].shape
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"all videos in a grid must share one shape; got {sorted({f.shape for f in frames})}.")
    cols = cols or int(np.ceil(np.sqrt(len(frames))))
    rows = int(np.ceil(len(frames) / cols))
    grid = np.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = f
    return grid


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames


def _rgb_keys(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]


def _palette_list(palette: np.ndarray) -> list[int]:
    """A ``[N, 3]`` palette as Pillow's flat list of 256 entries (the rest black)."""
    return np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)]).ravel().tolist()


def _palette_image(palette: np.ndarray) -> Image.Image:
    image = Image.new("P", (1, 1))
    image.putpalette(_palette_list(palette))
    return image


def gif_palette(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One palette for a whole ``[T, H, W, 3]`` uint8 clip and each pixel's index in it (``[T, H, W]`` uint8).

    A GIF holds at most 256 colours. A clip with no more (flat colours, as the embedded data and grids of it) keeps
    its colours exactly. Otherwise the palette is chosen once for the clip, not per frame (frames would flicker),
    by maximum coverage rather than median cut: median cut splits by pixel count and merges a small object's colour
    into a large region's (a red square in a pink gradient came back pink, 59/255 off), maximum coverage keeps each
    distinct colour region. It runs on the clip's colours at 5 bits a channel (at most 32768 of them, so it stays
    fast on any clip); then each entry becomes the mean of the full-precision pixels it stands for (a few k-means
    steps). No dithering: it would speckle flat regions.
    """
    t, h, w, _ = frames.shape
    strip = Image.fromarray(np.ascontiguousarray(frames.reshape(t * h, w, 3)))
    colors = strip.getcolors(256)
    if colors is not None:
        palette = np.array([rgb for _, rgb in colors], np.uint8)
        order = np.argsort(keys := _rgb_keys(palette))
        index = order[np.searchsorted(keys[order], _rgb_keys(frames))]
        return palette, index.astype(np.uint8)
    coarse = np.unique(_rgb_keys(frames >> 3))
    coarse = np.stack([coarse >> 16, (coarse >> 8) & 255, coarse & 255], -1).astype(np.uint8) << 3 | 4
    palette_of = Image.fromarray(coarse[None]).quantize(256, method=Image.Quantize.MAXCOVERAGE,
                                                        dither=Image.Dither.NONE)
    palette = np.zeros((256, 3), np.uint8)
    chosen = np.array(palette_of.getpalette()[:768], np.uint8).reshape(-1, 3)
    palette[:len(chosen)] = chosen
    for _ in range(LLOYD_STEPS):
        index = np.asarray(strip.quantize(palette=_palette_image(palette), dither=Image.Dither.NONE)).ravel()
        counts = np.bincount(index, minlength=256)
        sums = np.stack([np.bincount(index, weights=frames[..., c].ravel(), minlength=256) for c in range(3)], -1)
        used = counts > 0
        palette[used] = np.round(sums[used] / counts[used, None]).astype(np.uint8)
    index = np.asarray(strip.quantize(palette=_palette_image(palette), dither=Image.Dither.NONE))
    return palette, index.reshape(t, h, w)


def gif_frames(frames: np.ndarray, scale: int = 1) -> list[Image.Image]:
    """``[T, H, W, 3]`` uint8 frames as palette images sharing :func:`gif_palette`'s palette, scaled up after it."""
    palette, index = gif_palette(frames)
    index = _upscale(index[..., None], scale)[..., 0]
    flat = _palette_list(palette)
    images = []
    for f in index:
        image = Image.frombytes("P", (f.shape[1], f.shape[0]), np.ascontiguousarray(f).tobytes())
        image.putpalette(flat)
        images.append(image)
    return images


def export_video(video, path: str | Path, fps: int = 8, scale: int = 1, quality: float = 8.0) -> Path:
    """Write ``video`` to ``path`` (.mp4 or .gif, chosen by the suffix) and return the path.

    ``scale`` repeats pixels (nearest neighbour) so tiny videos stay sharp when viewed. mp4 uses libx264 with
    yuv420p, which needs even sizes: odd sizes are padded by one pixel by edge replication.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported video format {suffix!r} for {path}; use one of {FORMATS}.")
    if fps <= 0:
        raise ValueError(f"fps must be > 0; got {fps}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = gif_frames(to_uint8_frames(video), int(scale))
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       optimize=False, disposal=1)
        return path
    import imageio.v2 as imageio

    frames = _upscale(to_uint8_frames(video), int(scale))
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    try:
        import imageio_ffmpeg  # noqa: F401  (without it imageio silently picks a writer that cannot do mp4)
    except ImportError as e:
        raise ImportError(f"Writing {path} needs imageio-ffmpeg: pip install imageio-ffmpeg (or write a .gif).") from e
    writer = imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=quality,
                                macro_block_size=1, ffmpeg_log_level="error")
    try:
        for f in frames:
            writer.append_data(f)
    finally:
        writer.close()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 frames of an mp4/webm/gif file (imageio; for checks and small files)."""
    import imageio.v3 as iio

    frames = iio.imread(path, index=None)
    if frames.ndim == 3:
        frames = frames[None]
    return frames[..., :3]
