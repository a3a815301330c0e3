"""A shortened main job: the tiny config trains on the embedded videos, its loss falls, and its samples show what
the data shows, measured by what sees shapes: one connected object per frame, moving at the data's speed."""

import json

import pytest
import torch

from stdit.data.synthetic import MovingObjects, ShapeClassifier, shape_metrics
from stdit.model import StDiT
from stdit.pipeline import StDiTPipeline, make_scheduler
from stdit.train import train
from stdit.train_config import load_train_config
from stdit.train_utils import loss_drop, read_log

# A quarter of the main job's 4200 steps: long enough for objects and motion to form (at 200-500 steps the samples
# hold one object in 15-35% of frames), too short for the shape and colour figures the full job is measured by
# (the README and docs/main-job-recipe.md).
STEPS = 1000


def _samples(model, shift, n_per_class=8):
    pipe = StDiTPipeline(model.eval(), make_scheduler("euler", shift))
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(model.config.num_classes) for _ in range(n_per_class)]
    frames = pipe(class_labels=labels, num_frames=8, height=32, width=32, num_inference_steps=10,
                  guidance_scale=2.0, generator=torch.Generator().manual_seed(123), output_type="pt").frames
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1, labels  # [B, C, T, H, W] in [-1, 1]


# About 2.5 min on an idle 2-core machine; a loaded CI machine has taken several times longer, so the suite-wide
# 900 s limit (there to catch hangs) is raised for this one test instead of shortening what it checks.
@pytest.mark.timeout(2700)
def test_short_main_job_learns_the_data(tmp_path):
    cfg = load_train_config("tiny", [f"train.output_dir={tmp_path}", f"train.steps={STEPS}", "train.warmup_steps=20",
                                     "train.ckpt_every=0", "train.progress=false", "train.ema_decay=0.99",
                                     "sample.videos_per_class=1", "sample.num_inference_steps=10"])
    summary = train(cfg)
    records = read_log(tmp_path / "log.jsonl")
    assert len(records) == STEPS
    drop = loss_drop(records)
    print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} ({drop:.1f}x)")
    assert drop > 6.0

    classifier = ShapeClassifier().fit(MovingObjects(seed=cfg.data.seed), 256)
    shift = float(json.loads((tmp_path / "model" / "scheduler_config.json").read_text())["shift"])
    trained = shape_metrics(*_samples(StDiT.from_pretrained(tmp_path / "model"), shift), classifier)
    torch.manual_seed(0)
    fresh = StDiT(**cfg.model)
    fresh.initialize_weights()
    untrained = [shape_metrics(*_samples(m, shift), classifier) for m in (fresh, StDiT(**cfg.model))]
    print("trained", trained, "\nuntrained (DiT init, random)", untrained)
    # measured at 1000 steps on a 2-core CPU: one object in 70% of frames, the data's speed in 46% of steps;
    # untrained models: 0 and 0
    assert trained["one_object"] >= 0.5 and trained["speed"] >= 0.3
    for u in untrained:
        assert u["one_object"] <= 0.1 and u["speed"] <= 0.1


def test_shape_metrics_score_the_data_and_fail_what_is_not():
    """The measurements that see shapes (a classifier fitted on the data, one connected object per frame, a palette
    colour, the data's speed) give the data itself 1.0 and fail videos that are not the data."""
    classifier = ShapeClassifier().fit(MovingObjects(seed=0), 256)
    held_out = MovingObjects(seed=1)
    videos = torch.stack([held_out[i]["video"] for i in range(64)])
    labels = [held_out[i]["class_label"] for i in range(64)]
    assert shape_metrics(videos, labels, classifier) == {"shape": 1.0, "one_object": 1.0, "palette": 1.0,
                                                         "speed": 1.0}
    wrong = [(lab + 1) % 4 for lab in labels]
    assert shape_metrics(videos, wrong, classifier)["shape"] == 0.0
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert all(v < 0.3 for v in shape_metrics(noise, labels, classifier).values())
    assert all(v == 0.0 for v in shape_metrics(torch.full_like(videos, -1.0), labels, classifier).values())
    still = videos[:, :, :1].expand_as(videos)  # the right objects, not moving
    assert shape_metrics(still, labels, classifier)["speed"] == 0.0
    recoloured = videos.clone()
    recoloured[:, 2] = torch.where(videos[:, 2] > -1, 0.0, -1.0)  # a blue channel no palette colour has
    assert shape_metrics(recoloured, labels, classifier)["palette"] < 0.2
    split = videos.clone()
    split[..., 14:18] = -1.0  # a black band cuts objects in two
    assert shape_metrics(split, labels, classifier)["one_object"] < 0.9

