"""FP8 inference in the model: 8-bit attention in the chosen blocks and timesteps (StDiT.set_fp8_attention, the
``fp8`` backend) and FP8 linears through torchao (StDiT.quantize_fp8, on a GPU); the errors for what they refuse."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from _kernel_env import HAS_CUDA, load_kernels
from helpers import rel_err, tiny_model

load_kernels()
from stdit.attention_layer import StDiTAttention  # noqa: E402
from stdit.fp8 import FP8Attention, fp8_linear_names  # noqa: E402

attn_mod = importlib.import_module("stdit.attention")  # the module (the package exports a function of that name)


def inputs(model, seed=0, t=500.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 6, 6, generator=g)
    text = torch.randn(1, 7, model.config.text_dim, generator=g)
    return x, torch.tensor([t]), text


@pytest.fixture
def fp8_calls(monkeypatch):
    """The keys' shapes of every 8-bit attention call: the fp8 backend's, and the self-attentions that run it fused
    with QK norm + RoPE (StDiTAttention.fp8_self_attention)."""
    calls = []
    real = attn_mod.REGISTRY["fp8"]

    def counted(q, k, v, **kw):
        calls.append(tuple(k.shape))
        return real.run(q, k, v, **kw)

    fused = StDiTAttention.fp8_self_attention

    def counted_fused(self, q, k, v, rotary_emb=None):
        calls.append(tuple(k.shape))
        return fused(self, q, k, v, rotary_emb)

    monkeypatch.setitem(attn_mod.REGISTRY, "fp8", attn_mod.Backend(counted, real.why_not))
    monkeypatch.setattr(StDiTAttention, "fp8_self_attention", counted_fused)
    return calls


def test_fp8_attention_runs_where_configured(fp8_calls):
    model = tiny_model(attention_head_dim=32)
    x, t, text = inputs(model)
    with torch.no_grad():
        ref = model(x, t, text).sample
        model.set_fp8_attention(FP8Attention(layers=(1,)))
        out = model(x, t, text).sample
        assert len(fp8_calls) == 1 and fp8_calls[0][1] == 3 * 3 * 3  # block 1's self-attention only
        assert 0 < rel_err(out, ref) < 0.05
        fp8_calls.clear()
        model.set_fp8_attention(FP8Attention(cross_attention=True))
        model(x, t, text)
        assert sorted(c[1] for c in fp8_calls) == [7, 7, 27, 27]  # both blocks, self and text attention
        fp8_calls.clear()
        model.set_fp8_attention(FP8Attention(min_timestep=600, max_timestep=1000))
        assert torch.equal(model(x, t, text).sample, ref) and not fp8_calls  # t=500 is outside: bitwise the model
        model(x, torch.tensor([700.0]), text)
        assert len(fp8_calls) == 2
        fp8_calls.clear()
        model.set_fp8_attention(None)
        assert torch.equal(model(x, t, text).sample, ref) and not fp8_calls


def test_fp8_backend_for_every_attention(fp8_calls):
    model = tiny_model(attention_head_dim=32)
    x, t, text = inputs(model)
    model.set_attention_backend("fp8")
    with torch.no_grad():
        model(x, t, text)
    assert len(fp8_calls) == 4


def test_fp8_attention_is_inference_only():
    model = tiny_model(attention_head_dim=32).train()
    model.set_fp8_attention(FP8Attention())
    with pytest.raises(RuntimeError, match="inference only"):
        model(*inputs(model)).sample.sum().backward()


def test_fp8_attention_refuses_bad_settings():
    model = tiny_model()
    with pytest.raises(ValueError, match="not block indices"):
        model.set_fp8_attention(FP8Attention(layers=(2,)))
    with pytest.raises(TypeError, match="FP8Attention"):
        model.set_fp8_attention("int8")
    with pytest.raises(ValueError, match="min_timestep <= max_timestep"):
        FP8Attention(min_timestep=800, max_timestep=200)


def test_fp8_linears_are_the_blocks_linears():
    model = tiny_model()
    names = fp8_linear_names(model)
    assert "blocks.0.attn1.to_q" in names and "blocks.1.ffn.net.2" in names and "blocks.1.attn2.to_v" in names
    assert not any(n.startswith(("condition_embedder", "proj_out", "patch_embedding")) for n in names)
    assert len(names) == 2 * (4 + 4 + 2)  # per block: self q/k/v/o, cross q/k/v/o, the two feed-forward linears


def test_quantize_fp8_refusals(monkeypatch):
    model = tiny_model()
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            model.quantize_fp8()
    from peft import LoraConfig

    lora = tiny_model()
    lora.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="merge them first"):
        lora.quantize_fp8()
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    from stdit.fp8 import _torchao

    with pytest.raises(ImportError, match="stdit\\[fp8\\]"):
        _torchao()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_quantize_fp8_and_fp8_attention(tmp_path):
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9")
    model = tiny_model(attention_head_dim=64, num_attention_heads=4, ffn_dim=512, text_dim=64).to(torch.bfloat16)
    x, t, text = (z.cuda() for z in inputs(model))
    x, text = x.bfloat16(), text.bfloat16()
    with torch.no_grad():
        ref = model.cuda()(x, t, text).sample.float()
        names = model.cpu().quantize_fp8(device="cuda")
        assert all(p.is_cuda for p in model.parameters())  # every block moved, the rest too
        w = model.get_submodule(names[0]).weight
        assert type(w) not in (torch.nn.Parameter, torch.Tensor)  # torchao's float8 weight
        out = model(x, t, text).sample.float()
        assert rel_err(out, ref) < 0.05
        model.set_fp8_attention(FP8Attention())
        both = model(x, t, text).sample.float()
        assert rel_err(both, ref) < 0.08
    with pytest.raises(ValueError, match="quantized to FP8"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="already FP8"):
        model.quantize_fp8()


def test_sample_cli_fp8(tmp_path, capsys):
    from stdit.cli import main
    from stdit.pipeline import make_scheduler

    tiny_model(text_dim=None, num_classes=2, in_channels=3, out_channels=3, attention_head_dim=32).save_pretrained(
        tmp_path / "m")
    make_scheduler("euler", 1.0).save_pretrained(tmp_path / "m")
    base = ["sample", "--model", str(tmp_path / "m"), "--class-label", "1", "--frames", "2", "--height", "16",
            "--width", "16", "--steps", "2", "--scale", "1", "--no-progress", "--out", str(tmp_path / "v.gif")]
    if HAS_CUDA:
        assert main(base + ["--fp8", "attention"]) == 0 and (tmp_path / "v.gif").is_file()
    else:
        assert main(base + ["--fp8", "attention"]) == 2
        assert "CUDA GPU" in capsys.readouterr().err


def test_training_with_fp8_linears(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    from safetensors.torch import load_file
    from test_train import tiny

    import stdit.fp8 as fp8
    from stdit.train import train
    from stdit.train_utils import read_log

    converted = []
    real = fp8.convert_fp8_training

    def spy(model, recipe):
        converted.append(real(model, recipe))
        converted.append({type(m).__name__ for m in model.modules()})
        return converted[0]

    monkeypatch.setattr(fp8, "convert_fp8_training", spy)
    train(tiny(tmp_path / "fp8", ["train.fp8_linears=rowwise"]))
    train(tiny(tmp_path / "bf16"))
    names, classes = converted
    assert names and "Float8Linear" in classes
    losses = [[r["loss"] for r in read_log(tmp_path / run / "log.jsonl")] for run in ("fp8", "bf16")]
    assert all(torch.isfinite(torch.tensor(losses[0]))) and losses[0] != losses[1]
    assert abs(losses[0][0] - losses[1][0]) < 0.1 * losses[1][0]  # same model, same data: the first loss agrees
    exported = [load_file(str(tmp_path / run / "model" / "diffusion_pytorch_model.safetensors"))
                for run in ("fp8", "bf16")]
    assert set(exported[0]) == set(exported[1])  # the export is an ordinary checkpoint


def test_fp8_training_refusals():
    from test_train import tiny

    with pytest.raises(ValueError, match="fp8_linears"):
        tiny("/tmp/unused", ["train.fp8_linears=fp4"])
    from stdit.fp8 import convert_fp8_training

    with pytest.raises(ValueError, match="recipe"):
        convert_fp8_training(tiny_model(), "fp4")
