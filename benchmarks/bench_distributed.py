"""Multi-GPU scaling on one host, launched with torchrun:

    torchrun --nproc_per_node=N benchmarks/bench_distributed.py [--config wan2.1-t2v-1.3b]

1. FSDP2 training (``fully_shard`` per block, bf16 params / fp32 reductions, activation checkpointing, AdamW):
   tokens/s per GPU and peak memory per GPU, one 480p x 81-frame sample (32,760 tokens) per GPU.
2. Sequence-parallel inference: latency of one forward at 720p x 81 frames (75,600 tokens) with sp = N.

Each run writes ``results/distributed-<gpu>-n<N>.json``; the markdown table and the scaling plot are rebuilt from
every ``n*.json`` present, so runs at 1, 2, 4 and 8 GPUs add up to one report.
"""

from __future__ import annotations

import os

# NVLink multicast stays off on shared hosts, also for anything this process starts.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES, TEXT_LEN  # noqa: E402
from common import RESULTS, bar_plot, gpu_slug, machine, markdown_table  # noqa: E402
from wan_models import model_flops, random_wan_pair  # noqa: E402


def timed(fn, steps: int) -> float:
    """Median seconds per call over ``steps`` calls, synchronized across ranks."""
    times = []
    for _ in range(steps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(sorted(times)[len(times) // 2], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def train_throughput(config: str, steps: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _, model = random_wan_pair(config, dtype=torch.float32)
    model.train().enable_gradient_checkpointing()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:  # as the trainer does (stdit.parallel.dist.wrap_model)
        fully_shard(block, mp_policy=block_mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    t, h, w = SHAPES["480p"]
    g = torch.Generator("cuda").manual_seed(dist.get_rank())
    x = torch.randn(1, 16, t, h, w, device="cuda", generator=g)
    target = torch.randn_like(x)
    text = torch.randn(1, TEXT_LEN, 4096, device="cuda", generator=g)
    ts = torch.tensor([500.0], device="cuda")

    def step():
        out = model(x, ts, text, return_dict=False)[0]
        (out.float() - target).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, steps)
    tokens = t * (h // 2) * (w // 2)
    flops = 3 * model_flops(dict(model.config), (t, h // 2, w // 2), TEXT_LEN)
    return {"train step s": sec, "tokens/s/GPU": tokens / sec, "TFLOP/s/GPU": flops / sec / 1e12,
            "train peak GiB/GPU": torch.cuda.max_memory_allocated() / 2**30}


def sp_latency(config: str, steps: int) -> dict:
    _, model = random_wan_pair(config)
    if dist.get_world_size() > 1:
        model.enable_sequence_parallel()
    t, h, w = SHAPES["720p"]
    g = torch.Generator("cuda").manual_seed(0)  # the same inputs on every rank
    x = torch.randn(1, 16, t, h, w, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, TEXT_LEN, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    ts = torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        fn = lambda: model(x, ts, text, return_dict=False)  # noqa: E731
        fn()
        torch.cuda.reset_peak_memory_stats()
        sec = timed(fn, steps)
    return {"sp forward 720p s": sec, "sp peak GiB/GPU": torch.cuda.max_memory_allocated() / 2**30}


def report(config: str) -> None:
    runs = []
    for f in sorted(RESULTS.glob(f"distributed-{config}-*-n*.json")):
        runs.append(json.loads(f.read_text()))
    runs.sort(key=lambda r: r["gpus"])
    base = next((r for r in runs if r["gpus"] == 1), None)
    for r in runs:
        if base:
            r["train efficiency"] = r["tokens/s/GPU"] / base["tokens/s/GPU"]
            r["sp speedup"] = base["sp forward 720p s"] / r["sp forward 720p s"]
            r["sp efficiency"] = r["sp speedup"] / r["gpus"]
    info = runs[-1]["machine"]
    cols = ["gpus", "tokens/s/GPU", "TFLOP/s/GPU", "train efficiency", "train peak GiB/GPU", "sp forward 720p s",
            "sp speedup", "sp efficiency", "sp peak GiB/GPU"]
    md = RESULTS / f"distributed-{config}-{gpu_slug(info['gpu'])}.md"
    md.write_text(f"# Multi-GPU scaling, {config}\n\nGPU: {info['gpu']} · torch {info['torch']} · CUDA {info['cuda']}"
                  f" · triton {info['triton']}\n\nFSDP2 training at 480p x 81f (one sample per GPU) and sequence-"
                  f"parallel forward at 720p x 81f (sp = GPUs).\n\n{markdown_table(runs, cols)}\n")
    print(md.read_text())
    if base:
        labels = [str(r["gpus"]) for r in runs]
        bar_plot(md.with_suffix(".png"), labels, {"FSDP2 train efficiency %": [100 * r["train efficiency"] for r in runs],
                                                  "SP forward efficiency %": [100 * r["sp efficiency"] for r in runs]},
                 "scaling efficiency (%)", f"{config} scaling, {info['gpu']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-t2v-1.3b")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sp", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_distributed needs CUDA GPUs (launch with torchrun).", file=sys.stderr)
        return 2
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    n = dist.get_world_size()
    result = {"gpus": n, "config": args.config, "machine": machine()}
    if not args.skip_train:
        result.update(train_throughput(args.config, args.steps))
        torch.cuda.empty_cache()
    if not args.skip_sp:
        result.update(sp_latency(args.config, args.steps))
    if dist.get_rank() == 0:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"distributed-{args.config}-{gpu_slug(result['machine']['gpu'])}-n{n}.json"
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        report(args.config)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
