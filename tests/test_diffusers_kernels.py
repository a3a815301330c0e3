"""stdit's kernels inside diffusers' own WanTransformer3DModel (``stdit.integrations.apply_to_diffusers``): the same
output as diffusers' WanAttnProcessor for every backend, with LoRA, hooks, offloading, I2V, fused projections and
masks, and undo (fp32, CPU; the Triton kernels under the interpreter)."""

from __future__ import annotations

import collections
import copy
import types

import pytest
import torch
from _kernel_env import HAS_CUDA, load_kernels, max_err

kernels = load_kernels()
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor,  # noqa: E402
                                                           WanRotaryPosEmbed)
from peft import LoraConfig  # noqa: E402

import stdit.integrations.diffusers as integ  # noqa: E402
from stdit.integrations import StDiTWanAttnProcessor, apply_to_diffusers, remove_from_diffusers  # noqa: E402
from stdit.rope import RotaryEmbedding3D  # noqa: E402

ATOL = 1e-5
TEXT_DIM = 32


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
               text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    wan = WanTransformer3DModel(**{**cfg, **overrides}).eval()
    with torch.no_grad():  # every weight off its init, at a scale where a skipped module shows in the output
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return wan


def inputs(b=1, t=3, h=8, w=8, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, t, h, w, generator=g), torch.tensor([700.0] * b),
            torch.randn(b, text_len, TEXT_DIM, generator=g))


def out(model, x, t, text, **kw):
    with torch.no_grad():
        return model(x, t, text, return_dict=False, **kw)[0]


def processors(model):
    return [m.processor for m in model.modules() if isinstance(m, WanAttention)]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 5, 4, 6)])
def test_same_output_as_diffusers(backend, shape, monkeypatch):
    b, t, h, w = shape
    wan = tiny_wan()
    x, ts, text = inputs(b, t, h, w)
    ref = out(wan, x, ts, text)
    conversions = collections.Counter()
    convert = integ.rope_tables
    monkeypatch.setattr(integ, "rope_tables", lambda *a: conversions.update(["rope"]) or convert(*a))
    assert apply_to_diffusers(wan, backend=backend) is wan
    assert all(type(p) is StDiTWanAttnProcessor and p.backend == backend for p in processors(wan))
    got = out(wan, x, ts, text)
    print(f"{backend} {shape}: max abs diff {max_err(got, ref):.2e}")
    assert max_err(got, ref) <= ATOL
    assert conversions["rope"] == 1  # one conversion per forward, shared by both self-attentions


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; on CUDA the kernels run compiled")
def test_same_output_with_triton_kernels_under_the_interpreter(monkeypatch):
    wan = tiny_wan()
    x, ts, text = inputs(1, 3, 4, 4, text_len=5)
    ref = out(wan, x, ts, text)
    calls = collections.Counter()
    flash, fused = kernels.attention.FlashAttention, kernels.qk_norm_rope

    class CountedFlash:
        @staticmethod
        def apply(*args):
            calls["attention"] += 1
            return flash.apply(*args)

    monkeypatch.setattr(kernels.attention, "FlashAttention", CountedFlash)
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *a: calls.update(["qk_norm_rope"]) or fused(*a))
    apply_to_diffusers(wan, backend="triton")
    got = out(wan, x, ts, text)
    print(f"triton (interpreter): max abs diff {max_err(got, ref):.2e}")
    assert max_err(got, ref) <= ATOL
    # two layers: two self- and two cross-attentions on our flash kernel, the fused norm+RoPE on both self-attentions
    assert calls == {"attention": 4, "qk_norm_rope": 2}


def test_lora_adapters_run_under_our_processor():
    wan = tiny_wan()
    x, ts, text = inputs()
    base = out(wan, x, ts, text)
    wan.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                               init_lora_weights=False))
    ref, ref_half = out(wan, x, ts, text), out(wan, x, ts, text, attention_kwargs={"scale": 0.5})
    assert max_err(ref, base) > 1e-2 and max_err(ref_half, ref) > 1e-3
    apply_to_diffusers(wan, backend="sdpa")
    assert max_err(out(wan, x, ts, text), ref) <= ATOL
    assert max_err(out(wan, x, ts, text, attention_kwargs={"scale": 0.5}), ref_half) <= ATOL


def test_lora_gradients_match_diffusers():
    wan = tiny_wan()
    wan.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    x, ts, text = inputs()

    def grads():
        wan.zero_grad()
        wan(x, ts, text, return_dict=False)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in wan.named_parameters() if p.requires_grad}

    ref = grads()
    apply_to_diffusers(wan, backend="eager")
    got = grads()
    assert ref.keys() == got.keys() and all("lora" in n for n in ref)
    assert max(max_err(got[n], ref[n]) for n in ref) <= ATOL


def test_hooked_norm_runs_as_module():
    """A pre-hook on a QK norm (where offloading hooks live) fires, so the fast path that reads the weight is not
    taken there; the hook's effect on the output is diffusers' too."""
    wan = tiny_wan()
    x, ts, text = inputs()
    fired = collections.Counter()

    def double(module, args):
        fired["norm_q"] += 1
        return (args[0] * 2,)

    wan.blocks[0].attn1.norm_q.register_forward_pre_hook(double)
    ref = out(wan, x, ts, text)
    assert fired["norm_q"] == 1
    apply_to_diffusers(wan, backend="eager")
    got = out(wan, x, ts, text)
    assert fired["norm_q"] == 2 and max_err(got, ref) <= ATOL


def test_fast_path_rule():
    x = torch.randn(1, 3, 8)
    plain = torch.nn.RMSNorm(8, eps=1e-6)
    assert integ._norm_weight_readable(plain, x)
    hooked = [torch.nn.RMSNorm(8) for _ in range(5)]
    hooked[0].register_forward_hook(lambda *a: None)
    hooked[1].register_forward_pre_hook(lambda *a: None)
    hooked[2]._hf_hook = object()  # accelerate's offloading / device_map hook
    hooked[3]._diffusers_hook = object()  # diffusers' group offloading / layerwise casting
    hooked[4].weight.data = hooked[4].weight.data.double()  # a dtype nn.RMSNorm would promote
    assert not any(integ._norm_weight_readable(n, x) for n in hooked)
    assert not integ._norm_weight_readable(type("MyNorm", (torch.nn.RMSNorm,), {})(8), x)
    assert not integ._norm_weight_readable(torch.nn.RMSNorm(4), x)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_same_output(offload_type):
    wan = tiny_wan()
    x, ts, text = inputs()
    ref = out(wan, x, ts, text)
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    wan.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                             offload_type=offload_type, **kw)
    hooked = wan.blocks[0].attn1.norm_q if offload_type == "leaf_level" else wan.blocks[0]
    assert getattr(hooked, "_diffusers_hook", None) is not None
    apply_to_diffusers(wan, backend="sdpa")
    assert max_err(out(wan, x, ts, text), ref) <= ATOL


def test_i2v_image_branch():
    inner = 2 * 32
    wan = tiny_wan(image_dim=16, added_kv_proj_dim=inner)
    x, ts, text = inputs(text_len=integ.WAN_TEXT_LEN)
    image = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(3))
    ref = out(wan, x, ts, text, encoder_hidden_states_image=image)
    apply_to_diffusers(wan, backend="eager")
    got = out(wan, x, ts, text, encoder_hidden_states_image=image)
    print(f"i2v eager: max abs diff {max_err(got, ref):.2e}")
    assert max_err(got, ref) <= ATOL
    with pytest.raises(ValueError, match="512 text tokens"):
        out(wan, x, ts, text[:, :100], encoder_hidden_states_image=image)


@pytest.mark.parametrize("i2v", [False, True])
def test_fused_projections(i2v):
    wan = tiny_wan(**(dict(image_dim=16, added_kv_proj_dim=64) if i2v else {}))
    x, ts, text = inputs(text_len=integ.WAN_TEXT_LEN if i2v else 7)
    kw = {"encoder_hidden_states_image": torch.randn(1, 4, 16)} if i2v else {}
    wan.fuse_qkv_projections()
    assert all(m.fused_projections for m in wan.modules() if isinstance(m, WanAttention))
    ref = out(wan, x, ts, text, **kw)
    apply_to_diffusers(wan, backend="eager")
    assert max_err(out(wan, x, ts, text, **kw), ref) <= ATOL


@pytest.mark.parametrize("kind", ["bool", "additive", "bool4d"])
def test_key_padding_attention_mask(kind):
    wan = tiny_wan()
    attn = wan.blocks[0].attn2
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 6, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    mask = {"bool": keep, "additive": torch.zeros(2, 9).masked_fill(~keep, float("-inf")),
            "bool4d": keep[:, None, None, :]}[kind]
    with torch.no_grad():
        ref = attn(x, context, mask)
        attn.set_processor(StDiTWanAttnProcessor("eager"))
        got = attn(x, context, mask)
    assert max_err(got, ref) <= ATOL
    with pytest.raises(ValueError, match="key padding masks only"):
        attn(x, context, torch.ones(2, 1, 6, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="float mask, read as additive"):
        attn(x, context, torch.full((2, 9), 0.5))


def test_rope_tables_are_stdits():
    """diffusers' Wan tables, converted, are stdit's own tables for the same grid (split, theta, pair layout)."""
    d, grid = 32, (3, 4, 5)
    wan_rope = WanRotaryPosEmbed(d, (1, 2, 2), 32)
    fc, fs = wan_rope(torch.zeros(1, 4, grid[0], 2 * grid[1], 2 * grid[2]))
    cos, sin = integ.rope_tables((fc, fs), 60, d)
    ref_cos, ref_sin = RotaryEmbedding3D(d)(grid)
    assert cos.dtype == torch.float32 and cos.shape == (60, d // 2) and cos.is_contiguous()
    assert max_err(cos, ref_cos) <= 1e-6 and max_err(sin, ref_sin) <= 1e-6
    with pytest.raises(ValueError, match=r"each \[1, 60, 1, 32\]"):
        integ.rope_tables((fc[..., :16], fs[..., :16]), 60, d)
    with pytest.raises(ValueError, match="WanRotaryPosEmbed"):
        integ.rope_tables(torch.zeros(60, 16), 60, d)


def test_remove_restores_the_original_processors():
    wan = tiny_wan()
    wan.blocks[1].attn2.set_processor(custom := WanAttnProcessor())
    custom.marker = True
    before = processors(wan)
    apply_to_diffusers(wan, backend="eager")
    apply_to_diffusers(wan, backend="sdpa")  # again: a new backend, the same processors to restore
    assert all(type(p) is StDiTWanAttnProcessor and p.backend == "sdpa" for p in processors(wan))
    assert remove_from_diffusers(wan) is wan
    assert all(a is b for a, b in zip(processors(wan), before, strict=True))
    assert wan.blocks[1].attn2.processor.marker
    remove_from_diffusers(wan)  # nothing applied: nothing changes
    assert all(a is b for a, b in zip(processors(wan), before, strict=True))


def test_custom_processors_are_left_alone():
    class Mine(WanAttnProcessor):
        pass

    wan = tiny_wan()
    wan.blocks[0].attn1.set_processor(mine := Mine())
    apply_to_diffusers(wan)
    assert wan.blocks[0].attn1.processor is mine
    assert sum(type(p) is StDiTWanAttnProcessor and p.backend is None for p in processors(wan)) == 3


def test_pipeline_like_objects():
    a, b = tiny_wan(0), tiny_wan(1)
    pipe = types.SimpleNamespace(transformer=a, transformer_2=b, vae=torch.nn.Linear(2, 2))
    assert apply_to_diffusers(pipe, "sdpa") is pipe
    assert all(type(p) is StDiTWanAttnProcessor for m in (a, b) for p in processors(m))
    remove_from_diffusers(pipe)
    assert all(type(p) is WanAttnProcessor for m in (a, b) for p in processors(m))
    wan21 = types.SimpleNamespace(transformer=copy.deepcopy(a), transformer_2=None)
    apply_to_diffusers(wan21)
    assert all(type(p) is StDiTWanAttnProcessor for p in processors(wan21.transformer))


def test_bad_arguments_raise_one_clear_error():
    from stdit import StDiT

    with pytest.raises(ValueError, match="takes a diffusers WanTransformer3DModel or a pipeline"):
        apply_to_diffusers(object())
    with pytest.raises(ValueError, match="Linear without diffusers WanAttention"):
        apply_to_diffusers(torch.nn.Linear(2, 2))
    ours = StDiT.from_wan(tiny_wan())
    with pytest.raises(ValueError, match="SimpleNamespace.transformer is a StDiT without"):
        apply_to_diffusers(types.SimpleNamespace(transformer=ours))
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        apply_to_diffusers(tiny_wan(), backend="flash")
    with pytest.raises(ValueError, match="remove_from_diffusers takes"):
        remove_from_diffusers("pipe")


def test_context_parallel_is_refused():
    wan = tiny_wan()
    apply_to_diffusers(wan, backend="eager")
    wan.blocks[0].attn1.processor._parallel_config = object()  # what enable_parallelism sets on each processor
    x, ts, text = inputs()
    with pytest.raises(NotImplementedError, match="context parallelism"):
        out(wan, x, ts, text)


def test_layer_skip_knows_our_processor():
    from diffusers.hooks._helpers import AttentionProcessorRegistry

    meta = AttentionProcessorRegistry.get(StDiTWanAttnProcessor)
    h = torch.randn(1, 3, 4)
    assert meta.skip_processor_output_fn(None, None, h) is h


def _block_hooks(model):
    return [b for b in model.blocks if getattr(b, "_diffusers_hook", None) is not None
            and b._diffusers_hook.get_hook(integ.BLOCK_HOOK) is not None]


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_block_hook_runs_the_fused_adaln_path(cross_attn_norm, monkeypatch):
    wan = tiny_wan(cross_attn_norm=cross_attn_norm)
    x, ts, text = inputs(2, 3, 4, 6)
    ref = out(wan, x, ts, text)
    calls = collections.Counter()
    for name in ("norm_modulate", "add_norm_modulate", "feed_forward"):
        fn = getattr(integ, name)
        monkeypatch.setattr(integ, name, lambda *a, _fn=fn, _n=name, **k: calls.update([_n]) or _fn(*a, **k))
    apply_to_diffusers(wan, backend="eager")
    assert len(_block_hooks(wan)) == len(wan.blocks)
    got = out(wan, x, ts, text)
    assert max_err(got, ref) <= ATOL
    n = len(wan.blocks)
    assert calls == {"norm_modulate": n, "add_norm_modulate": 3 * n, "feed_forward": n}
    remove_from_diffusers(wan)
    assert not _block_hooks(wan)
    assert all(not b._diffusers_hook.hooks for b in wan.blocks)
    assert max_err(out(wan, x, ts, text), ref) == 0


def test_block_hook_falls_back_for_hooked_norms_and_per_token_timesteps(monkeypatch):
    wan = tiny_wan()
    x, ts, text = inputs(1, 3, 4, 4)
    fused = collections.Counter()
    fn = integ.norm_modulate
    monkeypatch.setattr(integ, "norm_modulate", lambda *a, **k: fused.update(["n"]) or fn(*a, **k))
    # Wan 2.2 TI2V passes one timestep per latent token (temb [B, S, 6, dim]): diffusers' own block math
    per_token = torch.linspace(100.0, 900.0, 3 * 2 * 2)[None]
    ref_tok = out(wan, x, per_token, text)
    seen = []
    wan.blocks[1].norm3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ref = out(wan, x, ts, text)
    seen.clear()
    apply_to_diffusers(wan, backend="eager")
    assert max_err(out(wan, x, ts, text), ref) <= ATOL
    assert len(seen) == 1 and fused["n"] == len(wan.blocks) - 1  # the hooked block ran its norm3 as a module
    fused.clear()
    assert max_err(out(wan, x, per_token, text), ref_tok) <= ATOL
    assert fused["n"] == 0


def test_caches_wrap_the_block_hook_or_keep_diffusers_forward():
    from diffusers import FirstBlockCacheConfig

    x, ts, text = inputs(1, 3, 4, 4)

    def cached_run(wan):
        outs = []
        with wan.cache_context("cond"):
            for t in (900.0, 890.0, 880.0):
                outs.append(out(wan, x, torch.tensor([t]), text))
        return torch.stack(outs)

    ref_wan = tiny_wan()
    ref_wan.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    ref = cached_run(ref_wan)

    after = tiny_wan()  # stdit first, the cache after: the cache's hooks wrap ours
    apply_to_diffusers(after, backend="eager")
    after.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert len(_block_hooks(after)) == len(after.blocks)
    calls = collections.Counter()
    after.blocks[1].attn1.to_q.register_forward_hook(lambda *a: calls.update(["q"]))
    assert max_err(cached_run(after), ref) <= ATOL
    assert calls["q"] < 3  # the cache skipped the second block on some step

    before = tiny_wan()  # the cache first: blocks it hooks keep diffusers' forward under it
    before.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    apply_to_diffusers(before, backend="eager")
    assert not _block_hooks(before)
    assert all(type(p) is StDiTWanAttnProcessor for p in processors(before))
    assert max_err(cached_run(before), ref) <= ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("i2v", [False, True])
def test_on_gpu_within_the_flash_rule_of_diffusers(i2v):
    """CUDA, bf16: the fused QK-norm + RoPE, attention, adaLN and GELU-epilogue kernels inside diffusers' Wan are no
    further from the fp32 result than diffusers' own bf16 Wan (x2, plus a small atol); fp32 matches it."""
    from helpers import rel_err

    kw = dict(image_dim=24, added_kv_proj_dim=64) if i2v else {}
    wan = tiny_wan(**kw).cuda()
    x, ts, text = (a.cuda() for a in inputs(2, 5, 16, 12, text_len=integ.WAN_TEXT_LEN if i2v else 7))
    extra = {"encoder_hidden_states_image": torch.randn(2, 9, 24, device="cuda")} if i2v else {}
    exact = out(wan, x, ts, text, **extra)
    ours32 = apply_to_diffusers(copy.deepcopy(wan))
    assert rel_err(out(ours32, x, ts, text, **extra), exact) <= 1e-5
    wan16 = copy.deepcopy(wan).bfloat16()
    bf = dict(encoder_hidden_states_image=extra["encoder_hidden_states_image"].bfloat16()) if i2v else {}
    ref = out(wan16, x.bfloat16(), ts, text.bfloat16(), **bf).float()
    got = out(apply_to_diffusers(wan16), x.bfloat16(), ts, text.bfloat16(), **bf).float()
    assert rel_err(got, exact) <= 2 * rel_err(ref, exact) + 1e-3
