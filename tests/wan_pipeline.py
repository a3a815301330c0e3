"""Tiny random diffusers Wan components, built offline: a Wan transformer, a Wan VAE, a UMT5 text encoder and a
word-level tokenizer, so WanPipeline runs end to end in a test without a download."""

from __future__ import annotations

import torch

TEXT_DIM = 32
WORDS = ["a", "red", "blue", "square", "circle", "moves", "left", "right", "slowly", "fast", "on", "black"]


def tiny_wan(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
               text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)
    wan = WanTransformer3DModel(**{**cfg, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight matter at a visible scale
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return wan


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pipeline(transformer, scheduler: str = "unipc"):
    """A ``WanPipeline`` around ``transformer`` with tiny random VAE and text encoder (fixed seeds)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps: int = 3, seed: int = 0, **kwargs) -> torch.Tensor:
    """A 5-frame 16x16 video with CFG: ``[B, F, C, H, W]`` frames (``output_type="pt"``) or the final latents."""
    call = dict(prompt="a red square moves left", negative_prompt="blue circle", height=16, width=16, num_frames=5,
                num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(seed))
    return pipe(**{**call, **kwargs}).frames
