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


IMAGE_DIM = 20


def tiny_wan_i2v(seed: int = 0):
    """A Wan 2.1 I2V transformer: 16 latent + 20 condition channels in, CLIP image tokens in cross-attention."""
    return tiny_wan(seed, in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=32)


def tiny_i2v_pipeline(transformer):
    """A ``WanImageToVideoPipeline`` around ``transformer``, with a tiny random CLIP image encoder."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    t2v = tiny_pipeline(transformer)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=IMAGE_DIM)).eval()
    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, image_processor=CLIPImageProcessor(crop_size=32, size=32),
                                   image_encoder=encoder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_i2v(pipe, steps: int = 3, seed: int = 0, **kwargs) -> torch.Tensor:
    from PIL import Image

    rng = torch.Generator().manual_seed(7)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy())
    # diffusers' Wan I2V attention takes all but the last 512 context tokens as the image's
    return run(pipe, steps, seed, image=image, max_sequence_length=512, **kwargs)
