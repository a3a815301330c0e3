"""Video data: the embedded moving-objects set, video folders, latent caches (``stdit encode``), bucketed batches."""

from stdit.data.buckets import BucketBatchSampler, nearest_bucket
from stdit.data.synthetic import MovingObjects

_LAZY = {
    "VideoFolderDataset": "stdit.data.video_folder",
    "LatentDataset": "stdit.data.latents",
    "encode_dataset": "stdit.data.encode",
    "build_dataset": "stdit.data.loader",
}

__all__ = ["BucketBatchSampler", "MovingObjects", "nearest_bucket", *_LAZY]


def __getattr__(name):
    # video decoding and the encoder pull in PyAV / diffusers; load them only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stdit.data' has no attribute {name!r}")
