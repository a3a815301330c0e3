"""Wan 2.2 and VACE in StDiT, against diffusers (fp32, CPU): TI2V-5B's per-token timesteps on 48-channel latents,
the A14B two-expert pipelines, Wan 2.2 image-to-video through WanImageToVideoPipeline, and VACE's control blocks
(WanVACETransformer3DModel, WanVACEPipeline). Each variant: a tiny random diffusers model with every weight
perturbed, converted with StDiT.from_wan, the same outputs for several input shapes, the reverse export loading
into diffusers strictly, and the pipeline end to end."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

from helpers import rel_err
from stdit import StDiT
from stdit.convert import to_wan
from stdit.parallel.dist import cleanup
from wan_pipeline import TEXT_DIM, run, tiny_pipeline, tiny_wan

ATOL = 1e-5


def perturbed(model, seed=0, scale=0.05):
    """Every weight moved off its initial value (zero-initialized ones too), so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def ti2v_wan(seed=0, heads=2, head_dim=12, layers=2, patch=(1, 2, 2)):
    """A tiny Wan 2.2 TI2V-5B: 48 latent channels in and out (per-token timesteps need nothing in the config)."""
    torch.manual_seed(seed)
    return perturbed(WanTransformer3DModel(patch_size=patch, num_attention_heads=heads, attention_head_dim=head_dim,
                                           in_channels=48, out_channels=48, text_dim=TEXT_DIM, freq_dim=32,
                                           ffn_dim=32, num_layers=layers, rope_max_seq_len=32), seed)


def vace_wan(seed=0, layers=3, vace_layers=(0, 2), vace_in_channels=24, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=TEXT_DIM,
               freq_dim=32, ffn_dim=32, num_layers=layers, rope_max_seq_len=32, vace_layers=list(vace_layers),
               vace_in_channels=vace_in_channels)
    return perturbed(WanVACETransformer3DModel(**{**cfg, **kw}), seed)


def tokens(thw, patch=(1, 2, 2)):
    return (thw[0] // patch[0]) * (thw[1] // patch[1]) * (thw[2] // patch[2])


def forward(model, *args, **kw):
    with torch.no_grad():
        return model(*args, return_dict=False, **kw)[0]


# ---- TI2V-5B: per-token timesteps ------------------------------------------------------------------------
TI2V_CASES = [  # (batch, (T, H, W), patch, timestep kind)
    (2, (3, 4, 6), (1, 2, 2), "random"),      # any per-token timesteps
    (1, (5, 8, 8), (1, 2, 2), "first-frame"),  # WanImageToVideoPipeline's: 0 on the first frame, t elsewhere
    (2, (2, 6, 4), (1, 2, 2), "broadcast"),    # [1, S] for a batch of 2
    (2, (4, 4, 4), (2, 2, 2), "random"),       # a temporal patch too
    (1, (1, 2, 2), (1, 2, 2), "random"),       # one token
]


def per_token_timesteps(kind, b, thw, patch, g):
    s = tokens(thw, patch)
    if kind == "first-frame":
        per_frame = s // (thw[0] // patch[0])
        return torch.cat([torch.zeros(b, per_frame), torch.full((b, s - per_frame), 731.0)], dim=1)
    if kind == "broadcast":
        return torch.rand(1, s, generator=g) * 1000
    return torch.rand(b, s, generator=g) * 1000


@pytest.mark.parametrize("case", TI2V_CASES, ids=lambda c: f"b{c[0]}-{'x'.join(map(str, c[1]))}-p{c[2][0]}-{c[3]}")
def test_ti2v_per_token_timesteps_match_diffusers(case):
    b, thw, patch, kind = case
    wan = ti2v_wan(patch=patch)
    ours = StDiT.from_wan(wan).eval()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(b, 48, *thw, generator=g), torch.randn(b, 7, TEXT_DIM, generator=g)
    t = per_token_timesteps(kind, b, thw, patch, g)
    ref = forward(wan, x, t, text)
    errs = {}
    for backend in (None, "eager", "sdpa"):
        ours.set_attention_backend(backend)
        errs[backend or "default"] = rel_err(forward(ours, x, t, text), ref)
    print(f"TI2V per-token parity {case}: rel err {errs}")
    assert max(errs.values()) <= 1e-5
    # the per-sample path of the same model is diffusers' too
    t1 = torch.tensor([13.0, 871.0][:b])
    assert rel_err(forward(ours, x, t1, text), forward(wan, x, t1, text)) <= 1e-5


def test_constant_per_token_timesteps_equal_the_per_sample_path():
    ours = StDiT.from_wan(ti2v_wan()).eval()
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g)
    t = torch.tensor([250.0, 640.0])
    per_token = t[:, None].expand(2, tokens((3, 4, 4)))
    assert rel_err(forward(ours, x, per_token, text), forward(ours, x, t, text)) <= 1e-6


def test_per_token_gradients_match_diffusers():
    """Training TI2V: the gradients of every weight through the per-token modulation are diffusers'."""
    wan = ti2v_wan()
    ours = StDiT.from_wan(wan).train()
    wan.train()
    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(1, 48, 3, 4, 4, generator=g), torch.randn(1, 5, TEXT_DIM, generator=g)
    t = per_token_timesteps("first-frame", 1, (3, 4, 4), (1, 2, 2), g)
    w = torch.randn(1, 48, 3, 4, 4, generator=g)
    for m in (wan, ours):
        (m(x, t, text).sample * w).sum().backward()
    grads = dict(wan.named_parameters())
    worst = max(rel_err(p.grad, grads[n].grad) for n, p in ours.named_parameters())
    print(f"TI2V per-token gradient parity: max rel err {worst:.2e}")
    assert worst <= 1e-5


def test_per_token_timesteps_fused_qkv_and_checkpointing():
    wan = ti2v_wan()
    ours = StDiT.from_wan(wan).eval()
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(2, 48, 2, 4, 4, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g)
    t = per_token_timesteps("random", 2, (2, 4, 4), (1, 2, 2), g)
    ref = forward(wan, x, t, text)
    ours.fuse_qkv_projections()
    assert rel_err(forward(ours, x, t, text), ref) <= 1e-5
    ours.unfuse_qkv_projections()
    ours.enable_gradient_checkpointing()
    ours.train()
    out = ours(x, t, text).sample
    out.square().mean().backward()
    assert rel_err(out.detach(), ref) <= 1e-5


def test_per_token_timesteps_compile_without_graph_breaks_or_recompiles():
    ours = StDiT.from_wan(ti2v_wan(layers=1)).eval()
    g = torch.Generator().manual_seed(10)
    x, text = torch.randn(1, 48, 2, 4, 4, generator=g), torch.randn(1, 5, TEXT_DIM, generator=g)
    t = per_token_timesteps("first-frame", 1, (2, 4, 4), (1, 2, 2), g)
    refs = [forward(ours, x, t * s, text) for s in (1.0, 0.5)]
    torch._dynamo.reset()
    ours.compile_repeated_blocks(fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s, ref in zip((1.0, 0.5), refs):
            assert rel_err(forward(ours, x, t * s, text), ref) <= 1e-5


def test_per_token_timestep_errors_say_what_is_valid():
    ours = StDiT.from_wan(ti2v_wan(layers=1)).eval()
    x, text = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 5, TEXT_DIM)
    with pytest.raises(ValueError, match=r"\(2, 7\)\. Per token \(Wan 2.2 TI2V\) it is \[B, S\]=\[2, 8\]"):
        ours(x, torch.zeros(2, 7), text)
    with pytest.raises(ValueError, match=r"got shape \(3, 8\)"):
        ours(x, torch.zeros(3, 8), text)
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 1\)"):
        ours(x, torch.zeros(2, 8, 1), text)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\]"):
        ours(x, torch.full((2, 8), 1001.0), text)


def test_per_token_modulation_runs_the_exact_torch_ops():
    """ops.norm_modulate / add_norm_modulate with per-token [B, S, D] vectors: the fused kernels read one vector
    per sample, so these take the torch path, with the per-token math of diffusers' Wan block."""
    from stdit import ops

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    shift, scale, gate = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    ln = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.equal(ops.norm_modulate(x, shift, scale), ln * (1 + scale) + shift)
    h, n = ops.add_norm_modulate(x, y, gate, shift, scale)
    assert torch.equal(h, x + y * gate)
    assert torch.equal(n, torch.nn.functional.layer_norm(h, (8,), eps=1e-6) * (1 + scale) + shift)


def test_ti2v_reverse_export_and_checkpoint_round_trip(tmp_path):
    ours = StDiT.from_wan(ti2v_wan()).eval()
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(1, 48, 2, 4, 4, generator=g), torch.randn(1, 5, TEXT_DIM, generator=g)
    t = per_token_timesteps("random", 1, (2, 4, 4), (1, 2, 2), g)
    ref = forward(ours, x, t, text)
    to_wan(ours).save_pretrained(tmp_path / "wan")
    loaded, info = WanTransformer3DModel.from_pretrained(tmp_path / "wan", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert rel_err(forward(loaded.eval(), x, t, text), ref) <= 1e-5
    ours.save_pretrained(tmp_path / "ours")
    assert rel_err(forward(StDiT.from_pretrained(tmp_path / "ours"), x, t, text), ref) <= 1e-5


# ---- VACE ------------------------------------------------------------------------------------------------
VACE_CASES = [  # (layers, vace_layers, batch, (T, H, W), control frames)
    (3, (0, 2), 2, (3, 4, 6), 3),
    (3, (0, 2), 1, (3, 4, 6), 2),       # a shorter control: the missing frames' tokens get zero control
    (4, (0, 1, 3), 1, (2, 6, 4), 2),
    (4, (3, 0), 2, (1, 2, 2), 1),       # unsorted: hint j goes to the j-th smallest layer, as in diffusers
]


@pytest.mark.parametrize("case", VACE_CASES, ids=lambda c: f"L{c[0]}-v{''.join(map(str, c[1]))}-b{c[2]}-c{c[4]}")
def test_vace_matches_diffusers(case):
    layers, vace_layers, b, thw, control_frames = case
    wan = vace_wan(layers=layers, vace_layers=vace_layers)
    ours = StDiT.from_wan(wan).eval()
    assert [type(m).__name__ for m in ours.vace_blocks] == ["StDiTVACEBlock"] * len(vace_layers)
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(b, 16, *thw, generator=g), torch.randn(b, 7, TEXT_DIM, generator=g)
    control = torch.randn(b, 24, control_frames, *thw[1:], generator=g)
    t = torch.tensor([13.0, 871.0][:b])
    errs = {}
    for scale in (None, torch.linspace(0.5, 2.0, len(vace_layers))):
        kw = dict(control_hidden_states=control, control_hidden_states_scale=scale)
        ref = forward(wan, x, t, text, **kw)
        for backend in (None, "eager"):
            ours.set_attention_backend(backend)
            errs[(scale is not None, backend)] = rel_err(forward(ours, x, t, text, **kw), ref)
    print(f"VACE parity {case}: rel err {max(errs.values()):.2e}")
    assert max(errs.values()) <= 1e-5
    ours.fuse_qkv_projections()
    kw = dict(control_hidden_states=control)
    assert rel_err(forward(ours, x, t, text, **kw), forward(wan, x, t, text, **kw)) <= 1e-5


def test_vace_gradients_match_diffusers():
    wan = vace_wan().train()
    ours = StDiT.from_wan(wan).train()
    ours.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(8)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, TEXT_DIM, generator=g)
    control, w = torch.randn(1, 24, 2, 4, 4, generator=g), torch.randn(1, 16, 2, 4, 4, generator=g)
    for m in (wan, ours):
        (m(x, torch.tensor([500.0]), text, control_hidden_states=control).sample * w).sum().backward()
    grads = dict(wan.named_parameters())
    assert grads.keys() == dict(ours.named_parameters()).keys()
    worst = max(rel_err(p.grad, grads[n].grad) for n, p in ours.named_parameters())
    print(f"VACE gradient parity: max rel err {worst:.2e}")
    assert worst <= 1e-5


def test_vace_reverse_export_and_directories(tmp_path):
    wan = vace_wan()
    ours = StDiT.from_wan(wan).eval()
    g = torch.Generator().manual_seed(9)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, TEXT_DIM, generator=g)
    kw = dict(control_hidden_states=torch.randn(1, 24, 2, 4, 4, generator=g))
    ref = forward(wan, x, torch.tensor([300.0]), text, **kw)
    back = to_wan(ours)
    assert type(back) is WanVACETransformer3DModel
    back.save_pretrained(tmp_path / "wan")
    loaded, info = WanVACETransformer3DModel.from_pretrained(tmp_path / "wan", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert rel_err(forward(loaded.eval(), x, torch.tensor([300.0]), text, **kw), ref) <= 1e-5
    # a diffusers VACE directory converts by path; a saved StDiT VACE loads back
    assert rel_err(forward(StDiT.from_wan(str(tmp_path / "wan")).eval(), x, torch.tensor([300.0]), text, **kw),
                   ref) <= 1e-5
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vace_layers"] == [0, 2]
    assert rel_err(forward(StDiT.from_pretrained(tmp_path / "ours"), x, torch.tensor([300.0]), text, **kw),
                   ref) <= 1e-5
    # a StDiT saved before VACE existed (no vace_* fields in its config.json) still loads strictly
    plain = StDiT.from_wan(tiny_wan(num_layers=1))
    plain.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for k in ("vace_layers", "vace_in_channels"):
        config.pop(k)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert StDiT.from_pretrained(tmp_path / "old").vace_blocks is None


def test_vace_input_and_config_errors():
    ours = StDiT.from_wan(vace_wan()).eval()
    x, text, t = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, TEXT_DIM), torch.tensor([10.0])
    with pytest.raises(ValueError, match="Wan VACE model: pass control_hidden_states"):
        ours(x, t, text)
    with pytest.raises(ValueError, match=r"control_hidden_states must be \[B=1, vace_in_channels=24"):
        ours(x, t, text, control_hidden_states=torch.randn(1, 24, 3, 4, 4))  # more frames than the video
    with pytest.raises(ValueError, match=r"control_hidden_states must be"):
        ours(x, t, text, control_hidden_states=torch.randn(1, 24, 2, 4, 6))
    with pytest.raises(ValueError, match=r"one scale per VACE layer, shape \[2\]"):
        ours(x, t, text, control_hidden_states=torch.randn(1, 24, 2, 4, 4), control_hidden_states_scale=[1.0])
    plain = StDiT.from_wan(tiny_wan(num_layers=1)).eval()
    with pytest.raises(ValueError, match="no VACE control blocks"):
        plain(x, t, text, control_hidden_states=torch.randn(1, 24, 2, 4, 4))
    base = dict(num_attention_heads=2, attention_head_dim=12, in_channels=16, text_dim=TEXT_DIM, ffn_dim=16,
                num_layers=3)
    for bad, message in (({"vace_layers": [0, 2]}, "come together"),
                         ({"vace_layers": [1, 2], "vace_in_channels": 8}, "including 0"),
                         ({"vace_layers": [0, 3], "vace_in_channels": 8}, r"\[0, num_layers=3\)"),
                         ({"vace_layers": [0, 0], "vace_in_channels": 8}, "distinct"),
                         ({"vace_layers": [0], "vace_in_channels": 0}, "vace_in_channels")):
        with pytest.raises(ValueError, match=message):
            StDiT(**base, **bad)


# ---- sequence parallelism: per-token modulation and VACE hints are sharded with their tokens --------------
def _sp_worker(rank, world, port, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    errors, ok = {}, False
    try:
        g = torch.Generator().manual_seed(0)
        text = torch.randn(1, 5, TEXT_DIM, generator=g)
        # 9 tokens (3 frames of 1 x 3): padded to 10 at sp=2; the control has 2 of the 3 frames
        ti2v_x = torch.randn(1, 48, 3, 2, 6, generator=g)
        ti2v_t = per_token_timesteps("first-frame", 1, (3, 2, 6), (1, 2, 2), g)
        vace_x, control = torch.randn(1, 16, 3, 2, 6, generator=g), torch.randn(1, 24, 2, 2, 6, generator=g)
        cases = {"ti2v": (ti2v_wan, (ti2v_x, ti2v_t, text), {}),
                 "vace": (vace_wan, (vace_x, torch.tensor([400.0]), text), {"control_hidden_states": control})}
        for name, (make, args, kw) in cases.items():
            outs = []
            for sp in (False, True):
                m = StDiT.from_wan(make()).train()
                if sp:
                    m.enable_sequence_parallel()
                out = m(*args, **kw).sample
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                grads = {n: p.grad for n, p in m.named_parameters()}
                if sp:
                    for grad in grads.values():  # what DDP/FSDP do over the data-parallel dims
                        dist.all_reduce(grad)
                        grad /= world
                outs.append((out.detach(), grads))
            (ref, ref_g), (got, got_g) = outs
            errors[name] = (rel_err(got, ref), max(rel_err(got_g[n], ref_g[n]) for n in ref_g))
        ok = True
    finally:
        cleanup(wait_for_all=ok)  # the group's users freed first: gloo aborts a process that frees them at exit
    if rank == 0:
        results.put(errors)


def test_sequence_parallel_per_token_timesteps_and_vace():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_sp_worker, args=(2, port, results), nprocs=2, join=True)
    for name, (err, gerr) in results.get().items():
        print(f"sp=2 {name}: output rel err {err:.1e}, worst grad rel err {gerr:.1e}")
        assert err <= 1e-5 and gerr <= 1e-5, name


# ---- original single-file layout: TI2V and VACE ----------------------------------------------------------
def _original_vace_layout(state):
    from test_single_file import original_layout

    out = original_layout(state)
    renamed = {}
    for k, v in out.items():
        if k.startswith("vace_blocks."):  # Wan's names for the control blocks' projections
            k = k.replace(".proj_in.", ".before_proj.").replace(".proj_out.", ".after_proj.")
        renamed[k] = v
    return renamed


@pytest.mark.parametrize("variant", ["ti2v", "vace-1.3b-like", "vace-14b-like"])
def test_single_file_original_layout(variant, tmp_path):
    from safetensors.torch import save_file

    if variant == "ti2v":
        wan, kw = ti2v_wan(head_dim=128, heads=1), {}
        x = torch.randn(1, 48, 2, 4, 4)
        t = per_token_timesteps("first-frame", 1, (2, 4, 4), (1, 2, 2), torch.Generator().manual_seed(0))
    else:  # Wan's VACE releases: hints at every 2nd of 30 blocks (1.3B), every 5th of 40 (14B); scaled down here
        layers, vace_layers = (4, (0, 2)) if variant == "vace-1.3b-like" else (5, (0,))
        wan = vace_wan(layers=layers, vace_layers=vace_layers, num_attention_heads=1, attention_head_dim=128)
        x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([600.0])
        kw = {"control_hidden_states": torch.randn(1, 24, 2, 4, 4)}
    save_file(_original_vace_layout(wan.state_dict()), str(tmp_path / "model.safetensors"))
    ours = StDiT.from_single_file(tmp_path / "model.safetensors")
    assert ours.config.vace_layers == wan.config.get("vace_layers")
    text = torch.randn(1, 5, TEXT_DIM)
    assert rel_err(forward(ours, x, t, text, **kw), forward(wan, x, t, text, **kw)) <= 1e-5


def test_single_file_vace_layers_not_in_the_weights(tmp_path):
    from safetensors.torch import save_file

    from stdit.hub import CheckpointError

    wan = vace_wan(layers=3, vace_layers=(0, 1), num_attention_heads=1, attention_head_dim=128)
    save_file(_original_vace_layout(wan.state_dict()), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"pass vace_layers=\[\.\.\.\]"):
        StDiT.from_single_file(tmp_path / "model.safetensors")
    ours = StDiT.from_single_file(tmp_path / "model.safetensors", vace_layers=[0, 1])
    x, text, t = torch.randn(1, 16, 1, 2, 2), torch.randn(1, 5, TEXT_DIM), torch.tensor([5.0])
    kw = {"control_hidden_states": torch.randn(1, 24, 1, 2, 2)}
    assert rel_err(forward(ours, x, t, text, **kw), forward(wan, x, t, text, **kw)) <= 1e-5



def test_vace_parameter_counts_equal_diffusers():
    """Wan2.1-VACE-14B's diffusers config (scripts/convert_wan_to_diffusers.py), built on the meta device."""
    cfg = dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
               freq_dim=256, ffn_dim=13824, num_layers=40, vace_layers=[0, 5, 10, 15, 20, 25, 30, 35],
               vace_in_channels=96)
    with torch.device("meta"):
        wan = WanVACETransformer3DModel(**cfg)
        ours = StDiT(**cfg)
    n_ours, n_wan = (sum(p.numel() for p in m.parameters()) for m in (ours, wan))
    print(f"Wan2.1-VACE-14B: {n_ours:,} parameters (diffusers {n_wan:,})")
    assert n_ours == n_wan


# ---- pipelines -------------------------------------------------------------------------------------------
def tiny_wan22_vae():
    """Wan 2.2's VAE (48 latent channels, 16x spatial, patchified residual blocks), tiny and random."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                            temperal_downsample=[False, True, True]).eval()


def _pipeline(cls, transformer, transformer_2=None, vae=None, **config):
    base = tiny_pipeline(transformer)
    kw = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae or base.vae,
              scheduler=base.scheduler, transformer=transformer, transformer_2=transformer_2, **config)
    if cls.__name__ == "WanImageToVideoPipeline":
        kw.update(image_encoder=None, image_processor=None)
    pipe = cls(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(size):
    from PIL import Image

    rng = torch.Generator().manual_seed(7)
    return Image.fromarray((torch.rand(size, size, 3, generator=rng) * 255).to(torch.uint8).numpy())


def _record_calls(models, timestep_dims):
    """Count each model's calls and note the dims of the timesteps the pipeline passes."""
    counts = [0] * len(models)

    def hook(i, module, args, kwargs):
        counts[i] += 1
        timestep_dims.add(kwargs["timestep"].ndim)

    for i, m in enumerate(models):
        m.register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True)
    return counts


def _run_pair(make, call, timestep_dims=1):
    """``make()`` the diffusers transformers (one, or two experts); ``call(models)`` runs a pipeline on them. The
    same run with diffusers' transformers and with their StDiT conversions; each expert must have run, with
    timesteps of ``timestep_dims`` dims ([B], or [B, S] per token)."""
    wans = make()
    results = []
    for models in (wans, tuple(StDiT.from_wan(w).eval() for w in wans)):
        dims = set()
        counts = _record_calls(models, dims)
        results.append(call(models))
        assert min(counts) > 0, f"an expert never ran: {counts}"
        assert dims == {timestep_dims}
    return results


def test_wan_pipeline_ti2v_expand_timesteps():
    """WanPipeline(expand_timesteps=True) on the 48-channel latents: per-token timesteps [B, S] at every step."""
    from diffusers import WanPipeline

    vae = tiny_wan22_vae()

    def call(models):
        pipe = _pipeline(WanPipeline, models[0], vae=vae, expand_timesteps=True)
        return run(pipe, height=64, width=64, num_frames=9, output_type="latent"), run(pipe, height=64, width=64,
                                                                                       num_frames=9)

    (ref_latents, ref_video), (latents, video) = _run_pair(lambda: (ti2v_wan(layers=2),), call, timestep_dims=2)
    assert ref_latents.shape[1] == 48 and ref_latents.abs().max() > 0.1
    print(f"WanPipeline TI2V: latents max abs diff {(latents - ref_latents).abs().max():.2e}")
    assert (latents - ref_latents).abs().max() <= ATOL
    assert (video - ref_video).abs().max() <= ATOL


def test_wan_pipeline_a14b_two_experts():
    """WanPipeline(transformer, transformer_2, boundary_ratio): the high-noise expert before the boundary, the
    low-noise one after, two StDiTs as two diffusers Wans."""
    from diffusers import WanPipeline

    def call(models):
        pipe = _pipeline(WanPipeline, *models, boundary_ratio=0.9)
        return run(pipe, steps=4, output_type="latent", guidance_scale_2=2.0)

    ref, got = _run_pair(lambda: (tiny_wan(0), tiny_wan(1)), call)
    print(f"WanPipeline A14B: latents max abs diff {(got - ref).abs().max():.2e}")
    assert ref.abs().max() > 0.1 and (got - ref).abs().max() <= ATOL


def test_image_to_video_pipeline_wan22_a14b():
    """WanImageToVideoPipeline for Wan 2.2 I2V-A14B: no CLIP image encoder, 16 + 4 mask + 16 condition channels,
    two experts."""
    from diffusers import WanImageToVideoPipeline

    def call(models):
        pipe = _pipeline(WanImageToVideoPipeline, *models, boundary_ratio=0.9)
        return run(pipe, steps=4, image=_image(16), output_type="latent")

    ref, got = _run_pair(lambda: (tiny_wan(0, in_channels=36), tiny_wan(1, in_channels=36)), call)
    print(f"WanImageToVideoPipeline I2V-A14B: latents max abs diff {(got - ref).abs().max():.2e}")
    assert ref.abs().max() > 0.1 and (got - ref).abs().max() <= ATOL


def test_image_to_video_pipeline_ti2v_first_frame_condition():
    """WanImageToVideoPipeline(expand_timesteps=True) for TI2V-5B: the first latent frame is the image's, its
    tokens at timestep 0, the rest at t."""
    from diffusers import WanImageToVideoPipeline

    vae = tiny_wan22_vae()

    def call(models):
        pipe = _pipeline(WanImageToVideoPipeline, models[0], vae=vae, expand_timesteps=True)
        return run(pipe, image=_image(64), height=64, width=64, num_frames=9, output_type="latent")

    ref, got = _run_pair(lambda: (ti2v_wan(layers=2),), call, timestep_dims=2)
    print(f"WanImageToVideoPipeline TI2V: latents max abs diff {(got - ref).abs().max():.2e}")
    assert ref.abs().max() > 0.1 and (got - ref).abs().max() <= ATOL


@pytest.mark.parametrize("reference", [False, True], ids=["video-mask", "reference-image"])
def test_wan_vace_pipeline(reference):
    from diffusers import WanVACEPipeline
    from PIL import Image

    frames = [_image(16)] * 5
    masks = [Image.new("L", (16, 16), 255 if i % 2 else 0) for i in range(5)]

    def call(models):
        base = tiny_pipeline(models[0])
        pipe = WanVACEPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                               scheduler=base.scheduler, transformer=models[0])
        pipe.set_progress_bar_config(disable=True)
        extra = {"reference_images": _image(16)} if reference else {}
        return run(pipe, video=frames, mask=masks, conditioning_scale=0.7, output_type="latent", **extra)

    ref, got = _run_pair(lambda: (vace_wan(vace_in_channels=96),), call)
    print(f"WanVACEPipeline ({'reference image' if reference else 'video + mask'}): latents max abs diff "
          f"{(got - ref).abs().max():.2e}")
    assert ref.abs().max() > 0.1 and (got - ref).abs().max() <= ATOL


# ---- GPU: our kernels on Wan 2.2 and VACE against eager in bf16 (the flash-attention rule) -----------------
def _gpu_rule(wan, make_inputs):
    """StDiT in bf16 on its default (fastest) backends against diffusers' Wan in bf16, both measured against the
    fp32 model: no further from fp32 than diffusers' own bf16 math (2x, + a small atol)."""
    ours = StDiT.from_wan(wan).cuda().eval()
    wan = wan.cuda().eval()
    args32, kw32 = make_inputs("cuda")
    exact = forward(wan, *args32, **kw32).float()

    def low(v):
        return v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 2 else v

    args16 = [low(a) for a in args32]
    kw16 = {k: low(v) for k, v in kw32.items()}
    ref16 = forward(copy.deepcopy(wan).bfloat16(), *args16, **kw16).float()
    ours16 = ours.bfloat16()
    got = forward(ours16, *args16, **kw16).float()
    ours16.set_attention_backend("eager")
    eager = forward(ours16, *args16, **kw16).float()
    bound = 2 * rel_err(ref16, exact) + 1e-3
    print(f"bf16 rel err vs fp32: stdit {rel_err(got, exact):.2e}, eager {rel_err(eager, exact):.2e}, "
          f"diffusers {rel_err(ref16, exact):.2e}")
    assert rel_err(got, exact) <= bound and rel_err(eager, exact) <= bound


@pytest.mark.gpu
def test_ti2v_per_token_bf16_on_gpu_follows_the_flash_attention_rule():
    wan = ti2v_wan(heads=4, head_dim=64, layers=2)

    def make(device):
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(2, 48, 5, 32, 48, generator=g), torch.randn(2, 12, TEXT_DIM, generator=g)
        t = per_token_timesteps("first-frame", 2, (5, 32, 48), (1, 2, 2), g)
        return [x.to(device), t.to(device), text.to(device)], {}

    _gpu_rule(wan, make)


@pytest.mark.gpu
def test_vace_bf16_on_gpu_follows_the_flash_attention_rule():
    wan = vace_wan(layers=4, vace_layers=(0, 2), num_attention_heads=4, attention_head_dim=64)

    def make(device):
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(2, 16, 5, 32, 48, generator=g), torch.randn(2, 12, TEXT_DIM, generator=g)
        control = torch.randn(2, 24, 5, 32, 48, generator=g)
        return [x.to(device), torch.tensor([300.0, 900.0], device=device), text.to(device)], \
            {"control_hidden_states": control.to(device)}

    _gpu_rule(wan, make)


@pytest.mark.gpu
def test_per_token_modulation_on_gpu_takes_the_torch_path_exactly():
    """On CUDA, per-sample vectors run the fused adaLN kernels; per-token ones must run the torch math (bitwise)."""
    from stdit import ops

    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 300, 192, generator=g).cuda().bfloat16() for _ in range(2))
    shift, scale, gate = (torch.randn(2, 300, 192, generator=g).cuda() for _ in range(3))
    assert not ops._fused_enabled(x, shift, scale)
    assert torch.equal(ops.norm_modulate(x, shift, scale), ops.norm_modulate_torch(x, shift, scale))
    h, n = ops.add_norm_modulate(x, y, gate, shift, scale)
    h_ref, n_ref = ops.add_norm_modulate_torch(x, y, gate, shift, scale)
    assert torch.equal(h, h_ref) and torch.equal(n, n_ref)
