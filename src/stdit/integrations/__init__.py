"""stdit's kernels inside other libraries' models: :func:`apply_to_diffusers` puts them into diffusers' own Wan."""

from stdit.integrations.diffusers import StDiTWanAttnProcessor, apply_to_diffusers, remove_from_diffusers

__all__ = ["StDiTWanAttnProcessor", "apply_to_diffusers", "remove_from_diffusers"]
