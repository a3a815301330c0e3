"""Latent caches written by ``stdit encode``: safetensors shards plus an ``index.json``.

Shard ``shard-00000.safetensors`` holds, for item ``j``, ``{j}.latents`` ``[C, T, H, W]`` (normalized VAE latents, or
pixels without a VAE) and, when text features were encoded, ``{j}.prompt_embeds`` ``[L, D]`` (real tokens only).
With image-to-video data (``stdit encode --image-encoder / --image-condition``) also ``{j}.image_embeds``
``[L_img, D_img]`` (CLIP features) and ``{j}.condition`` ``[C_cond, T, H, W]`` (the condition input).
``index.json`` lists the shards, each item's latent shape (for bucketing), caption and source path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

INDEX = "index.json"


class LatentDataset(Dataset):
    """Items ``{"latents", "caption"[, "prompt_embeds"]}`` from a folder written by ``stdit encode``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root} has no {INDEX}; write it with `stdit encode --out {self.root} ...`.")
        rewrite = f"write it again with `stdit encode --out {self.root} ...`"
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{index_path} is truncated or not JSON ({e}); {rewrite}.") from None
        try:
            self.items = [(s["file"], j, tuple(shape), cap)
                          for s in self.index["shards"]
                          for j, (shape, cap) in enumerate(zip(s["shapes"], s["captions"], strict=True))]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{index_path} does not have the layout `stdit encode` writes (shards, each with file, "
                             f"shapes and captions of equal length; {type(e).__name__}: {e}); {rewrite}.") from None
        if not self.items:
            raise ValueError(f"{index_path} lists no items.")
        if isinstance(self.index.get("count"), int) and self.index["count"] != len(self.items):
            raise ValueError(f"{index_path} says {self.index['count']} items but lists {len(self.items)}; {rewrite}.")
        absent = sorted({f for f, *_ in self.items if not (self.root / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{index_path} lists shard(s) missing from {self.root}: {', '.join(absent[:5])}"
                                    f"{' ...' if len(absent) > 5 else ''}; {rewrite}.")
        self._handles: dict[str, object] = {}

    @property
    def bucket_ids(self) -> list[tuple[int, ...]]:
        return [shape[1:] for _, _, shape, _ in self.items]

    @property
    def has_text(self) -> bool:
        return bool(self.index.get("text_features"))

    def __len__(self) -> int:
        return len(self.items)

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.root / file), framework="pt")
            except Exception as e:  # safetensors' errors do not name the file
                raise ValueError(f"{self.root / file}: cannot read this latent shard as safetensors ({e}); it is "
                                 f"truncated or corrupt: encode again with `stdit encode --out {self.root} ...`."
                                 ) from e
        return self._handles[file]

    def __getitem__(self, index: int) -> dict:
        file, j, _, caption = self.items[index]
        h = self._handle(file)
        try:
            item = {"latents": h.get_tensor(f"{j}.latents").float(), "caption": caption}
            if self.has_text:
                item["prompt_embeds"] = h.get_tensor(f"{j}.prompt_embeds").float()
            if self.index.get("image_features"):
                item["image_embeds"] = h.get_tensor(f"{j}.image_embeds").float()
            if self.index.get("image_condition"):
                item["condition"] = h.get_tensor(f"{j}.condition").float()
        except Exception as e:
            raise ValueError(f"{self.root / file}: cannot read item {j} ({type(e).__name__}: {e}); the shard does not "
                             f"match {INDEX}: encode again.") from e
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross into DataLoader workers
        return state


def write_shard(path: Path, latents: list[torch.Tensor], prompt_embeds: list[torch.Tensor] | None,
                extra: dict[str, list[torch.Tensor]] | None = None) -> None:
    """``extra``: more per-item tensors by name (``image_embeds``, ``condition``), one per latent."""
    from safetensors.torch import save_file

    tensors = {f"{j}.latents": z.contiguous() for j, z in enumerate(latents)}
    if prompt_embeds is not None:
        tensors.update({f"{j}.prompt_embeds": e.contiguous() for j, e in enumerate(prompt_embeds)})
    for name, values in (extra or {}).items():
        tensors.update({f"{j}.{name}": v.contiguous() for j, v in enumerate(values)})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
