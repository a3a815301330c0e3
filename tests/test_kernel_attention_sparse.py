"""Block-sparse tile attention (:mod:`stdit.kernels.attention_sparse`) against its masked-dense twin: the 3D tile
layout, the sliding-tile mask, and the kernels' forward and dq/dk/dv on grids that do not divide into tiles.

On the CPU the kernels run under the Triton interpreter (fp32/fp16, tiny grids); on CUDA the ``gpu`` tests use
real sizes in bf16 with the flash-attention error rule."""

from __future__ import annotations

import pytest
import torch
from _kernel_env import HAS_CUDA, check_rule, device, load_kernels, max_err

load_kernels()
from stdit.kernels.attention_ref import attention_ref  # noqa: E402
from stdit.kernels.attention_sparse import (TileLayout, TileMask, sliding_tile_mask,  # noqa: E402
                                            tile_attention)
from stdit.kernels.attention_sparse_ref import tile_attention_ref  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def test_layout_is_a_permutation_of_3d_boxes():
    lay = TileLayout.build((3, 5, 7), (2, 2, 4))
    assert lay.tiles == (2, 3, 2) and lay.num_tiles == 12 and lay.tile_tokens == 16
    x = torch.randn(2, 3 * 5 * 7, 3)
    tiled = lay.to_tiles(x)
    assert tiled.shape == (2, 12 * 16, 3)
    assert torch.equal(lay.untile(tiled), x)  # the inverse is exact
    t, h, w = torch.meshgrid(torch.arange(3), torch.arange(5), torch.arange(7), indexing="ij")
    coords = torch.stack([t, h, w], -1).reshape(-1, 3)
    for i in range(lay.num_tiles):
        ti, hi, wi = i // 6, (i // 2) % 3, i % 2
        rows = lay.gather[i * 16:(i + 1) * 16]
        real = rows[rows < coords.shape[0]]
        assert real.numel() == int(lay.n_valid[i])
        assert torch.equal(rows[:real.numel()], real)  # a tile's real tokens come first
        box = coords[real]
        assert (box // torch.tensor([2, 2, 4]) == torch.tensor([ti, hi, wi])).all()
        expected = ((coords // torch.tensor([2, 2, 4])) == torch.tensor([ti, hi, wi])).all(-1).sum()
        assert real.numel() == int(expected)
        assert (tiled[:, i * 16 + real.numel():(i + 1) * 16] == 0).all()  # padding rows are zero


def test_layout_refuses_tiles_the_kernels_cannot_run():
    with pytest.raises(ValueError, match="power of two >= 16"):
        TileLayout.build((4, 4, 4), (3, 4, 4))
    with pytest.raises(ValueError, match="expected 64 tokens"):
        TileLayout.build((4, 4, 4), (2, 2, 4)).to_tiles(torch.zeros(1, 63, 2))


def test_sliding_tile_mask_sees_the_same_number_of_tiles_everywhere():
    lay = TileLayout.build((8, 12, 20), (2, 2, 4))  # tile grid 4 x 6 x 5
    m = sliding_tile_mask(lay, (3, 3, 3))
    assert (m.kv_count == 27).all()
    dense = m.dense(lay.num_tiles)[0, 0]
    ids = torch.arange(lay.num_tiles)
    pos = torch.stack([ids // 30, (ids // 5) % 6, ids % 5], -1)
    dist = (pos[:, None] - pos[None, :]).abs()
    assert dense[dist.amax(-1) <= 1].all()  # the neighbours of every tile are in its window
    assert (dense.sum(0) == m.q_count[0, 0]).all()  # the transposed lists match the mask
    assert m.density() == pytest.approx(27 / 120)
    full = sliding_tile_mask(lay, (9, 9, 9))  # a window larger than the tile grid is dense
    assert full.density() == 1.0
    with pytest.raises(ValueError, match="at least one key tile"):
        TileMask.from_dense(torch.zeros(4, 4, dtype=torch.bool))


def _inputs(b, s, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, s, h, d, generator=g).to(device(), dtype) for _ in range(4))
    return q, k, v, do


def _run(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


CPU_CASES = [
    # grid, tile, heads, head dim, dtype, mask kind
    ((3, 5, 7), (2, 2, 4), 2, 32, torch.float32, "window"),
    ((2, 6, 5), (1, 4, 4), 1, 72, torch.float32, "random"),
    ((5, 3, 3), (2, 2, 4), 2, 64, torch.float16, "random"),
    ((2, 4, 4), (2, 2, 4), 1, 48, torch.float32, "all"),
]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover CUDA")
@pytest.mark.parametrize("grid,tile,h,d,dtype,kind", CPU_CASES)
def test_tile_attention_matches_masked_dense(grid, tile, h, d, dtype, kind):
    lay = TileLayout.build(grid, tile)
    b, n = 2, lay.num_tiles
    if kind == "window":
        mask = sliding_tile_mask(lay, (1, 3, 1))
    elif kind == "random":  # a different mask per batch row and head
        g = torch.Generator().manual_seed(3)
        dense = torch.rand(b, h, n, n, generator=g) < 0.4
        dense[..., torch.arange(n), torch.arange(n)] = True
        mask = TileMask.from_dense(dense)
    else:
        mask = TileMask.from_dense(torch.ones(n, n, dtype=torch.bool))
    q, k, v, do = _inputs(b, lay.num_tiles * lay.tile_tokens, h, d, dtype, seed=len(grid) + d)
    out = _run(lambda *a: tile_attention(*a, mask, lay), q, k, v, do)
    ref = _run(lambda *a: tile_attention_ref(*a, mask.dense(n), lay.n_valid, dtype=torch.float64), q, k, v, do)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert max_err(x, r) <= tol * max(1.0, r.abs().max().item()), f"{name}: error {max_err(x, r):.2e}"
    # padding keys get no probability: the gradient of a padding key row is zero
    pad = torch.arange(lay.tile_tokens)[None, :] >= lay.n_valid[:, None].long()
    assert (out[2].view(b, n, lay.tile_tokens, h, d)[:, pad] == 0).all()


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover CUDA")
def test_all_tiles_is_dense_attention_on_the_grid():
    lay = TileLayout.build((3, 4, 6), (1, 4, 4))
    q, k, v, do = _inputs(1, 3 * 4 * 6, 2, 32, torch.float32, seed=5)
    mask = TileMask.from_dense(torch.ones(lay.num_tiles, lay.num_tiles, dtype=torch.bool))
    sparse = _run(lambda q, k, v: lay.untile(tile_attention(lay.to_tiles(q), lay.to_tiles(k), lay.to_tiles(v),
                                                            mask, lay)), q, k, v, do)
    dense = _run(lambda q, k, v: attention_ref(q, k, v, dtype=torch.float64), q, k, v, do)
    for name, x, r in zip(("o", "dq", "dk", "dv"), sparse, dense):
        assert max_err(x, r) <= 2e-5 * max(1.0, r.abs().max().item()), name


def test_tile_attention_refuses_untiled_inputs():
    lay = TileLayout.build((2, 4, 4), (2, 2, 4))
    mask = sliding_tile_mask(lay, (1, 1, 1))
    q = torch.zeros(1, 2 * 4 * 4 + 1, 1, 32, device=device())
    with pytest.raises(ValueError, match="to_tiles"):
        tile_attention(q, q, q, mask, lay)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("grid,tile,d", [((21, 30, 52), (4, 4, 4), 128), ((7, 18, 20), (2, 8, 8), 64)])
def test_tile_attention_bf16_flash_rule_gpu(grid, tile, d):
    lay = TileLayout.build(grid, tile, device="cuda")
    mask = sliding_tile_mask(lay, (3, 3, 3), device="cuda")
    n = lay.num_tiles
    q, k, v, do = _inputs(1, n * lay.tile_tokens, 2, d, torch.bfloat16, seed=1)
    dense = mask.dense(n)
    out = _run(lambda *a: tile_attention(*a, mask, lay), q, k, v, do)
    ref = _run(lambda *a: tile_attention_ref(*a, dense, lay.n_valid, dtype=torch.float32), q, k, v, do)
    low = _run(lambda *a: tile_attention_ref(*a, dense, lay.n_valid, dtype=torch.bfloat16), q, k, v, do)
    for name, x, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        check_rule(name, x, r, lo)
