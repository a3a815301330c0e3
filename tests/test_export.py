"""GIF export keeps the video's colours: one palette built from the whole clip, no dithering."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from stdit.export import export_video

PURE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
        "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255)}


def _read_gif(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def _flat_clip(t=6, size=24) -> np.ndarray:
    """Black frames with one pure-colour square per colour, moving one pixel a frame (as the embedded data)."""
    frames = np.zeros((t, size * 2, size * len(PURE), 3), np.uint8)
    for i, rgb in enumerate(PURE.values()):
        for f in range(t):
            frames[f, 4 + f:4 + f + 8, i * size + 4:i * size + 12] = rgb
    return frames


def test_gif_keeps_pure_colours(tmp_path):
    clip = _flat_clip()
    back = _read_gif(export_video(clip, tmp_path / "pure.gif", fps=4))
    assert back.shape == clip.shape
    for name, rgb in PURE.items():
        mask = (clip == rgb).all(-1)
        err = np.abs(back[mask].astype(int) - np.array(rgb)).max()
        assert err <= 8, f"{name} {rgb} comes back with a max channel error of {err}/255"
    assert np.abs(back[~(clip > 0).any(-1)].astype(int)).max() <= 8  # the black background stays black
    assert np.array_equal(back, clip)  # under 256 colours in the clip: exact


def _gradient_clip(t=8, h=64, w=64) -> np.ndarray:
    """Small pure-colour squares over a pink-purple gradient that shifts every frame: thousands of colours."""
    yy, xx = np.mgrid[0:h, 0:w]
    clip = np.zeros((t, h, w, 3))
    for f in range(t):
        clip[f] = np.stack([120 + 100 * xx / w + 3 * f, 40 + 150 * yy / h, 200 - 100 * (xx + yy) / (h + w) + 5 * f], -1)
    for i, rgb in enumerate(list(PURE.values())[:5]):
        for f in range(t):
            clip[f, 4 + f:8 + f, 4 + i * 10:8 + i * 10] = rgb
    return clip.clip(0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("as_float", [False, True])
def test_gif_keeps_a_small_object_colour_among_many(tmp_path, as_float):
    """Beyond 256 colours. Per-frame median cut (Pillow's default) turned the red squares pink (59/255 off) and
    the blue ones grey-blue (40/255): one palette for the clip, by maximum coverage, keeps them."""
    clip = _gradient_clip()
    assert len(np.unique(clip.reshape(-1, 3), axis=0)) > 256
    video = clip.astype(np.float32) / 255 if as_float else clip  # [T, H, W, C] in [0, 1] or uint8
    back = _read_gif(export_video(video, tmp_path / "clip.gif", scale=2))[:, ::2, ::2].astype(int)
    for name, rgb in list(PURE.items())[:5]:
        err = np.abs(back[(clip == rgb).all(-1)] - np.array(rgb)).max()
        assert err <= 8, f"{name} {rgb} comes back with a max channel error of {err}/255"
    assert np.abs(back - clip).mean() <= 6 and np.abs(back - clip).max() <= 24  # and the gradient stays a gradient
