"""A folder of videos (mp4, webm, mov, mkv, gif), decoded with PyAV (or imageio when PyAV is absent).

Each video gives one clip per epoch-independent draw: ``num_frames`` frames every ``frame_stride``, starting at a
point chosen from ``(seed, index)``, resized so the shorter side covers the target and centre-cropped.
Captions come from a sidecar text file with the same stem (``clip.mp4`` -> ``clip.txt``); a video without one is
an error unless ``allow_missing_captions`` (then its caption is ``""``, with one warning counting them), except in a
folder with no captions at all (for class-conditional or unconditional models; one warning). With ``buckets`` each
video is assigned the (frames, height, width) bucket closest to its aspect ratio that its length allows. Every
decode or caption error names its file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stdit.data.buckets import Bucket, nearest_bucket

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def probe_video(path: str | Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video file (frames are counted by decoding when the header lacks them)."""
    if _has_av():
        import av

        with av.open(str(path)) as c:
            s = c.streams.video[0]
            n = s.frames
            if not n:
                n = sum(1 for _ in c.decode(video=0))
            return int(n), int(s.codec_context.height), int(s.codec_context.width)
    import imageio.v3 as iio

    frames = iio.imread(path, index=None)
    return int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])


def decode_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (sorted) of a video as ``[len, H, W, 3]`` uint8, decoding only up to the last one."""
    wanted = set(indices)
    last = max(indices)
    out: dict[int, np.ndarray] = {}
    if _has_av():
        import av

        with av.open(str(path)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    else:
        import imageio.v3 as iio

        for i, frame in enumerate(iio.imiter(path)):
            if i in wanted:
                out[i] = np.asarray(frame)[..., :3]
            if i >= last:
                break
    missing = [i for i in indices if i not in out]
    if missing:
        raise ValueError(f"{path}: could not decode frame(s) {missing[:5]} (file shorter than its header says?).")
    return np.stack([out[i] for i in indices])


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _listing(names: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[T, C, H, W]`` float -> ``[T, C, height, width]``: scale the shorter side to cover, then centre-crop."""
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top:top + height, left:left + width]


class VideoFolderDataset(Dataset):
    """Clips ``{"video": [3, T, H, W] in [-1, 1], "caption": str, "path": str}`` from every video under ``root``.

    Args:
        root: folder searched recursively.
        num_frames, height, width: clip size when ``buckets`` is None.
        frame_stride: take every n-th frame.
        buckets: (frames, height, width) buckets; ``bucket_ids`` tells each item's bucket.
        seed: clip start positions depend on ``(seed, index)``.
        allow_missing_captions: give videos without a ``<stem>.txt`` the caption ``""`` instead of an error.
    """

    def __init__(self, root: str | Path, num_frames: int = 16, height: int = 256, width: int = 256,
                 frame_stride: int = 1, buckets: list[Bucket] | None = None, seed: int = 0,
                 extensions: tuple[str, ...] = VIDEO_EXTENSIONS, allow_missing_captions: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist.")
        self.frame_stride, self.seed = frame_stride, seed
        self.buckets = [tuple(b) for b in (buckets or [(num_frames, height, width)])]
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        if not files:
            raise FileNotFoundError(f"no videos ({', '.join(extensions)}) found under {self.root}.")
        self.items: list[tuple[Path, int, Bucket]] = []
        unreadable, short = [], []
        for p in files:
            try:
                n, h, w = probe_video(p)
            except Exception as e:  # one unreadable file should not stop a large folder
                unreadable.append(f"{p.relative_to(self.root)} ({_reason(e)})")
                continue
            bucket = nearest_bucket((n - 1) // frame_stride + 1, h, w, self.buckets)
            if bucket is None:
                short.append(f"{p.relative_to(self.root)} (only {n} frames)")
                continue
            self.items.append((p, n, bucket))
        if not self.items:
            if not short:
                raise ValueError(f"none of the {len(files)} video file(s) under {self.root} can be read: "
                                 f"{_listing(unreadable)}.")
            raise ValueError(f"no video under {self.root} is long enough for any bucket {self.buckets} "
                             f"(frame_stride={frame_stride}): {_listing(short)}"
                             + (f"; {len(unreadable)} more cannot be read: {_listing(unreadable)}." if unreadable
                                else "."))
        if unreadable or short:
            warnings.warn(f"skipped {len(unreadable) + len(short)} of {len(files)} video(s) under {self.root}: "
                          f"{_listing(unreadable + short)}", stacklevel=2)
        self._check_captions(allow_missing_captions)

    @property
    def bucket_ids(self) -> list[Bucket]:
        return [b for _, _, b in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _check_captions(self, allow_missing: bool) -> None:
        self.allow_missing_captions = allow_missing
        missing = [p for p, _, _ in self.items if not p.with_suffix(".txt").is_file()]
        self.missing_captions: list[Path] = missing
        self.has_captions = len(missing) < len(self.items)
        if not missing:
            return
        names = _listing([str(p.relative_to(self.root)) for p in missing])
        if not self.has_captions:
            warnings.warn(f"no video under {self.root} has a caption (<stem>.txt beside it): every caption is empty "
                          "(fine for class-conditional or unconditional models).", stacklevel=3)
        elif allow_missing:
            warnings.warn(f"{len(missing)} of {len(self.items)} video(s) under {self.root} have no caption file and "
                          f"get an empty caption: {names}", stacklevel=3)
        else:
            raise ValueError(f"{len(missing)} of {len(self.items)} video(s) under {self.root} have no caption "
                             f"(<stem>.txt beside the video): {names}. Add them, or allow an empty caption for "
                             "these with data.allow_missing_captions=true (stdit encode: --allow-missing-captions).")

    @staticmethod
    def caption_for(path: Path) -> str:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            return ""
        try:
            return txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{txt}: cannot read this caption file ({_reason(e)}); captions are UTF-8 text.") from e

    def __getitem__(self, index: int) -> dict:
        path, n, (frames, height, width) = self.items[index]
        span = (frames - 1) * self.frame_stride + 1
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(0, n - span + 1))
        idx = list(range(start, start + span, self.frame_stride))
        try:
            frames_ = decode_frames(path, idx)
        except Exception as e:  # PyAV / imageio errors often do not say which file
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: cannot decode frames {idx[0]}..{idx[-1]} ({_reason(e)}).") from e
        clip = torch.from_numpy(frames_).permute(0, 3, 1, 2).float() / 127.5 - 1
        clip = resize_crop(clip, height, width).clamp(-1, 1)
        return {"video": clip.permute(1, 0, 2, 3).contiguous(), "caption": self.caption_for(path), "path": str(path)}
