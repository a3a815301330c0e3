"""Wan 2.1 image-to-video training data: `stdit encode --image-encoder/--image-condition` computes the condition
input and the CLIP features as diffusers' WanImageToVideoPipeline does at sampling time, and the trainer feeds them."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from stdit.data.encode import encode_dataset, image_condition, load_image_encoder
from stdit.data.latents import LatentDataset
from stdit.data.synthetic import MovingObjects
from stdit.data.video_folder import VideoFolderDataset
from stdit.export import export_video

transformers = pytest.importorskip("transformers")

CLIP_DIM, CLIP_TOKENS = 12, 5  # a 32 x 32 image in 16 x 16 patches: 4 patch tokens + the class token


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[2.0, 1.0, 0.5, 1.5]).eval()


def _tiny_clip(path):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=24, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=32, patch_size=16)
    transformers.CLIPVisionModel(cfg).eval().save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(path)
    return path


def _videos(root, n=3, frames=9, size=16):
    root.mkdir()
    ds = MovingObjects(num_frames=frames, height=size, width=size, seed=5)
    for i in range(n):
        export_video(ds[i]["video"], root / f"clip{i}.mp4", fps=8)
        (root / f"clip{i}.txt").write_text(f"caption {i}\n")
    return root


def _wan_condition(video, vae, last):
    """The condition WanImageToVideoPipeline.prepare_latents builds, called on a stand-in for the pipeline."""
    from diffusers import WanImageToVideoPipeline

    pipe = SimpleNamespace(vae=vae, vae_scale_factor_temporal=2, vae_scale_factor_spatial=2,
                           config=SimpleNamespace(expand_timesteps=False))
    _, h, w = video.shape[1:]
    _, cond = WanImageToVideoPipeline.prepare_latents(
        pipe, video[:, 0][None], 1, 4, h, w, video.shape[1], torch.float32, torch.device("cpu"),
        torch.Generator().manual_seed(0), last_image=video[:, -1][None] if last else None)
    return cond[0]


@pytest.mark.parametrize("kind", ["first", "first-last"])
def test_image_condition_is_the_pipelines(kind):
    vae = _tiny_vae()
    video = torch.rand(3, 9, 16, 16) * 2 - 1
    ours = image_condition(video, vae, kind)
    want = _wan_condition(video, vae, last=kind == "first-last")
    assert ours.shape == want.shape == (2 + 4, 5, 8, 8)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    mask = ours[:2, :, 0, 0]  # [frames a latent frame covers, latent frames]: the first latent frame is frame 0 alone
    assert mask[:, 0].tolist() == [1, 1] and mask[:, 1:-1].sum() == 0
    assert mask[:, -1].tolist() == ([0, 1] if kind == "first-last" else [0, 0])  # frames 7 and 8: 8 is known
    with pytest.raises(ValueError, match="temporal compression"):
        image_condition(video[:, :8], vae, kind)


def test_image_encoder_is_the_pipelines(tmp_path):
    from PIL import Image

    clip = _tiny_clip(tmp_path / "clip")
    frames = torch.rand(2, 3, 20, 28) * 2 - 1
    ours = load_image_encoder(clip, torch.device("cpu"))(frames)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip)
    model = transformers.CLIPVisionModel.from_pretrained(clip).eval()
    pil = [Image.fromarray(((f + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()) for f in frames]
    with torch.no_grad():  # as WanImageToVideoPipeline.encode_image
        want = model(**processor(images=pil, return_tensors="pt"), output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2 * CLIP_TOKENS, CLIP_DIM)
    torch.testing.assert_close(ours, want.flatten(0, 1), rtol=1e-5, atol=1e-5)


def _encode(tmp_path, kind):
    videos = _videos(tmp_path / "videos")
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):
        save_file({"prompt_embeds": torch.randn(3, 6)}, str(feats / f"clip{i}.safetensors"))
    ds = VideoFolderDataset(videos, num_frames=9, height=16, width=16)
    vae = _tiny_vae()
    encoder = load_image_encoder(_tiny_clip(tmp_path / "clip"), torch.device("cpu"))
    encode_dataset(ds, tmp_path / "lat", vae=vae, text_features_dir=feats, shard_size=2, progress=False,
                   image_encoder=encoder, image_condition_kind=kind)
    return ds, vae, encoder


def test_encoded_i2v_items(tmp_path):
    ds, vae, encoder = _encode(tmp_path, "first-last")
    lat = LatentDataset(tmp_path / "lat")
    item = lat[2]
    assert item["latents"].shape == (4, 5, 8, 8) and item["condition"].shape == (6, 5, 8, 8)
    assert item["image_embeds"].shape == (2 * CLIP_TOKENS, CLIP_DIM)
    video = ds[2]["video"]
    torch.testing.assert_close(item["condition"], _wan_condition(video, vae, last=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["image_embeds"], encoder(video[:, [0, -1]].transpose(0, 1)))


def _i2v_config(tmp_path, **model):
    from stdit.train_config import build_config

    m = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 10,
         "out_channels": 4, "text_dim": 6, "image_dim": CLIP_DIM, "added_kv_proj_dim": 32,
         "freq_dim": 32, "ffn_dim": 64, "num_layers": 2}
    m.update(model)
    return build_config({"model": m, "data": {"kind": "latents", "root": str(tmp_path / "lat")},
                         "train": {"steps": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "ema_decay": 0,
                                   "ckpt_every": 0, "progress": False, "output_dir": str(tmp_path / "run")},
                         "sample": {"enabled": True, "num_inference_steps": 2}})


@pytest.mark.parametrize("kind", ["first", "first-last"])
def test_train_wan_i2v_on_encoded_data(tmp_path, kind, capsys):
    """A Wan 2.1 I2V-layout model (in_channels = latents + condition, CLIP image branch; first-last: the image
    embedder's position embedding over both frames' tokens) trains: the condition channels' input weights and the
    image branch get gradients, and the model exported loads."""
    from stdit.model import StDiT
    from stdit.train import train

    _encode(tmp_path, kind)
    extra = {"pos_embed_seq_len": 2 * CLIP_TOKENS} if kind == "first-last" else {}
    summary = train(_i2v_config(tmp_path, **extra))
    assert summary["steps"] == 4
    assert "no final samples: a Wan 2.1 image-to-video model samples through" in capsys.readouterr().out
    trained = StDiT.from_pretrained(tmp_path / "run" / "model")
    torch.manual_seed(0)
    init = StDiT(**{k: v for k, v in trained.config.items() if not k.startswith("_")})
    names = ["condition_embedder.image_embedder.ff.net.0.proj.weight", "blocks.0.attn2.add_k_proj.weight"]
    if kind == "first-last":
        names.append("condition_embedder.image_embedder.pos_embed")
    sd, sd0 = trained.state_dict(), init.state_dict()
    for n in names:
        assert not torch.allclose(sd[n], sd0[n]), n
    cond_in = slice(4, 10)  # the condition channels of the patch embedding
    assert not torch.allclose(sd["patch_embedding.weight"][:, cond_in], sd0["patch_embedding.weight"][:, cond_in])
    assert load_file(str(tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors")).keys() == sd.keys()


def test_i2v_training_data_errors(tmp_path):
    from stdit.train import train

    _encode(tmp_path, "first")
    with pytest.raises(ValueError, match=r"pos_embed_seq_len=10 .* takes 10 image tokens per clip, the data has 5"):
        train(_i2v_config(tmp_path, pos_embed_seq_len=10))
    with pytest.raises(ValueError, match=r"image features are 12-dimensional but model.image_dim=16"):
        train(_i2v_config(tmp_path, image_dim=16))
    with pytest.raises(ValueError, match=r"condition input is \[6, 5, 8, 8\] but the model takes 8 condition"):
        train(_i2v_config(tmp_path, in_channels=12))
    (tmp_path / "lat2").mkdir()
    encode_dataset(VideoFolderDataset(tmp_path / "videos", num_frames=9, height=16, width=16), tmp_path / "lat2",
                   vae=_tiny_vae(), text_features_dir=tmp_path / "feats", progress=False)
    cfg = _i2v_config(tmp_path)
    cfg.data.root = str(tmp_path / "lat2")
    with pytest.raises(ValueError, match=r"a 6-channel condition, which the data does not have; encode the data "
                                         r"with `stdit encode --vae \.\.\. --image-encoder"):
        train(cfg)


def test_encode_cli_image_to_video(tmp_path, capsys):
    from stdit.cli import main

    videos = _videos(tmp_path / "videos", n=2, frames=4)
    clip = _tiny_clip(tmp_path / "clip")
    args = ["encode", "--videos", str(videos), "--out", str(tmp_path / "lat"), "--frames", "4", "--height", "16",
            "--width", "16", "--no-progress", "--image-encoder", str(clip)]
    assert main(args) == 2  # a usage error
    assert "--image-encoder is for image-to-video training, which also needs the condition input" in \
        capsys.readouterr().err
    assert main(args + ["--image-condition", "first"]) == 0
    assert "+ image features + first-frame condition" in capsys.readouterr().out
    item = LatentDataset(tmp_path / "lat")[1]
    # no VAE: pixels, and one mask channel per frame
    assert item["condition"].shape == (4, 4, 16, 16) and item["image_embeds"].shape == (CLIP_TOKENS, CLIP_DIM)
    assert item["condition"][0, :, 0, 0].tolist() == [1, 0, 0, 0]
    torch.testing.assert_close(item["condition"][1:, 0], item["latents"][:, 0])
    assert item["condition"][1:, 1:].abs().sum() == 0
