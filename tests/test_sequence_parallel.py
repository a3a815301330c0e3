"""Ulysses sequence parallelism on the CPU with gloo: outputs and every gradient equal the single-process model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stdit.parallel.dist import cleanup
from stdit.parallel.ulysses import check_sp_size, valid_sp_sizes

CASES = [
    # (attention_mode, (T, H, W)); with patch (1, 2, 2) the token counts are 12 (divides sp = 2 and 4),
    # 9 and 15 (padded at sp = 2 and 4) and 18 (padded at sp = 4 only)
    ("full", (3, 4, 4)),
    ("full", (3, 2, 6)),
    ("factorized", (5, 2, 6)),
    ("factorized", (3, 4, 6)),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(mode):
    from stdit import StDiT

    torch.manual_seed(0)
    m = StDiT(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=3, out_channels=3,
              text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2, attention_mode=mode)
    with torch.no_grad():  # make the zero-initialized parts matter too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _inputs(thw):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return (torch.randn(2, 3, *thw, generator=g), torch.tensor([20.0, 700.0]), torch.randn(2, 5, 16, generator=g),
            mask)


def _run(m, inputs, checkpointing=False):
    m.zero_grad()
    if checkpointing:
        m.enable_gradient_checkpointing()
    x, t, text, mask = inputs
    out = m(x, t, text, encoder_attention_mask=mask).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def _pipeline_error() -> float:
    """Sampling with classifier-free guidance: every rank runs the pipeline on the same seed; the model shards the
    tokens inside and gathers them back each step, so each rank ends with the whole video."""
    from stdit.pipeline import StDiTPipeline, make_scheduler

    pipe = StDiTPipeline(_build("full").eval(), make_scheduler("euler"))
    pipe.set_progress_bar_config(disable=True)
    text = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt_embeds=text, num_frames=3, height=2, width=6, num_inference_steps=3, guidance_scale=2.0)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.transformer.enable_sequence_parallel()
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    return ((out - ref).norm() / ref.norm()).item()


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    errors, ok = {}, False
    try:
        for i, (mode, thw) in enumerate(CASES):
            inputs = _inputs(thw)
            ref_out, ref_grads = _run(_build(mode), inputs)
            m = _build(mode)
            m.enable_sequence_parallel()
            out, grads = _run(m, inputs, checkpointing=i % 2 == 1)
            for g in grads.values():  # what DDP/FSDP do over the data-parallel dims
                dist.all_reduce(g)
                g /= world
            err = (out - ref_out).norm() / ref_out.norm()
            gerr = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
                       for n in ref_grads)
            errors[(mode, thw)] = (err.item(), gerr)
        errors["pipeline"] = (_pipeline_error(), 0.0)
        ok = True
    finally:
        cleanup(wait_for_all=ok)  # the group's users freed first: gloo aborts a process that frees them at exit
    if rank == 0:
        results.put(errors)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_single_process(world):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    errors = results.get()
    assert len(errors) == len(CASES) + 1
    for case, (err, gerr) in errors.items():
        print(f"sp={world} {case}: output rel err {err:.1e}, worst grad rel err {gerr:.1e}")
        assert err <= 1e-5 and gerr <= 1e-5, case


def test_bad_sizes_are_refused_up_front():
    assert valid_sp_sizes(12, 8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"parallel.sp=5 does not divide the 12 attention heads; valid sizes: \[1, 2, 3, 4, 6, 12\]"):
        check_sp_size(5, 12)
    with pytest.raises(ValueError, match=r"parallel.sp=3 does not divide the world size 4; valid sizes: \[1, 2, 4\]"):
        check_sp_size(3, 12, world_size=4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_training_with_sp2_follows_the_sp1_loss_curve(tmp_path, mode):
    """torchrun 2 ranks as one sequence-parallel group (the same samples, half the tokens each) vs one process."""
    from test_distributed import _torchrun
    from test_train import tiny, write_config

    from stdit.train import train
    from stdit.train_utils import read_log

    steps = ["train.steps=3", "train.ema_decay=0", "train.ckpt_every=0", "train.batch_size=2"]
    cfg = write_config(tmp_path / "cfg.yaml")
    out = _torchrun(cfg, tmp_path / "sp2", [f"parallel.mode={mode}", "parallel.sp=2", *steps])
    assert "sp=2" in out
    train(tiny(tmp_path / "sp1", steps))
    two, one = read_log(tmp_path / "sp2" / "log.jsonl"), read_log(tmp_path / "sp1" / "log.jsonl")
    assert len(two) == len(one) == 3
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
