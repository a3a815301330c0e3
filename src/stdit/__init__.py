"""stdit: spatiotemporal Diffusion Transformers for video.

``StDiT`` (the model, Wan-compatible), the attention dispatch (``attention``, ``attention_backend``), and, where
installed with their dependencies, ``StDiTPipeline`` for sampling.

The public names are imported on first use (PEP 562), so ``import stdit`` and the ``stdit`` command's help do not
pay for torch, diffusers and transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "BACKENDS": "stdit.attention",
    "attention": "stdit.attention",
    "attention_backend": "stdit.attention",
    "CheckpointError": "stdit.hub",
    "StDiT": "stdit.model",
    "StDiTPipeline": "stdit.pipeline",
}

__all__ = ["BACKENDS", "CheckpointError", "StDiT", "attention", "attention_backend", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stdit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    # Importing the submodule stdit.attention binds it as the package attribute `attention`; the public
    # `stdit.attention` is the function (as when it was imported eagerly here), so that binding is skipped and
    # __getattr__ above gives the function.
    def __setattr__(self, name, value):
        if name == "attention" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
