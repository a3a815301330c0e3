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
    frames = _upscale(to_uint8_frames(video), int(scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       optimize=False, disposal=1)
        return path
    import imageio.v2 as imageio

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
