"""Bucketed, resumable, rank-aware batch sampling over clips of different (frames, height, width).

Every global batch holds clips of one bucket only, so they stack without padding. The order is a pure function
of ``(seed, epoch)``; a position counts global batches, so a resumed run continues with exactly the batch it
would have read next. Each rank takes its own contiguous slice of each global batch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

Bucket = tuple[int, int, int]


def nearest_bucket(frames: int, height: int, width: int, buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket a clip of this size goes to: the closest aspect ratio among those that fit, then the largest.

    A bucket fits when it needs no more frames than the clip has; None when none fits.
    """
    fitting = [b for b in buckets if b[0] <= frames]
    if not fitting:
        return None
    ar = math.log(height / width)
    return min(fitting, key=lambda b: (round(abs(math.log(b[1] / b[2]) - ar), 6), -b[0] * b[1] * b[2]))


class BucketBatchSampler:
    """Yields this rank's index batches; every global batch comes from one bucket.

    Args:
        bucket_ids: the bucket (any hashable) of each dataset index.
        batch_size: clips per rank per batch (a global batch is ``batch_size * world_size``).
        seed, shuffle: order of indices within buckets and of batches across buckets, per epoch.
        rank, world_size: this process's slice.
        grad_accum: micro-batches per optimizer step; a global batch then spans ``grad_accum`` micro-batches,
            so a run with accumulation sees the same clips per step as one with a larger batch.
        drop_last: drop a bucket's incomplete last global batch (keeps batches the same size on every rank).
    """

    def __init__(self, bucket_ids: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, grad_accum: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        self.bucket_ids = list(bucket_ids)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.grad_accum = grad_accum
        self.epoch, self.position = 0, 0
        if not self.global_batches(0):
            sizes = {b: self.bucket_ids.count(b) for b in set(self.bucket_ids)}
            raise ValueError(f"no bucket has a full global batch of {batch_size * world_size * grad_accum} clips "
                             f"(batch_size x world size x grad_accum); clips per bucket: {sizes}. Lower "
                             "train.batch_size or add data.")

    def global_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        by_bucket: dict = {}
        for i, b in enumerate(self.bucket_ids):
            by_bucket.setdefault(b, []).append(i)
        gbs = self.batch_size * self.world_size * self.grad_accum
        batches = []
        for key in sorted(by_bucket, key=repr):
            idx = by_bucket[key]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for s in range(0, len(idx), gbs):
                chunk = idx[s:s + gbs]
                if len(chunk) == gbs or (not self.drop_last and len(chunk) >= self.world_size * self.grad_accum):
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch)) * self.grad_accum

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rank_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's micro-batches of ``epoch`` from micro-batch ``start`` on: each global batch is split into
        ``grad_accum`` consecutive parts, and each part into ``world_size`` rank slices."""
        out = []
        for chunk in self.global_batches(epoch):
            per = len(chunk) // (self.world_size * self.grad_accum)
            for m in range(self.grad_accum):
                part = chunk[m * per * self.world_size:(m + 1) * per * self.world_size]
                out.append(part[self.rank * per:(self.rank + 1) * per])
        return out[start:]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches from the saved position to the end of the epoch; then the next epoch begins."""
        for batch in self.rank_batches(self.epoch, self.position):
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0
