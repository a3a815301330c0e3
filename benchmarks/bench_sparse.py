"""Block-sparse 3D-tile attention against our dense kernel and FlexAttention with the same block mask.

For each video token grid (Wan's 480p and 720p latents at 81 frames, and 720p at 241 frames) the tokens are cut
into tiles (:class:`stdit.kernels.attention_sparse.TileLayout`) and every query tile keeps ``(1 - sparsity)`` of
the key tiles: itself and a random choice per head (what a data-dependent top-k selection looks like to the
kernel). Timed, forward and forward+backward, bf16, B=1, Wan-1.3B's 12 heads of 128: our sparse kernel on the
tile-ordered tokens, FlexAttention (``torch.compile``) with a ``BlockMask`` of the same tiles (full tiles as full
blocks, tiles cut by the grid's edge as partial blocks with a mask of their padding rows), and our dense kernel on
the grid's tokens (no padding). "TFLOP/s per block" counts what each kernel computes (4 * tile^2 * D flops per
computed tile pair forward, 3.5x that forward + backward), so it compares how well the sparse kernels use the GPU
per computed block with the dense kernel.

    python benchmarks/bench_sparse.py [--shapes 480p 720p 720p-241] [--sparsity 0.5 0.75 0.875 0.9]
                                      [--tile 4 4 4] [--no-flex] [--no-backward]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bar_plot, bench_ms, gpu_slug, machine, run_on_gpu, write_results  # noqa: E402

from stdit.kernels import flash_attention  # noqa: E402
from stdit.kernels.attention_sparse import TileLayout, TileMask, tile_attention  # noqa: E402

# latent token grids (t, h, w) after Wan's (1, 2, 2) patch: 81 frames -> 21 latent frames, 241 -> 61
SHAPES = {"480p": (21, 30, 52), "720p": (21, 45, 80), "720p-241": (61, 45, 80)}
HEADS, HEAD_DIM = 12, 128


def random_tile_mask(num_tiles: int, heads: int, keep: float, seed: int, device) -> torch.Tensor:
    """``[1, heads, NQ, NK]``: every query tile keeps itself and ``round(keep * NK) - 1`` other key tiles at random."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = max(1, round(keep * num_tiles))
    scores = torch.rand(1, heads, num_tiles, num_tiles, generator=g)
    scores[..., torch.arange(num_tiles), torch.arange(num_tiles)] = 2.0  # the query tile itself first
    chosen = scores.topk(k, dim=-1).indices
    return torch.zeros(1, heads, num_tiles, num_tiles, dtype=torch.bool).scatter_(-1, chosen, True).to(device)


def flex_fn(layout: TileLayout, dense_mask: torch.Tensor):
    """FlexAttention over the tile-ordered tokens with a BlockMask of the same tiles, compiled once per shape."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n, tile = layout.num_tiles, layout.tile_tokens
    n_valid = layout.n_valid.to(dense_mask.device)
    full_tile = (n_valid == tile)[None, None, None, :]

    def lists(m):  # BlockMask wants the index lists at the full width NK (it densifies them by that width)
        count = m.sum(-1).to(torch.int32)
        idx = torch.where(m, torch.arange(n, device=m.device), n).sort(-1).values.clamp(max=n - 1).to(torch.int32)
        return count.contiguous(), idx.contiguous()

    partial_n, partial_i = lists(dense_mask & ~full_tile)
    full_n, full_i = lists(dense_mask & full_tile)

    # The whole mask, though the compiled kernel evaluates it only on partial blocks (the tiles cut by the grid's
    # edge, where it masks the padding rows); flex_attention's eager path evaluates it everywhere.
    def mask_mod(b, h, q_idx, kv_idx):
        return dense_mask[0, h, q_idx // tile, kv_idx // tile] & ((kv_idx % tile) < n_valid[kv_idx // tile])

    block_mask = BlockMask.from_kv_blocks(partial_n, partial_i, full_n, full_i, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                          seq_lengths=(n * tile, n * tile))
    # one compiled graph per shape, mask width and grad mode: past Dynamo's recompile limit (8) flex_attention
    # would fall back to its unfused eager path
    knob = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, knob, 64)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    block_mask=block_mask).transpose(1, 2)


def timed(fn, q, k, v, backward: bool) -> float:
    if not backward:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        do = torch.randn_like(q)

        def step():
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    step()
    torch.cuda.synchronize()
    return bench_ms(step, warmup_ms=50, rep_ms=300)


def run(args, clock) -> int:
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    for shape in args.shapes:
        grid = SHAPES[shape]
        layout = TileLayout.build(grid, tuple(args.tile), device=dev)
        s0, n, tile = grid[0] * grid[1] * grid[2], layout.num_tiles, layout.tile_tokens
        q0, k0, v0 = (torch.randn(1, s0, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(3))
        qt, kt, vt = (layout.to_tiles(x.detach()).requires_grad_() for x in (q0, k0, v0))
        dense_flops = 4 * HEADS * s0 * s0 * HEAD_DIM
        for mode, backward in modes:
            mult = 3.5 if backward else 1.0
            ms = timed(flash_attention, q0, k0, v0, backward)
            dense_tflops = mult * dense_flops / ms / 1e9
            rows.append({"shape": shape, "tokens": s0, "mode": mode, "sparsity": 0.0, "impl": "ours dense",
                         "ms": ms, "TFLOP/s per block": dense_tflops, "vs ours dense": 1.0})
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
            for sparsity in args.sparsity:
                dense_mask = random_tile_mask(n, HEADS, 1 - sparsity, seed=int(sparsity * 1000), device=dev)
                mask = TileMask.from_dense(dense_mask)
                pairs = int(mask.kv_count.sum())
                flops = mult * 4 * pairs * tile * tile * HEAD_DIM
                impls = {"ours sparse": lambda q, k, v: tile_attention(q, k, v, mask, layout)}
                if not args.no_flex:
                    impls["flex"] = flex_fn(layout, dense_mask)
                for name, fn in impls.items():
                    try:
                        ms_s = timed(fn, qt, kt, vt, backward)
                    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                        print(f"{shape} {mode} {sparsity} {name}: {type(e).__name__}: {e}"[:300], flush=True)
                        continue
                    rows.append({"shape": shape, "tokens": s0, "mode": mode, "sparsity": sparsity, "impl": name,
                                 "ms": ms_s, "TFLOP/s per block": flops / ms_s / 1e9, "vs ours dense": ms / ms_s,
                                 "per-block vs dense": flops / ms_s / 1e9 / dense_tflops})
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        del q0, k0, v0, qt, kt, vt
        torch.cuda.empty_cache()
    info = machine()
    notes = (f"Tile {tuple(args.tile)} ({layout.tile_tokens} tokens); {HEADS} heads x {HEAD_DIM}, B=1, bf16. "
             "Sparsity = the fraction of key tiles each query tile skips (chosen at random per head, the query "
             "tile itself always kept). 'vs ours dense' = our dense kernel's time on the grid's tokens / this "
             "time; 'per-block vs dense' = TFLOP/s per computed block / our dense kernel's TFLOP/s. Medians of "
             "triton.testing.do_bench.")
    stem = "sparse" if tuple(args.tile) == (4, 4, 4) else "sparse-tile" + "x".join(map(str, args.tile))
    write_results(stem, "Block-sparse tile attention vs dense and FlexAttention", rows,
                  ["shape", "tokens", "mode", "sparsity", "impl", "ms", "TFLOP/s per block", "vs ours dense",
                   "per-block vs dense"], notes=notes, extra={"tile": list(args.tile)})
    labels = [f"{r['shape']} {r['mode']} s={r['sparsity']:g}" for r in rows if r["impl"] == "ours sparse"]
    series = {}
    for name in ("ours sparse", "flex"):
        got = [r["vs ours dense"] for r in rows if r["impl"] == name]
        if len(got) == len(labels):
            series[name] = got
    if labels:
        bar_plot(RESULTS / f"{stem}-{gpu_slug(info['gpu'])}.png", labels, series, "speed-up over our dense kernel",
                 f"Tile attention, {info['gpu']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["480p", "720p", "720p-241"], choices=sorted(SHAPES))
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75, 0.875, 0.9])
    p.add_argument("--tile", nargs=3, type=int, default=[4, 4, 4])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-backward", action="store_true")
    return run_on_gpu("bench_sparse.py", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
