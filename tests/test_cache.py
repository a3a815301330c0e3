"""Step cache (stdit.cache) and guidance batching: off means bitwise unchanged, on means fewer block-stack calls at
a small error; per-branch state in StDiTPipeline (batched guidance) and in diffusers' WanPipeline (two calls);
calibration saved with the model; CFG parallel and sequence parallel over gloo ranks."""

import functools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import tiny_model
from stdit.cache import (CALIBRATION_FILE, StepCacheCalibration, StepCacheConfig, calibrating, disable_step_cache,
                         enable_step_cache, get_step_cache, parse_layout)
from stdit.parallel.dist import cleanup
from stdit.pipeline import StDiTPipeline, layout_name, make_scheduler, stack_branches
from wan_pipeline import run as run_wan
from wan_pipeline import tiny_pipeline, tiny_wan


def _text_model(**kw):
    m = tiny_model(**kw)
    with torch.no_grad():  # the zero-initialized parts matter too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _pipe(m, scheduler="unipc"):
    p = StDiTPipeline(m, make_scheduler(scheduler, 3.0))
    p.set_progress_bar_config(disable=True)
    return p


TEXT = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(3))
CALL = dict(prompt_embeds=TEXT, num_frames=3, height=8, width=8, num_inference_steps=12, guidance_scale=4.0,
            output_type="latent")


def _sample(p, seed=0, **kw):
    return p(generator=torch.Generator().manual_seed(seed), **{**CALL, **kw})


def _computed_steps(model, p, **kw):
    """The step indices at which the block stack ran (a forward hook on the first block)."""
    calls, steps = [], []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))

    def mark(pipe, i, t, tensors):
        steps.append(len(calls))
        return tensors

    try:
        _sample(p, callback_on_step_end=mark, **kw)
    finally:
        handle.remove()
    return [i for i, n in enumerate(steps) if n > (steps[i - 1] if i else 0)]


def test_cache_off_or_at_threshold_zero_is_bitwise_the_uncached_run():
    m = _text_model()
    p = _pipe(m)
    ref = _sample(p).frames
    direct = m(torch.ones(2, 4, 3, 8, 8), torch.tensor([300.0, 700.0]), torch.cat([TEXT, TEXT])).sample
    with calibrating(m):
        assert torch.equal(_sample(p).frames, ref)  # calibration runs every step and only reads
    hook = enable_step_cache(m, method="teacache", threshold=0.0)
    assert torch.equal(_sample(p).frames, ref) and hook.skipped == 0 and hook.computed == CALL["num_inference_steps"]
    disable_step_cache(m)
    assert get_step_cache(m) is None and "_run_blocks" not in vars(m)
    assert torch.equal(_sample(p).frames, ref)
    assert torch.equal(m(torch.ones(2, 4, 3, 8, 8), torch.tensor([300.0, 700.0]), torch.cat([TEXT, TEXT])).sample,
                       direct)


def _psnr(a, b):
    return 10 * math.log10(1.0 / max(torch.mean((a - b) ** 2).item(), 1e-30))


@pytest.mark.parametrize("method,threshold", [("teacache", 0.3), ("magcache", 0.1)])
def test_a_threshold_skips_block_stacks_and_keeps_the_video_close(method, threshold):
    """A pixel-space class model, 20 steps with guidance: calibrated on other seeds, the cache runs the blocks at
    half the steps or fewer and the frames stay above 30 dB PSNR against the uncached ones from the same noise."""
    m = _text_model(text_dim=None, num_classes=3, in_channels=3, out_channels=3)
    p = _pipe(m)
    kw = dict(class_labels=[0, 2], num_frames=3, height=8, width=8, num_inference_steps=20, guidance_scale=3.0)
    with calibrating(m) as cal:
        for seed in (10, 11):
            p(generator=torch.Generator().manual_seed(seed), **kw)
    ref = p(generator=torch.Generator().manual_seed(0), **kw).frames
    hook = enable_step_cache(m, StepCacheConfig.from_calibration(cal.result(), method=method, threshold=threshold))
    out = p(generator=torch.Generator().manual_seed(0), **kw)
    psnr = _psnr(out.frames, ref)
    print(f"{method} {threshold}: block stacks {hook.computed}/20, PSNR {psnr:.1f} dB")
    assert hook.computed + hook.skipped == 20 and hook.computed <= 10
    assert out.timings["blocks_computed"] == hook.computed and out.timings["blocks_skipped"] == hook.skipped
    assert psnr >= 30


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_protected_first_and_last_steps_always_run(method):
    m = _text_model()
    p = _pipe(m)
    ratios = {"uncond": [1.0] * 12, "cond": [1.0] * 12}  # no magnitude change: MagCache would skip everything
    enable_step_cache(m, method=method, threshold=1e9, protect_first=2, protect_last=3, max_skip_steps=None,
                      mag_ratios=ratios)
    assert _computed_steps(m, p) == [0, 1, 9, 10, 11]
    get_step_cache(m).config.max_skip_steps = 2  # and never more than two skipped steps in a row
    assert _computed_steps(m, p) == [0, 1, 4, 7, 9, 10, 11]


def test_one_state_per_branch_in_stdit_pipeline_and_wan_pipeline():
    """WanPipeline calls the transformer twice a step (cache contexts "cond", "uncond"), StDiTPipeline once with both
    branches batched ("uncond+cond"): both leave one state per branch, and the batched call's states hold what two
    calls of our pipeline leave."""
    from stdit import StDiT

    m = StDiT.from_wan(tiny_wan())
    pipe = tiny_pipeline(m)
    hook = enable_step_cache(m, threshold=0.0)
    calls, states = [], {}
    m.register_forward_pre_hook(lambda module, args: calls.append(hook.branches._context.name))

    def snapshot(pipe, i, t, tensors):  # before the pipeline's end resets the cache
        states.clear()
        states.update({k: v.residual.clone() for k, v in hook.branches._state_cache.items()})
        return tensors

    run_wan(pipe, steps=3, output_type="latent", callback_on_step_end=snapshot)
    assert calls == ["cond", "uncond"] * 3 and set(states) == {"cond", "uncond"}
    assert not torch.allclose(states["cond"], states["uncond"])  # each branch keeps its own residual

    ours = StDiTPipeline(m, pipe.scheduler)
    ours.set_progress_bar_config(disable=True)
    text, neg = pipe.encode_prompt("a red square moves left", "blue circle", max_sequence_length=16)
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, num_frames=2, height=4, width=4, num_inference_steps=3,
              guidance_scale=4.0, latents=torch.randn(1, 16, 2, 4, 4), output_type="latent",
              callback_on_step_end=snapshot)
    calls.clear()
    ours(**kw)
    batched = dict(states)
    assert calls == ["uncond+cond"] * 3 and set(batched) == {"cond", "uncond"}
    calls.clear()
    ours(guidance_batching=False, **kw)
    assert calls == ["cond", "uncond"] * 3
    for branch in ("cond", "uncond"):
        torch.testing.assert_close(batched[branch], states[branch], rtol=1e-5, atol=1e-5)


def test_layouts_name_the_rows_of_each_branch():
    assert parse_layout("cond", 2) == [("cond", 0, 2)]
    assert parse_layout("uncond+cond", 4) == [("uncond", 0, 2), ("cond", 2, 4)]
    assert parse_layout("uncond:2+cond:1", 3) == [("uncond", 0, 2), ("cond", 2, 3)]
    assert parse_layout("uncond:1+cond", 3) == [("uncond", 0, 1), ("cond", 1, 3)]
    assert layout_name(["uncond", "uncond", "cond", "cond"]) == "uncond+cond"
    assert layout_name(["uncond", "cond", "cond"]) == "uncond:1+cond:2"
    for bad, rows in (("uncond+cond", 3), ("cond+cond", 2), ("a:x", 1), ("a:3", 2)):
        with pytest.raises(ValueError, match="cache context"):
            parse_layout(bad, rows)


def test_cache_works_in_wan_pipeline_with_stdit():
    from stdit import StDiT

    m = StDiT.from_wan(tiny_wan())
    pipe = tiny_pipeline(m)
    ref = run_wan(pipe, steps=10, output_type="latent")
    with calibrating(m) as cal:
        run_wan(pipe, steps=10, seed=1, output_type="latent")
    calibration = cal.result()
    assert set(calibration.mag_ratios) == {"cond", "uncond"} and calibration.num_inference_steps == 10
    for method, threshold in (("teacache", 0.5), ("magcache", 0.5)):
        hook = enable_step_cache(m, StepCacheConfig.from_calibration(calibration, method=method, threshold=threshold))
        out = run_wan(pipe, steps=10, output_type="latent")
        err = ((out - ref).norm() / ref.norm()).item()
        assert hook.skipped >= 8 and hook.computed + hook.skipped == 20 and err < 0.05, (method, hook.skipped, err)
        disable_step_cache(m)
    assert torch.equal(run_wan(pipe, steps=10, output_type="latent"), ref)


def test_batched_guidance_equals_two_calls():
    m = _text_model()
    p = _pipe(m)
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    neg = torch.randn(1, 7, 24, generator=torch.Generator().manual_seed(4))  # longer and unmasked
    for kw in ({}, dict(prompt_attention_mask=mask), dict(prompt_attention_mask=mask, negative_prompt_embeds=neg)):
        a = _sample(p, **kw).frames
        b = _sample(p, guidance_batching=False, **kw).frames
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    both = stack_branches({"encoder_hidden_states": neg}, {"encoder_hidden_states": TEXT,
                                                           "encoder_attention_mask": mask})
    assert both["encoder_hidden_states"].shape == (2, 7, 24)
    assert both["encoder_attention_mask"].tolist() == [[True] * 7, [True] * 3 + [False] * 4]


def test_calibration_is_saved_with_the_model_and_bad_settings_are_refused(tmp_path):
    m = _text_model()
    p = _pipe(m)
    with calibrating(m, info={"scheduler": "unipc"}) as cal:
        _sample(p, seed=1)
    calibration = cal.result()
    m.save_pretrained(tmp_path)
    path = calibration.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE and StepCacheCalibration.load(tmp_path) == calibration
    cfg = StepCacheConfig.from_pretrained(tmp_path, method="magcache", threshold=0.2)
    assert cfg.mag_ratios == calibration.mag_ratios and len(cfg.mag_ratios["cond"]) == 12
    assert cfg.coefficients == calibration.coefficients and cfg.threshold == 0.2
    with pytest.raises(ValueError, match="magcache needs the model's mag_ratios"):
        StepCacheConfig(method="magcache")
    with pytest.raises(ValueError, match="threshold=-1"):
        StepCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="method='tea'"):
        StepCacheConfig(method="tea")
    with pytest.raises(ValueError, match="max_skip_steps=0"):
        StepCacheConfig(max_skip_steps=0)
    with pytest.raises(FileNotFoundError, match="no step cache calibration"):
        StepCacheConfig.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a stdit step cache calibration"):
        StepCacheCalibration.load(tmp_path / "config.json")
    enable_step_cache(m)
    with pytest.raises(ValueError, match="already on"):
        enable_step_cache(m)
    with pytest.raises(ValueError, match="cache_context"), torch.no_grad():
        m(torch.ones(1, 4, 3, 8, 8), torch.tensor([300.0]), TEXT)  # no step index and no step count
    with pytest.raises(TypeError, match="runs on a StDiT"):
        enable_step_cache(tiny_wan())


def test_a_model_called_without_a_pipeline_counts_its_steps():
    m = _text_model()
    x = torch.randn(1, 4, 3, 8, 8)
    hook = enable_step_cache(m, threshold=1e9, num_inference_steps=4, max_skip_steps=None)
    with torch.no_grad():
        for _ in range(2):  # two runs of four steps: each starts over with a computed step
            for t in (900.0, 600.0, 300.0, 100.0):
                m(x, torch.tensor([t]), TEXT)
    assert (hook.computed, hook.skipped) == (4, 4)  # steps 0 and 3 of each run


def test_sample_cli_calibrates_caches_and_prints_the_time_per_part(tmp_path, capsys):
    from stdit.cli import main

    m = _text_model(text_dim=None, num_classes=3, in_channels=3, out_channels=3)
    m.save_pretrained(tmp_path / "m")
    make_scheduler("unipc", 3.0).save_pretrained(tmp_path / "m")
    base = ["sample", "--model", str(tmp_path / "m"), "--class-label", "0", "--frames", "2", "--height", "8",
            "--width", "8", "--steps", "10", "--guidance", "3", "--scale", "1", "--no-progress",
            "--out", str(tmp_path / "s.gif")]
    assert main(base + ["--cache", "magcache"]) == 2  # not calibrated yet: one error line, before sampling
    assert "run the same command once with --calibrate-cache" in capsys.readouterr().err
    assert main(base + ["--cache-threshold", "0.5"]) == 2
    assert main(base + ["--calibrate-cache"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m" / CALIBRATION_FILE).is_file() and "wrote the step cache calibration" in out
    assert "time: transformer" in out and "scheduler" in out and "total" in out
    assert main(base + ["--cache", "magcache", "--cache-threshold", "0.5"]) == 0
    assert "step cache skipped" in capsys.readouterr().out


# ---- several ranks (gloo on the CPU) ---------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sp_model():
    torch.manual_seed(0)
    return _text_model(num_attention_heads=4, attention_head_dim=8, text_dim=24)


def _parallel_results():
    """What every rank computes: guided samples with CFG parallel over the world (and over the first two ranks),
    and cached samples with the model's tokens sharded (sequence parallel over the world)."""
    kw = dict(prompt_embeds=torch.cat([TEXT, TEXT.flip(1)]), num_frames=3, height=6, width=6,
              num_inference_steps=6, guidance_scale=4.0, output_type="latent")
    p = _pipe(_sp_model())
    out = {"single": p(generator=torch.Generator().manual_seed(0), **kw).frames}
    p.enable_cfg_parallel()
    out["cfg"] = p(generator=torch.Generator().manual_seed(0), **kw).frames
    p.disable_cfg_parallel()
    if dist.get_world_size() > 2:
        pair = dist.new_group([0, 1])  # every rank creates it; only its members run CFG parallel over it
        if dist.get_rank() < 2:
            p.enable_cfg_parallel(pair)
        out["cfg pair"] = p(generator=torch.Generator().manual_seed(0), **kw).frames
        p.disable_cfg_parallel()
    else:  # 27 tokens (padded to 28) x 4 heads: sequence parallel over 2 ranks, the step cache deciding alike on both
        enable_step_cache(p.transformer, threshold=0.2, max_skip_steps=None)
        out["cached"] = p(generator=torch.Generator().manual_seed(0), **kw).frames
        out["cached counts"] = (get_step_cache(p.transformer).computed, get_step_cache(p.transformer).skipped)
        get_step_cache(p.transformer).computed = get_step_cache(p.transformer).skipped = 0
        p.transformer.enable_sequence_parallel()
        out["cached sp"] = p(generator=torch.Generator().manual_seed(0), **kw).frames
        out["cached sp counts"] = (get_step_cache(p.transformer).computed, get_step_cache(p.transformer).skipped)
    return out


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ok = False
    try:
        # numpy arrays travel by value; tensors would travel as shared memory that dies with this process
        results.put((rank, {k: v.numpy() if torch.is_tensor(v) else v for k, v in _parallel_results().items()}))
        ok = True
    finally:
        cleanup(wait_for_all=ok)  # the group's users freed first: gloo aborts a process that frees them at exit


@pytest.mark.parametrize("world", [2, 3])
def test_cfg_parallel_and_cached_sequence_parallel_match_one_process(world):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    by_rank = dict(results.get() for _ in range(world))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    ref = by_rank[0]["single"]
    for rank, out in by_rank.items():
        close(out["cfg"], ref)  # every rank holds the whole result
        if world > 2:
            close(out["cfg pair"], ref)
        else:
            assert out["cached sp counts"] == out["cached counts"] and out["cached counts"][1] > 0
            close(out["cached sp"], out["cached"])


def test_enable_cache_takes_the_step_cache_and_one_cache_at_a_time():
    """``model.enable_cache`` is the one switch, as in diffusers: a StepCacheConfig turns stdit's step cache on
    (the same skips as enable_step_cache), a diffusers config a diffusers cache; a second cache is refused either way
    and ``disable_cache`` restores the uncached run bitwise."""
    from diffusers.hooks import FirstBlockCacheConfig

    m = _text_model()
    p = _pipe(m)
    ref = _sample(p).frames
    config = StepCacheConfig(method="teacache", threshold=0.5, max_skip_steps=None)
    enable_step_cache(m, config)
    direct = _sample(p).frames
    skipped = get_step_cache(m).skipped
    disable_step_cache(m)
    assert not m.is_cache_enabled and skipped > 0

    m.enable_cache(config)
    assert m.is_cache_enabled and get_step_cache(m).config is config
    assert torch.equal(_sample(p).frames, direct) and get_step_cache(m).skipped == skipped
    with pytest.raises(ValueError, match="already"):
        m.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    m.disable_cache()
    assert get_step_cache(m) is None and not m.is_cache_enabled
    assert torch.equal(_sample(p).frames, ref)

    m.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    for turn_on in (m.enable_cache, functools.partial(enable_step_cache, m)):
        with pytest.raises(ValueError, match=r"a diffusers cache \(FirstBlockCacheConfig\) is on"):
            turn_on(config)
    m.disable_cache()
    assert torch.equal(_sample(p).frames, ref)
