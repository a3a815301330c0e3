"""Dataset construction from the ``data:`` config section, batch collation, and a resumable batch stream."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from stdit.data.buckets import BucketBatchSampler


def build_dataset(data_cfg):
    """The dataset a ``data:`` section describes. Each item is a dict with ``video`` ``[C, T, H, W]`` (or
    ``latents``), and optionally ``class_label``, ``prompt_embeds`` ``[L, D]`` and ``prompt_mask`` ``[L]``."""
    if data_cfg.kind == "synthetic":
        from stdit.data.synthetic import MovingObjects

        return MovingObjects(num_videos=data_cfg.num_videos, num_frames=data_cfg.num_frames, height=data_cfg.height,
                             width=data_cfg.width, seed=data_cfg.seed, class_by=data_cfg.class_by,
                             background=data_cfg.background)
    if data_cfg.kind == "video_folder":
        from stdit.data.video_folder import VideoFolderDataset

        buckets = [tuple(b) for b in data_cfg.buckets] if data_cfg.buckets else None
        return VideoFolderDataset(data_cfg.root, num_frames=data_cfg.num_frames, height=data_cfg.height,
                                  width=data_cfg.width, frame_stride=data_cfg.frame_stride, buckets=buckets,
                                  seed=data_cfg.seed, allow_missing_captions=data_cfg.allow_missing_captions)
    if data_cfg.kind == "latents":
        from stdit.data.latents import LatentDataset

        return LatentDataset(data_cfg.root)
    raise ValueError(f"data.kind={data_cfg.kind!r}; choose one of synthetic, video_folder, latents.")


def bucket_ids(dataset) -> list:
    """Each item's bucket; datasets whose items all share one shape have a single bucket."""
    return list(dataset.bucket_ids) if hasattr(dataset, "bucket_ids") else [0] * len(dataset)


def collate(items: list[dict]) -> dict:
    """Stack a batch; text features of different lengths are right-padded and masked."""
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "prompt_embeds":
            length = max(v.shape[0] for v in values)
            emb = values[0].new_zeros(len(values), length, values[0].shape[-1])
            mask = torch.zeros(len(values), length, dtype=torch.bool)
            for i, (v, it) in enumerate(zip(values, items)):
                emb[i, :v.shape[0]] = v
                m = it.get("prompt_mask")
                mask[i, :v.shape[0]] = m.bool() if m is not None else True
            out["prompt_embeds"], out["prompt_mask"] = emb, mask
        elif key == "prompt_mask":
            continue
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def batch_stream(dataset, sampler: BucketBatchSampler, epoch: int = 0, position: int = 0,
                 num_workers: int = 0) -> Iterator[tuple[dict, dict]]:
    """Endless ``(batch, state)`` pairs; ``state`` is the data position to save so a resume continues after
    ``batch`` (counted in the training loop, not in the loader, whose workers read ahead)."""
    while True:
        batches = sampler.rank_batches(epoch, position)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                            persistent_workers=False)
        for batch in loader:
            position += 1
            yield batch, {"epoch": epoch, "position": position}
        epoch, position = epoch + 1, 0
