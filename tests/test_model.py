import pytest
import torch
from torch import nn

from helpers import rel_err, tiny_model
from stdit import StDiT, attention_backend
from stdit.model import unpatchify


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 3)])
def test_unpatchify_inverts_the_patch_conv(patch):
    """A Conv3d whose weights copy each patch's pixels into its token; unpatchify must rebuild the input exactly."""
    c, (pt, ph, pw) = 3, patch
    n = c * pt * ph * pw
    conv = nn.Conv3d(c, n, kernel_size=patch, stride=patch, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for ci in range(c):
            for a in range(pt):
                for b in range(ph):
                    for d in range(pw):
                        # token feature order is (pt, ph, pw, c), as the final projection emits it
                        conv.weight[((a * ph + b) * pw + d) * c + ci, ci, a, b, d] = 1.0
    x = torch.randn(2, c, 2 * pt, 3 * ph, 5 * pw)
    tokens = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(unpatchify(tokens, (2, 3, 5), patch), x, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "factorized"])
@pytest.mark.parametrize("shape", [(1, 4, 1, 2, 2), (2, 4, 3, 6, 10), (1, 4, 5, 4, 8)])
def test_forward_shapes_any_grid(mode, shape):
    m = tiny_model(attention_mode=mode)
    x = torch.randn(shape)
    out = m(x, torch.rand(shape[0]) * 1000, torch.randn(shape[0], 7, 24)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_temporal_patch_and_output_channels():
    m = tiny_model(patch_size=(2, 2, 2), out_channels=6)
    out = m(torch.randn(1, 4, 4, 4, 6), 3.0, torch.randn(1, 5, 24)).sample
    assert out.shape == (1, 6, 4, 4, 6)


def test_full_attention_mixes_frames_and_factorized_separates_spatial():
    """Full 3D attention lets frame 0 see frame 2; both modes must depend on other frames (temporal attention)."""
    for mode in ("full", "factorized"):
        m = tiny_model(attention_mode=mode)
        x = torch.randn(1, 4, 3, 4, 4)
        text = torch.randn(1, 3, 24)
        y = x.clone()
        y[:, :, 2] += 1.0
        a, b = m(x, 500.0, text).sample, m(y, 500.0, text).sample
        assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4, mode


def test_text_mask_ignores_padding():
    m = tiny_model()
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([100.0, 900.0])
    text = torch.randn(2, 4, 24)
    padded = torch.cat([text, torch.randn(2, 3, 24) * 50], dim=1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :4] = True
    ref = m(x, t, text).sample
    assert rel_err(m(x, t, padded, encoder_attention_mask=mask).sample, ref) < 1e-5
    assert rel_err(m(x, t, padded).sample, ref) > 1e-3  # without the mask the padding does change the output


def test_class_labels_and_null_class():
    m = tiny_model(text_dim=None, num_classes=5)
    assert m.blocks[0].attn2 is None
    x = torch.randn(2, 4, 2, 4, 4)
    null = m(x, 10.0, class_labels=torch.tensor([5, 5])).sample
    torch.testing.assert_close(m(x, 10.0).sample, null)
    cond = m(x, 10.0, class_labels=torch.tensor([0, 3])).sample
    assert rel_err(cond, null) > 1e-4


def test_unconditional_model():
    m = tiny_model(text_dim=None)
    assert m(torch.randn(1, 4, 2, 4, 4), 10.0).sample.shape == (1, 4, 2, 4, 4)


def test_image_to_video_condition():
    m = tiny_model(condition_channels=5)
    x = torch.randn(1, 4, 3, 4, 4)
    cond = StDiT.i2v_condition(torch.randn(1, 4, 1, 4, 4), num_frames=3)
    assert cond.shape == (1, 5, 3, 4, 4) and cond[0, 4, 0].eq(1).all() and cond[0, 4, 1:].eq(0).all()
    out = m(x, 10.0, torch.randn(1, 3, 24), condition=cond).sample
    assert out.shape == x.shape
    other = StDiT.i2v_condition(torch.randn(1, 4, 1, 4, 4), num_frames=3)
    assert rel_err(m(x, 10.0, torch.randn(1, 3, 24), condition=other).sample, out) > 1e-4


@pytest.mark.parametrize("per_token", [False, True])
def test_sample_prediction_returns_the_flow_it_implies(per_token):
    """``prediction_type="sample"``: the network predicts x0 and the forward returns ``(x_t - x0) / max(t, 0.05)``,
    per sample or per token; the condition channels are not part of ``x_t``."""
    flow = tiny_model(patch_size=(1, 2, 2), condition_channels=5)
    sample = tiny_model(patch_size=(1, 2, 2), condition_channels=5, prediction_type="sample")
    sample.load_state_dict(flow.state_dict())
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 3, 24)
    cond = StDiT.i2v_condition(torch.randn(2, 4, 1, 4, 4), num_frames=2)
    t = torch.tensor([700.0, 10.0])
    if per_token:  # 2 x 2 x 2 tokens; the second sample's first frame is clean
        t = torch.tensor([[700.0] * 8, [0.0] * 4 + [300.0] * 4])
    x0 = flow(x, t, text, condition=cond).sample  # the same network read as an x0 prediction
    tt = (t / 1000).clamp_min(0.05)
    if per_token:  # each token's t over its 1 x 2 x 2 pixels
        tt = tt.view(2, 1, 2, 2, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    else:
        tt = tt.view(2, 1, 1, 1, 1)
    torch.testing.assert_close(sample(x, t, text, condition=cond).sample, (x - x0) / tt)
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_model(prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type"):
        sample.to_wan()  # diffusers' Wan predicts the flow


def test_scalar_and_batched_timestep_agree():
    m = tiny_model()
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 3, 24)
    torch.testing.assert_close(m(x, 250.0, text).sample, m(x, torch.tensor([250.0, 250.0]), text).sample)


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_gradient_checkpointing_same_grads(mode):
    m = tiny_model(attention_mode=mode).train()
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 24)

    def grads():
        m.zero_grad()
        m(x, 300.0, text).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads()
    m.enable_gradient_checkpointing()
    ck = grads()
    assert ref.keys() == ck.keys() and len(ref) > 10
    for n in ref:
        torch.testing.assert_close(ck[n], ref[n], rtol=1e-5, atol=1e-7)


_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation")


def test_compile_blocks_keeps_the_checkpoint_policy():
    """``compile_blocks`` with selective checkpointing (inductor, as ``train.compile`` runs it): the gradients are
    the eager model's, and keeping matmuls saves every block's matrix products from the recompute. A compiled block
    inside an eager checkpoint hides them from the policy, and both policies recompute the same products."""
    from torch.profiler import ProfilerActivity, profile

    x, t, text = torch.randn(1, 4, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 24)

    def backward_matmuls(keep, compiled_first):
        torch._dynamo.reset()
        m = tiny_model().train()
        if compiled_first:
            m.compile_blocks()
        m.enable_gradient_checkpointing(keep_attention=keep == "attention", keep_matmuls=keep == "matmuls")
        if not compiled_first:
            m.compile_blocks()
            m.compile_blocks()  # again: the checkpointed call is wrapped once
            assert not hasattr(m._gradient_checkpointing_func._torchdynamo_orig_callable, "_torchdynamo_orig_callable")
        m(x, t, text).sample.square().mean().backward()  # compiles forward and backward
        m.zero_grad()
        out = m(x, t, text).sample
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out.square().mean().backward()
        return sum(e.name in _MATMULS for e in prof.events()), out.detach(), [p.grad for p in m.parameters()]

    ref = tiny_model().train()
    ref_out = ref(x, t, text).sample
    ref_out.square().mean().backward()
    n_attention, _, _ = backward_matmuls("attention", True)
    n_matmuls, out, grads = backward_matmuls("matmuls", False)
    # Each block's projections: q, k, v, o of self- and cross-attention, and the FFN's two.
    assert n_attention - n_matmuls == 10 * len(ref.blocks), (n_attention, n_matmuls)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_initialize_weights_starts_at_zero_output():
    m = tiny_model()
    m.initialize_weights()
    out = m(torch.randn(1, 4, 2, 4, 4), 10.0, torch.randn(1, 3, 24)).sample
    assert out.abs().max() == 0


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_backends_agree(mode):
    m = tiny_model(attention_mode=mode)
    x, t, text = torch.randn(2, 4, 3, 4, 6), torch.tensor([5.0, 600.0]), torch.randn(2, 7, 24)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    with attention_backend("eager"):
        ref = m(x, t, text, encoder_attention_mask=mask).sample
    m.set_attention_backend("sdpa")
    assert rel_err(m(x, t, text, encoder_attention_mask=mask).sample, ref) < 1e-5


def test_bf16_forward_close_to_fp32():
    m = tiny_model()
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 24)
    ref = m(x, 100.0, text).sample
    out = m.to(torch.bfloat16)(x.bfloat16(), 100.0, text.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2


def test_blocks_compile_without_graph_breaks():
    """Each block compiles as one graph (``fullgraph=True``: the attention dispatch, QK norm and RoPE trace) and
    gives the eager output, in sampling and in a training step."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 3, 8, 8, generator=g)
    text = torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        ref = model(lat, t, text, return_dict=False)[0]
    for blk in model.blocks:
        blk.compile(fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = model(lat, t, text, return_dict=False)[0]
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    model.train()
    model(lat, t, text, return_dict=False)[0].square().mean().backward()
    assert all(p.grad is not None for p in model.blocks.parameters() if p.requires_grad)
