"""stdit: spatiotemporal Diffusion Transformers for video.

``StDiT`` (the model, Wan-compatible), the attention dispatch (``attention``, ``attention_backend``), and, where
installed with their dependencies, ``StDiTPipeline`` for sampling.
"""

from stdit.attention import BACKENDS, attention, attention_backend
from stdit.hub import CheckpointError
from stdit.model import StDiT

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CheckpointError", "StDiT", "attention", "attention_backend", "__version__"]


def __getattr__(name):
    # The pipeline pulls in diffusers' scheduler and pipeline machinery; load it only when asked for.
    if name == "StDiTPipeline":
        from stdit.pipeline import StDiTPipeline

        return StDiTPipeline
    raise AttributeError(f"module 'stdit' has no attribute {name!r}")
