"""diffusers' own test suite for its Wan transformer, run against StDiT.

diffusers does not ship its tests in the wheel, so this file needs a diffusers checkout at (or near) the installed
diffusers version; without one it skips. Run it with::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers   # then check out the installed version's tag
    STDIT_DIFFUSERS_TESTS=/tmp/diffusers/tests python -m pytest -q tests/test_diffusers_wan_suite.py

What runs: every ``Test*`` class of diffusers' ``tests/models/transformers/test_models_transformer_wan.py``
(model, memory/offload, training, attention processors, compile, LoRA, quantization, single file), each as a
subclass whose ``model_class`` is :class:`stdit.StDiT` and whose init dict is diffusers' Wan dict translated by
:func:`stdit.convert.wan_config_to_stdit` (``rope_max_seq_len`` dropped: StDiT builds RoPE tables for any length).
Inputs are diffusers' own. diffusers' cache testers (PyramidAttentionBroadcast, FirstBlockCache, FasterCache,
MagCache, TaylorSeer), which its Wan file does not use, are added in the same way. Class names are
``TestStDiT<suffix>`` for ``TestWanTransformer3D<suffix>`` and ``TestStDiTCache<name>`` for the caches.

``STDIT_DIFFUSERS_BASELINE=1`` also collects the same classes for diffusers' ``WanTransformer3DModel`` (names
``TestWanTransformer3D*`` and ``TestWanCache*``): a StDiT failure is a StDiT gap only where the Wan twin passes
(a checkout newer or older than the installed diffusers fails some tests for Wan too). Most memory, compile and
quantization tests need an accelerator and skip on a CPU, for Wan and StDiT alike.

Two tests cannot apply verbatim to another class, and StDiT's subclasses run them with StDiT's value:
``test_gradient_checkpointing_is_applied`` (Wan's file asserts the set of modules with gradient checkpointing is
``{"WanTransformer3DModel"}``; StDiT's is ``{"StDiT"}``: both checkpoint their blocks from the top-level model) and
``test_from_save_pretrained_variant`` (it asserts diffusers' message for a missing ``.bin``; StDiT loads
safetensors only, never a pickled ``.bin``, so its message names the missing ``.safetensors``).

diffusers' Wan test module calls ``enable_full_determinism()`` when imported; the flags it sets are restored after
the import and set again only while this module's tests run, so the rest of stdit's suite is unaffected.
With the variable unset, collecting this file imports nothing from diffusers' tests.
"""

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

_ENV = "STDIT_DIFFUSERS_TESTS"
_ROOT = os.environ.get(_ENV, "").strip()
if not _ROOT:
    pytest.skip(f"diffusers' Wan test suite: set {_ENV} to a diffusers checkout's tests/ directory to run it "
                "against StDiT", allow_module_level=True)

_ROOT_PATH = Path(_ROOT).expanduser().resolve()
_WAN_FILE = _ROOT_PATH / "models" / "transformers" / "test_models_transformer_wan.py"
if not (_ROOT_PATH / "__init__.py").is_file() or not _WAN_FILE.is_file():
    pytest.fail(f"{_ENV}={_ROOT!r} is not a diffusers tests/ directory (expected {_WAN_FILE} and "
                f"{_ROOT_PATH / '__init__.py'})", pytrace=False)

from stdit import StDiT  # noqa: E402
from stdit.convert import wan_config_to_stdit  # noqa: E402

# Loaded under its own package name: a plain `import tests` would collide with stdit's own tests/ directory.
_PKG = "_diffusers_tests"


def _determinism_state():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            {k: os.environ.get(k) for k in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG")})


def _restore_determinism(state):
    algos, cudnn_det, cudnn_bench, tf32, env = state
    torch.use_deterministic_algorithms(algos)
    torch.backends.cudnn.deterministic = cudnn_det
    torch.backends.cudnn.benchmark = cudnn_bench
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _load_suite():
    if _PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PKG, _ROOT_PATH / "__init__.py",
                                                      submodule_search_locations=[str(_ROOT_PATH)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[_PKG] = pkg
        spec.loader.exec_module(pkg)
    state = _determinism_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # markers of diffusers' conftest
            wan = importlib.import_module(f"{_PKG}.models.transformers.test_models_transformer_wan")
            tu = importlib.import_module(f"{_PKG}.models.testing_utils")
            utils = importlib.import_module(f"{_PKG}.testing_utils")
    finally:
        _restore_determinism(state)
    return wan, tu, utils


_wan, _tu, _utils = _load_suite()


@pytest.fixture(autouse=True, scope="module")
def _full_determinism():
    state = _determinism_state()
    _utils.enable_full_determinism()
    yield
    _restore_determinism(state)


class _AsStDiT:
    """Swaps diffusers' Wan for StDiT: same tester, same inputs, the init dict translated."""

    @property
    def model_class(self):
        return StDiT

    def get_init_dict(self):
        config = wan_config_to_stdit(dict(super().get_init_dict()))
        config.pop("rope_max_seq_len", None)
        return config


def _gradient_checkpointing_is_applied(self):
    _tu.TrainingTesterMixin.test_gradient_checkpointing_is_applied(self, expected_set={"StDiT"})


def _from_save_pretrained_variant(self, base_model_output, tmp_path, atol=5e-5, rtol=0):
    # diffusers' test, but the OSError without the variant names the .safetensors file: StDiT never falls back to
    # a pickled .bin (stdit.hub.load_pretrained), where diffusers' message names the .bin it looked for last.
    torch.manual_seed(0)
    model = self.model_class(**self.get_init_dict()).to(_utils.torch_device).eval()
    model.save_pretrained(tmp_path, variant="fp16")
    new_model = self.model_class.from_pretrained(tmp_path, variant="fp16")
    with pytest.raises(OSError) as exc_info:
        self.model_class.from_pretrained(tmp_path)
    assert "Error no file named diffusion_pytorch_model.safetensors found in directory" in str(exc_info.value)
    new_image = new_model.to(_utils.torch_device)(**self.get_dummy_inputs(), return_dict=False)[0]
    _utils.assert_tensors_close(base_model_output, new_image, atol=atol, rtol=rtol,
                                msg="Models give different forward passes.")


# Tests that check something Wan-specific: StDiT's subclasses run them with StDiT's value.
_TRANSLATED = {"test_gradient_checkpointing_is_applied": _gradient_checkpointing_is_applied,
               "test_from_save_pretrained_variant": _from_save_pretrained_variant}


_BASELINE = os.environ.get("STDIT_DIFFUSERS_BASELINE", "") not in ("", "0")
_WAN_PREFIX = "TestWanTransformer3D"
_CACHE_TESTERS = ("PyramidAttentionBroadcast", "FirstBlockCache", "FasterCache", "MagCache", "TaylorSeerCache")


def _build_classes():
    classes = {}
    for name, cls in vars(_wan).items():
        if not (name.startswith(_WAN_PREFIX) and isinstance(cls, type)):
            continue
        body = {"__module__": __name__}
        body.update({k: fn for k, fn in _TRANSLATED.items() if hasattr(cls, k)})
        new = "TestStDiT" + name[len(_WAN_PREFIX):]
        classes[new] = type(new, (_AsStDiT, cls), body)
        if _BASELINE:
            classes[name] = cls
    config = _wan.WanTransformer3DTesterConfig
    for tester in _CACHE_TESTERS:
        mixin = getattr(_tu, f"{tester}TesterMixin", None)
        if mixin is None:
            continue
        new = f"TestStDiTCache{tester}"
        classes[new] = type(new, (_AsStDiT, config, mixin), {"__module__": __name__})
        if _BASELINE:
            new = f"TestWanCache{tester}"
            classes[new] = type(new, (config, mixin), {"__module__": __name__})
    return classes


globals().update(_build_classes())
