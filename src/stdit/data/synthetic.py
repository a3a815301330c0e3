"""Embedded procedural videos: one coloured shape moving in a straight line over a constant background.

Every sample is a pure function of ``(seed, index)``, so the set needs no download, is identical on every machine
and lets a resumed run read exactly the batches it would have read. Class labels are the shape or the direction
of motion, for class-conditional models.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("square", "circle", "triangle", "cross")
# saturated colours in [-1, 1]; a small palette keeps each pixel's distribution simple for tiny models
PALETTE = np.array([[1.0, -0.6, -0.6], [-0.6, 1.0, -0.6], [-0.2, 0.2, 1.0], [1.0, 1.0, -0.6], [1.0, -0.6, 1.0],
                    [-0.6, 1.0, 1.0]], dtype=np.float32)
DIRECTIONS = ("right", "left", "down", "up")
CLASS_BY = ("shape", "direction", "none")
_STEP = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "triangle":
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dy) <= r) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= r) & (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}.")


class MovingObjects(Dataset):
    """Procedural videos ``[3, T, H, W]`` in [-1, 1], each with a class label.

    Args:
        num_videos: length of the dataset (samples are generated on the fly; any index is valid).
        num_frames, height, width: clip size.
        seed: the dataset's seed; sample ``i`` depends only on ``(seed, i)``.
        class_by: ``"shape"`` (4 classes), ``"direction"`` (4 classes) or ``"none"`` (label 0).
        background: the constant background value.
        size: object half-size range in pixels, as a fraction of ``min(height, width)``.
        speed: pixels per frame range, as a fraction of ``min(height, width)``.
    """

    def __init__(self, num_videos: int = 10_000, num_frames: int = 8, height: int = 32, width: int = 32,
                 seed: int = 0, class_by: str = "shape", background: float = -1.0,
                 size: tuple[float, float] = (0.15, 0.25), speed: tuple[float, float] = (0.03, 0.06)):
        if class_by not in CLASS_BY:
            raise ValueError(f"class_by={class_by!r}; choose one of {CLASS_BY}.")
        if num_videos < 1 or num_frames < 1 or height < 8 or width < 8:
            raise ValueError("MovingObjects needs num_videos >= 1, num_frames >= 1 and height, width >= 8; got "
                             f"{num_videos}, {num_frames}, {height}, {width}.")
        self.num_videos, self.num_frames, self.height, self.width = num_videos, num_frames, height, width
        self.seed, self.class_by, self.background = seed, class_by, float(background)
        self.size, self.speed = tuple(size), tuple(speed)

    @property
    def num_classes(self) -> int:
        return {"shape": len(SHAPES), "direction": len(DIRECTIONS), "none": 1}[self.class_by]

    def __len__(self) -> int:
        return self.num_videos

    def params(self, index: int) -> dict:
        """The random choices behind sample ``index``: shape, direction, colour, radius, start, speed."""
        rng = np.random.default_rng([self.seed, index])
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        color = PALETTE[rng.integers(len(PALETTE))]
        m = min(self.height, self.width)
        r = rng.uniform(*self.size) * m
        v = rng.uniform(*self.speed) * m
        travel = v * (self.num_frames - 1)
        dy, dx = _STEP[direction]
        # start so the whole path stays inside the frame
        lo_y = r + (travel if dy < 0 else 0)
        hi_y = self.height - 1 - r - (travel if dy > 0 else 0)
        lo_x = r + (travel if dx < 0 else 0)
        hi_x = self.width - 1 - r - (travel if dx > 0 else 0)
        cy = rng.uniform(lo_y, max(lo_y, hi_y))
        cx = rng.uniform(lo_x, max(lo_x, hi_x))
        label = {"shape": SHAPES.index(shape), "direction": DIRECTIONS.index(direction), "none": 0}[self.class_by]
        return dict(shape=shape, direction=direction, color=color, radius=r, start=(cy, cx), speed=v, label=label)

    def render(self, p: dict) -> np.ndarray:
        yy, xx = np.mgrid[0:self.height, 0:self.width].astype(np.float32)
        video = np.full((3, self.num_frames, self.height, self.width), self.background, dtype=np.float32)
        dy, dx = _STEP[p["direction"]]
        for f in range(self.num_frames):
            cy, cx = p["start"][0] + dy * p["speed"] * f, p["start"][1] + dx * p["speed"] * f
            mask = _shape_mask(p["shape"], yy, xx, cy, cx, p["radius"])
            video[:, f, mask] = p["color"][:, None]
        return video

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} videos.")
        p = self.params(index)
        return {"video": torch.from_numpy(self.render(p)), "class_label": p["label"]}


def foreground_tracks(videos: torch.Tensor, background: float = -1.0, threshold: float = 0.5):
    """Per-frame foreground area (fraction of pixels) and centroid (y, x in pixels) of ``[B, C, T, H, W]`` videos.

    A pixel is foreground when any channel differs from ``background`` by more than ``threshold``.
    Returns ``area [B, T]`` and ``centroid [B, T, 2]`` (NaN where a frame has no foreground).
    """
    fg = ((videos.float() - background).abs() > threshold).any(dim=1).float()  # [B, T, H, W]
    area = fg.mean(dim=(-2, -1))
    h, w = fg.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    total = fg.sum(dim=(-2, -1))
    cy = (fg * ys).sum(dim=(-2, -1)) / total
    cx = (fg * xs).sum(dim=(-2, -1)) / total
    return area, torch.stack([cy, cx], dim=-1)


def sample_quality(samples: torch.Tensor, reference: torch.Tensor, background: float = -1.0) -> dict[str, float]:
    """How far generated videos are from the data, lower is better (both ``[B, C, T, H, W]`` in [-1, 1]).

    ``pixel_w1``: 1-Wasserstein distance between the two pixel-value distributions.
    ``area_error``: |mean foreground area of samples - that of the data| (fraction of the frame).
    ``motion_error``: how far each sample's object is from moving in a straight line at constant speed (pixels,
    RMS residual of a per-video linear fit of the centroid over time; videos with empty frames count as the
    frame diagonal).
    """
    a = samples.float().clamp(-1, 1).flatten()
    b = reference.float().clamp(-1, 1).flatten()
    n = min(a.numel(), b.numel(), 200_000)
    qa = torch.quantile(a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:n]],
                        torch.linspace(0, 1, 512))
    qb = torch.quantile(b[torch.randperm(b.numel(), generator=torch.Generator().manual_seed(0))[:n]],
                        torch.linspace(0, 1, 512))
    area_s, cen_s = foreground_tracks(samples, background)
    area_r, _ = foreground_tracks(reference, background)
    t = torch.arange(cen_s.shape[1], dtype=torch.float32)
    design = torch.stack([torch.ones_like(t), t], dim=1)
    diag = float(np.hypot(*samples.shape[-2:]))
    residuals = []
    for c in cen_s:
        if torch.isnan(c).any():
            residuals.append(diag)
            continue
        coef = torch.linalg.lstsq(design, c).solution
        residuals.append(float((design @ coef - c).pow(2).sum(-1).mean().sqrt()))
    return {
        "pixel_w1": float((qa - qb).abs().mean()),
        "area_error": float((area_s.mean() - area_r.mean()).abs()),
        "motion_error": float(np.mean(residuals)),
    }
