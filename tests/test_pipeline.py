"""StDiTPipeline: schedulers, guidance, text/class/no conditioning, image-to-video, VAE, seeds, outputs, export."""

import numpy as np
import pytest
import torch
from PIL import Image

from stdit.export import export_video, read_video, to_uint8_frames, video_grid
from stdit.model import StDiT
from stdit.pipeline import StDiTPipeline, make_scheduler, vae_scale_factors

BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
            freq_dim=32, ffn_dim=64, num_layers=2)


def model(**kw):
    torch.manual_seed(0)
    m = StDiT(**{**BASE, "text_dim": None, **kw})
    # random (not zero-initialized) outputs so every input visibly changes the result
    with torch.no_grad():
        m.proj_out.weight.normal_(std=0.2)
    return m.eval()


def pipe(m, scheduler="euler", vae=None):
    p = StDiTPipeline(m, make_scheduler(scheduler, 2.0), vae)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_schedulers_seeds_and_output_types(scheduler):
    p = pipe(model(num_classes=3), scheduler)
    kw = dict(class_labels=[0, 2], num_frames=4, height=8, width=8, num_inference_steps=4)
    a = p(generator=gen(0), **kw).frames
    b = p(generator=gen(0), **kw).frames
    c = p(generator=gen(1), **kw).frames
    assert a.shape == (2, 4, 3, 8, 8) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    arr = p(generator=gen(0), output_type="np", **kw).frames
    assert arr.shape == (2, 4, 8, 8, 3)
    np.testing.assert_allclose(arr, a.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    pil = p(generator=gen(0), output_type="pil", **kw).frames
    assert len(pil) == 2 and len(pil[0]) == 4 and isinstance(pil[0][0], Image.Image)
    lat = p(generator=gen(0), output_type="latent", **kw).frames
    assert lat.shape == (2, 3, 4, 8, 8)


def test_euler_steps_follow_the_velocity():
    """With a model that predicts a constant velocity v, Euler from noise x1 ends at exactly x1 - v."""
    m = model()
    m.forward = lambda x, t, return_dict=False, **kw: (torch.full_like(x, 0.25),)
    p = pipe(m, "euler")
    noise = torch.randn(1, 3, 2, 4, 4, generator=gen(5))
    out = p(latents=noise.clone(), num_frames=2, height=4, width=4, num_inference_steps=7, output_type="latent")
    torch.testing.assert_close(out.frames, noise - 0.25, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_and_class_labels():
    p = pipe(model(num_classes=3))
    kw = dict(num_frames=2, height=8, width=8, num_inference_steps=3, output_type="latent")
    base = p(class_labels=[1], guidance_scale=1.0, generator=gen(), **kw).frames
    other = p(class_labels=[2], guidance_scale=1.0, generator=gen(), **kw).frames
    guided = p(class_labels=[1], guidance_scale=4.0, generator=gen(), **kw).frames
    uncond = p(class_labels=[3], guidance_scale=1.0, generator=gen(), **kw).frames  # 3 = the null class
    assert not torch.allclose(base, other) and not torch.allclose(base, guided)
    # guidance with the null class as the condition is the unconditional result
    null_guided = p(class_labels=[3], guidance_scale=4.0, generator=gen(), **kw).frames
    torch.testing.assert_close(null_guided, uncond, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no classes"):
        pipe(model())(class_labels=[0], **kw)


def test_text_conditioning_with_masks_and_negative_prompts():
    p = pipe(model(text_dim=12))
    emb = torch.randn(2, 5, 12, generator=gen(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kw = dict(num_frames=2, height=8, width=8, num_inference_steps=3, output_type="latent")
    a = p(prompt_embeds=emb, prompt_attention_mask=mask, generator=gen(), **kw).frames
    padded = emb.clone()
    padded[0, 3:] = 100.0  # masked tokens must not matter
    b = p(prompt_embeds=padded, prompt_attention_mask=mask, generator=gen(), **kw).frames
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1], p(prompt_embeds=emb.flip(1), prompt_attention_mask=mask, generator=gen(),
                                      **kw).frames[1])
    g1 = p(prompt_embeds=emb, guidance_scale=3.0, generator=gen(), **kw).frames
    g2 = p(prompt_embeds=emb, negative_prompt_embeds=torch.randn_like(emb), guidance_scale=3.0, generator=gen(),
           **kw).frames
    assert not torch.allclose(g1, g2)
    with pytest.raises(ValueError, match="text-conditioned: pass prompt_embeds"):
        p(**kw)


def test_unconditional_batch():
    out = pipe(model())(batch_size=3, num_frames=2, height=8, width=8, num_inference_steps=2, generator=gen())
    assert out.frames.shape == (3, 2, 3, 8, 8)


def test_image_to_video_conditions_on_the_first_frame():
    p = pipe(model(condition_channels=4))
    kw = dict(num_frames=3, height=8, width=8, num_inference_steps=3, output_type="latent")
    img_a = torch.rand(1, 3, 8, 8, generator=gen(1))
    img_b = torch.rand(1, 3, 8, 8, generator=gen(2))
    a, b = p(image=img_a, generator=gen(), **kw).frames, p(image=img_b, generator=gen(), **kw).frames
    assert a.shape == (1, 3, 3, 8, 8) and not torch.allclose(a, b)
    pil = Image.fromarray((img_a[0].permute(1, 2, 0) * 255).round().byte().numpy())
    torch.testing.assert_close(p(image=pil, generator=gen(), **kw).frames, a, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="image-to-video model: pass image="):
        p(num_frames=3, height=8, width=8, num_inference_steps=1)
    with pytest.raises(ValueError, match="not an image-to-video model"):
        pipe(model())(image=img_a, num_frames=3, height=8, width=8, num_inference_steps=1)


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def test_latent_sampling_with_a_wan_vae_and_i2v():
    vae = _tiny_vae()
    assert vae_scale_factors(vae) == (2, 2)
    p = pipe(model(in_channels=4, out_channels=4, text_dim=8), vae=vae)
    emb = torch.randn(1, 3, 8)
    out = p(prompt_embeds=emb, num_frames=5, height=16, width=16, num_inference_steps=2, generator=gen())
    assert out.frames.shape == (1, 5, 3, 16, 16)
    lat = p(prompt_embeds=emb, num_frames=5, height=16, width=16, num_inference_steps=2, generator=gen(),
            output_type="latent").frames
    assert lat.shape == (1, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="num_frames - 1 must be divisible by 2"):
        p(prompt_embeds=emb, num_frames=4, height=16, width=16)
    with pytest.raises(ValueError, match="height=10 must be a multiple of 4"):
        p(prompt_embeds=emb, num_frames=5, height=10, width=16)
    i2v = pipe(model(in_channels=4, out_channels=4, condition_channels=5), vae=vae)
    frames = i2v(image=torch.zeros(1, 3, 16, 16), num_frames=5, height=16, width=16, num_inference_steps=2).frames
    assert frames.shape == (1, 5, 3, 16, 16)


def test_progress_bar_can_be_switched(capsys):
    p = StDiTPipeline(model(), make_scheduler("euler"))
    p(num_frames=2, height=8, width=8, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
    p.set_progress_bar_config(disable=True)
    p(num_frames=2, height=8, width=8, num_inference_steps=3)
    assert "3/3" not in capsys.readouterr().err


def test_pipeline_save_and_load(tmp_path):
    p = pipe(model(num_classes=2))
    p.save_pretrained(tmp_path)
    q = StDiTPipeline.from_pretrained(tmp_path)
    q.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1], num_frames=2, height=8, width=8, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(p(generator=gen(), **kw).frames, q(generator=gen(), **kw).frames)


def test_export_mp4_and_gif_round_trip(tmp_path):
    video = torch.zeros(3, 6, 10, 14)
    for f in range(6):  # a red box moving right on black, in [-1, 1] after the shift below
        video[0, f, 2:6, f:f + 6] = 1.0
    video = video * 2 - 1
    gif = read_video(export_video(video, tmp_path / "a.gif", fps=5))
    assert gif.shape == (6, 10, 14, 3)
    np.testing.assert_array_equal(gif, to_uint8_frames(video))  # GIF keeps a palette this simple exactly
    mp4_path = export_video(video, tmp_path / "a.mp4", fps=5, scale=2)
    mp4 = read_video(mp4_path)
    assert mp4.shape == (6, 20, 28, 3)
    assert abs(mp4[0, 4:12, 0:12, 0].mean() - 255) < 20 and mp4[:, 14:, :, 0].mean() < 20
    assert abs(mp4[5, 4:12, 10:22, 0].mean() - 255) < 20 and mp4[5, 4:12, :8, 0].mean() < 20
    import av

    with av.open(str(mp4_path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
    odd = read_video(export_video(torch.rand(5, 3, 7, 9), tmp_path / "odd.mp4"))
    assert odd.shape == (5, 8, 10, 3)  # padded to even sizes for yuv420p
    with pytest.raises(ValueError, match="unsupported video format '.avi'"):
        export_video(video, tmp_path / "a.avi")
    grid = video_grid([video, video, video], cols=2)
    assert grid.shape == (6, 2 * 12 + 2, 2 * 16 + 2, 3)


def test_sample_cli(tmp_path):
    from stdit.cli import main

    m = model(num_classes=4)
    m.save_pretrained(tmp_path / "m")
    make_scheduler("euler", 1.5).save_pretrained(tmp_path / "m")
    code = main(["sample", "--model", str(tmp_path / "m"), "--class-label", "0", "3", "--frames", "2",
                 "--height", "8", "--width", "8", "--steps", "2", "--out", str(tmp_path / "s.gif"), "--scale", "1",
                 "--no-progress"])
    assert code == 0
    assert read_video(tmp_path / "s.gif").shape == (2, 2 + 10, 2 + 2 * 10, 3)  # two videos side by side
    assert main(["sample", "--model", str(tmp_path)]) == 2
