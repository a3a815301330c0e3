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


# --- measurements that see shapes -------------------------------------------------------------------------------
# A generated clip looks like the data when each frame holds one connected object, of the requested shape, in one
# of the palette's colours, moving by the data's speed per frame. The functions below measure each of these on
# ``[B, 3, T, H, W]`` videos in [-1, 1]; on held-out clips of the data they all score 1.0 (tests/test_data.py).


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean masks ``[N, H, W]``: 0 off the mask, one positive id per component.

    Labels propagate as a 3x3 max-pool restricted to the mask until nothing changes (pure torch, all frames at once).
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(n, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))
    while True:
        grown = torch.where(mask, torch.nn.functional.max_pool2d(labels[:, None], 3, 1, 1)[:, 0], torch.zeros(()))
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def find_objects(videos: torch.Tensor, background: float = -1.0, threshold: float = 0.5,
                 speck: float = 4 / 1024, min_object: float = 16 / 1024,
                 max_object: float = 0.35) -> dict[str, torch.Tensor]:
    """The main object of every frame of ``[B, 3, T, H, W]`` videos.

    A pixel is foreground where any channel differs from ``background`` by more than ``threshold``. The object is
    the frame's largest 8-connected foreground component; components of at most ``speck`` of the frame (4 pixels
    at 32x32) are specks and ignored. Returns ``mask [B, T, H, W]`` (the object's pixels), ``single [B, T]`` (one
    object covering ``min_object`` to ``max_object`` of the frame, the data's objects cover 4% to 23% at
    32x32, and nothing else but specks), ``area [B, T]`` (pixels),
    ``centroid [B, T, 2]`` (y, x; NaN without an object) and ``color [B, T, 3]`` (the object's mean colour).
    """
    v = videos.float()
    b, c, t, h, w = v.shape
    fg = ((v - background).abs() > threshold).any(dim=1).reshape(b * t, h, w)
    labels = connected_components(fg).reshape(b * t, h * w)
    sizes = torch.zeros(b * t, h * w + 1).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    sizes[:, 0] = 0
    area, main = sizes.max(dim=1)
    n_big = (sizes > speck * h * w).sum(dim=1)
    mask = (labels == main[:, None]) & (area[:, None] > 0)
    single = (n_big == 1) & (area >= min_object * h * w) & (area <= max_object * h * w)
    m = mask.float()
    denom = m.sum(1).clamp_min(1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cy, cx = (m * ys.flatten()).sum(1) / denom, (m * xs.flatten()).sum(1) / denom
    centroid = torch.stack([cy, cx], -1).masked_fill((area == 0)[:, None], float("nan"))
    pix = v.permute(0, 2, 1, 3, 4).reshape(b * t, c, h * w)
    color = (pix * m[:, None]).sum(-1) / denom[:, None]
    return {"mask": mask.reshape(b, t, h, w), "single": single.reshape(b, t), "area": area.reshape(b, t),
            "centroid": centroid.reshape(b, t, 2), "color": color.reshape(b, t, c)}


def _crops(mask: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Each ``[N, H, W]`` mask cropped to its bounding square and resampled to ``size x size`` ([N, size*size])."""
    n, h, w = mask.shape
    m = mask.float()
    rows, cols = m.amax(2) > 0, m.amax(1) > 0
    ar_h, ar_w = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    y0 = torch.where(rows, ar_h, float(h)).amin(1)
    y1 = torch.where(rows, ar_h, -1.0).amax(1)
    x0 = torch.where(cols, ar_w, float(w)).amin(1)
    x1 = torch.where(cols, ar_w, -1.0).amax(1)
    half = (torch.maximum(y1 - y0, x1 - x0) + 1).clamp_min(1) / 2
    cy, cx = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2
    # affine map of the output grid onto the bounding square, in grid_sample's [-1, 1] pixel-edge coordinates
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = half / (w / 2), cx / (w / 2) - 1
    theta[:, 1, 1], theta[:, 1, 2] = half / (h / 2), cy / (h / 2) - 1
    grid = torch.nn.functional.affine_grid(theta, (n, 1, size, size), align_corners=False)
    out = torch.nn.functional.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out.flatten(1)


class ShapeClassifier:
    """Which of :data:`SHAPES` a clip shows: nearest neighbours among the data's own object masks.

    ``fit`` takes the main object of each frame of ``num_clips`` clips of a :class:`MovingObjects` set, crops it to
    its bounding square and scales it to 16x16 (so size, position and colour do not matter, only the silhouette);
    ``predict`` gives each frame the majority shape of its ``k`` nearest crops and each clip the majority over its
    frames (-1 when no frame holds an object). Fitting 256 clips takes about a second on a CPU.
    """

    def __init__(self, k: int = 5):
        self.k = k
        self.bank = self.bank_labels = None

    def fit(self, dataset: "MovingObjects", num_clips: int = 256) -> "ShapeClassifier":
        if dataset.class_by != "shape":
            dataset = MovingObjects(dataset.num_videos, dataset.num_frames, dataset.height, dataset.width,
                                    dataset.seed, "shape", dataset.background, dataset.size, dataset.speed)
        n = min(num_clips, len(dataset))
        videos = torch.stack([dataset[i]["video"] for i in range(n)])
        labels = torch.tensor([dataset[i]["class_label"] for i in range(n)])
        mask = find_objects(videos, dataset.background)["mask"]
        self.bank = _crops(mask.flatten(0, 1))
        self.bank_labels = labels.repeat_interleave(mask.shape[1])
        self.background = dataset.background
        return self

    def predict_frames(self, objects_mask: torch.Tensor) -> torch.Tensor:
        """Shape index per frame of object masks ``[B, T, H, W]`` (-1 where a frame has no object)."""
        b, t = objects_mask.shape[:2]
        flat = objects_mask.flatten(0, 1)
        dist = torch.cdist(_crops(flat), self.bank)
        nearest = self.bank_labels[dist.topk(self.k, largest=False).indices]
        votes = torch.nn.functional.one_hot(nearest, len(SHAPES)).sum(1)
        pred = votes.argmax(1).masked_fill(~flat.flatten(1).any(1), -1)
        return pred.view(b, t)

    def predict(self, videos: torch.Tensor, objects: dict | None = None) -> torch.Tensor:
        """Shape index per clip of ``[B, 3, T, H, W]`` videos in [-1, 1] (-1 for a clip with no object)."""
        objects = objects or find_objects(videos, self.background)
        frames = self.predict_frames(objects["mask"])
        votes = torch.nn.functional.one_hot(frames.clamp_min(0), len(SHAPES)) * (frames >= 0)[..., None]
        votes = votes.sum(1)
        return votes.argmax(1).masked_fill(votes.sum(1) == 0, -1)


def shape_metrics(videos: torch.Tensor, labels, classifier: ShapeClassifier, background: float = -1.0,
                  speed: tuple[float, float] = (0.03, 0.06), color_tol: float = 0.3,
                  speed_tol: float = 0.35) -> dict[str, float]:
    """How much generated clips ``[B, 3, T, H, W]`` (in [-1, 1]) of shape classes ``labels`` look like the data.

    All four are fractions, 1.0 for the data itself (higher is better):

    - ``shape``: clips whose object ``classifier`` recognizes as the requested shape;
    - ``one_object``: frames holding one connected object (specks of a few pixels ignored);
    - ``palette``: frames whose object's mean colour lies within ``color_tol`` (per channel) of one palette colour,
      the same colour in every frame of the clip (the clip's most common one);
    - ``speed``: steps between consecutive frames that both hold one object, where the object's centroid moves by
      the data's speed range (``speed`` x ``min(H, W)`` pixels per frame), widened by ``speed_tol`` pixels for the
      rounding of shapes to pixels.
    """
    videos = videos.float()
    labels = torch.as_tensor(labels).view(-1)
    objects = find_objects(videos, background)
    pred = classifier.predict(videos, objects)
    single = objects["single"]
    dist = (objects["color"][:, :, None, :] - torch.from_numpy(PALETTE)).abs().amax(-1)  # [B, T, P]
    near, which = dist.min(-1)
    in_palette = (near <= color_tol) & single
    modal = torch.where(in_palette, which, torch.full_like(which, -1))
    counts = torch.nn.functional.one_hot(modal + 1, len(PALETTE) + 1)[..., 1:].sum(1)  # [B, P]
    same = which == counts.argmax(1, keepdim=True)
    m = min(videos.shape[-2:])
    lo, hi = speed[0] * m - speed_tol, speed[1] * m + speed_tol
    step = (objects["centroid"][:, 1:] - objects["centroid"][:, :-1]).norm(dim=-1)
    both = single[:, 1:] & single[:, :-1]
    moving = (step >= lo) & (step <= hi) & both
    return {"shape": float((pred == labels).float().mean()),
            "one_object": float(single.float().mean()),
            "palette": float((in_palette & same).float().mean()),
            "speed": float(moving.float().sum() / max(1, both.numel()))}


def comparison_image(samples: torch.Tensor, labels, dataset: "MovingObjects", path, scale: int = 4,
                     per_class: int = 1):
    """A PNG with, for each shape class, ``per_class`` rows of data clips' frames and as many of sampled frames.

    ``samples`` ``[B, 3, T, H, W]`` in [-1, 1] with shape classes ``labels``; the data rows are the first clips of
    ``dataset`` of each class. Returns the path.
    """
    from pathlib import Path

    from PIL import Image, ImageDraw

    labels = torch.as_tensor(labels).view(-1).tolist()
    b, _, t, h, w = samples.shape
    pad, margin = 2, 64
    data_rows: dict[int, list[np.ndarray]] = {c: [] for c in sorted(set(labels))}
    i = 0
    while any(len(r) < per_class for r in data_rows.values()) and i < len(dataset):
        p = dataset.params(i)
        shape = SHAPES.index(p["shape"])
        if shape in data_rows and len(data_rows[shape]) < per_class:
            data_rows[shape].append(dataset.render(p))
        i += 1
    rows: list[tuple[str, np.ndarray]] = []
    for c, clips in data_rows.items():
        rows += [(f"{SHAPES[c]}\ndata", clip) for clip in clips]
        rows += [(f"{SHAPES[c]}\nsample", samples[j].float().cpu().numpy())
                 for j in [k for k, lab in enumerate(labels) if lab == c][:per_class]]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    img = Image.new("RGB", (margin + t * cell_w + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, clip) in enumerate(rows):
        frames = np.round((np.clip(clip, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)  # T,H,W,3
        draw.multiline_text((4, r * cell_h + cell_h // 2 - 12), name, fill="black")
        for f in range(min(t, frames.shape[0])):
            tile = Image.fromarray(frames[f]).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (margin + pad + f * cell_w, pad + r * cell_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def report_samples(frames: torch.Tensor, labels, dataset: "MovingObjects", out_dir, tag: str = "final",
                   num_clips: int = 256) -> tuple:
    """What the main job writes beside its sample videos: ``{tag}_vs_data.png`` (:func:`comparison_image`) and
    ``{tag}_metrics.json`` (:func:`shape_metrics` with a :class:`ShapeClassifier` fitted on ``num_clips`` clips of
    ``dataset``). ``frames`` are the pipeline's ``[B, T, 3, H, W]`` in [0, 1]. Returns (png path, metrics)."""
    import json
    from pathlib import Path

    videos = frames.detach().float().cpu().permute(0, 2, 1, 3, 4) * 2 - 1
    out_dir = Path(out_dir)
    png = comparison_image(videos, labels, dataset, out_dir / f"{tag}_vs_data.png")
    metrics = shape_metrics(videos, labels, ShapeClassifier().fit(dataset, num_clips), dataset.background,
                            dataset.speed)
    (out_dir / f"{tag}_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return png, metrics
