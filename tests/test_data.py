"""Embedded moving-objects data, video folders, buckets, and `stdit encode` latent caches."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from stdit.data.buckets import BucketBatchSampler, nearest_bucket
from stdit.data.encode import encode_dataset
from stdit.data.latents import LatentDataset
from stdit.data.loader import batch_stream, collate
from stdit.data.synthetic import DIRECTIONS, SHAPES, MovingObjects, foreground_tracks, sample_quality
from stdit.data.video_folder import VideoFolderDataset, resize_crop
from stdit.export import export_video


def test_moving_objects_deterministic_and_seeded():
    a, b = MovingObjects(seed=3), MovingObjects(seed=3)
    for i in (0, 7, 9999):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["class_label"] == b[i]["class_label"]
    c = MovingObjects(seed=4)
    assert not torch.equal(a[0]["video"], c[0]["video"])
    v = a[5]["video"]
    assert v.shape == (3, 8, 32, 32) and v.min() >= -1 and v.max() <= 1
    with pytest.raises(IndexError):
        a[10_000]


@pytest.mark.parametrize("class_by", ["shape", "direction"])
def test_class_labels_mean_what_they_say(class_by):
    ds = MovingObjects(num_videos=200, class_by=class_by, seed=1)
    labels = [ds[i]["class_label"] for i in range(200)]
    assert set(labels) == set(range(4)) and ds.num_classes == 4
    for i in range(40):
        p = ds.params(i)
        assert labels[i] == (SHAPES.index(p["shape"]) if class_by == "shape" else DIRECTIONS.index(p["direction"]))
    if class_by == "direction":
        # the tracked centroid moves the way the label says, and stays inside the frame
        vids = torch.stack([ds[i]["video"] for i in range(40)])
        area, cen = foreground_tracks(vids)
        assert (area > 0).all()
        motion = cen[:, -1] - cen[:, 0]
        for m, lab in zip(motion, labels[:40]):
            dy, dx = m.tolist()
            want = {"right": dx > 3, "left": dx < -3, "down": dy > 3, "up": dy < -3}[DIRECTIONS[lab]]
            assert want, (DIRECTIONS[lab], dy, dx)


def test_sample_quality_separates_data_from_noise():
    ds = MovingObjects(seed=0)
    data = torch.stack([ds[i]["video"] for i in range(16)])
    other = torch.stack([ds[i]["video"] for i in range(16, 32)])
    near, far = sample_quality(other, data), sample_quality(torch.randn_like(data).clamp(-1, 1), data)
    assert near["pixel_w1"] < 0.05 < far["pixel_w1"]
    assert near["area_error"] < 0.02 < far["area_error"]
    assert near["motion_error"] < 1.0


def test_invalid_synthetic_arguments():
    with pytest.raises(ValueError, match="class_by"):
        MovingObjects(class_by="colour")


def _write_videos(root, n=3, frames=12, size=(24, 40)):
    ds = MovingObjects(num_frames=frames, height=size[0], width=size[1], seed=9)
    for i in range(n):
        ext = ".gif" if i == n - 1 else ".mp4"
        export_video(ds[i]["video"], root / f"clip{i}{ext}", fps=8)
        if i != 1:
            (root / f"clip{i}.txt").write_text(f"caption {i}\n")
    return ds


def test_video_folder_decodes_clips_and_captions(tmp_path):
    _write_videos(tmp_path)
    with pytest.warns(UserWarning, match=r"1 of 3 video\(s\) .* no caption file and get an empty caption: clip1.mp4"):
        ds = VideoFolderDataset(tmp_path, num_frames=4, height=16, width=16, frame_stride=2,
                                allow_missing_captions=True)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["video"].shape == (3, 4, 16, 16)
        assert -1 <= item["video"].min() and item["video"].max() <= 1
        assert item["video"].std() > 0.05  # real content, not a blank
    caps = {item["path"].rsplit("/", 1)[-1]: item["caption"] for item in (ds[i] for i in range(3))}
    assert caps == {"clip0.mp4": "caption 0", "clip1.mp4": "", "clip2.gif": "caption 2"}
    assert torch.equal(ds[0]["video"], ds[0]["video"])  # same clip for the same (seed, index)


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no videos"):
        VideoFolderDataset(tmp_path)
    _write_videos(tmp_path, n=1, frames=4)
    with pytest.raises(ValueError, match="long enough"):
        VideoFolderDataset(tmp_path, num_frames=30)


def test_resize_crop_keeps_the_centre():
    v = torch.zeros(2, 3, 20, 40)
    v[:, :, :, 18:22] = 1  # a vertical bar in the middle
    out = resize_crop(v, 10, 10)
    assert out.shape == (2, 3, 10, 10)
    assert out[0, 0, 5, 4:6].min() > 0.4 and out[0, 0, 5, 0] == 0


def test_buckets_sampler_splits_ranks_and_resumes():
    ids = ["a"] * 10 + ["b"] * 7
    s0 = BucketBatchSampler(ids, batch_size=2, seed=1, rank=0, world_size=2)
    s1 = BucketBatchSampler(ids, batch_size=2, seed=1, rank=1, world_size=2)
    b0, b1 = s0.rank_batches(0), s1.rank_batches(0)
    assert len(b0) == len(b1) == 10 // 4 + 7 // 4
    for x, y in zip(b0, b1):
        assert len(x) == len(y) == 2 and not set(x) & set(y)
        assert len({ids[i] for i in x + y}) == 1  # one bucket per global batch
    assert s0.rank_batches(0) == b0 and s0.rank_batches(1) != b0
    assert s0.rank_batches(0, start=1) == b0[1:]
    it = iter(s0)
    first = next(it)
    state = s0.state_dict()
    fresh = BucketBatchSampler(ids, batch_size=2, seed=1, rank=0, world_size=2)
    fresh.load_state_dict(state)
    assert [first, *fresh] == b0
    with pytest.raises(ValueError, match="no bucket has a full global batch"):
        BucketBatchSampler(["a"] * 3, batch_size=2, world_size=2)


def test_nearest_bucket():
    buckets = [(16, 256, 256), (16, 256, 448), (8, 448, 256)]
    assert nearest_bucket(40, 720, 1280, buckets) == (16, 256, 448)
    assert nearest_bucket(10, 1280, 720, buckets) == (8, 448, 256)
    assert nearest_bucket(4, 100, 100, buckets) is None


def test_batch_stream_position_resumes_exactly():
    ds = MovingObjects(num_videos=12, num_frames=2, height=8, width=8)
    sampler = BucketBatchSampler([0] * 12, batch_size=4, seed=0)
    stream = batch_stream(ds, sampler)
    got = [next(stream) for _ in range(5)]  # crosses an epoch boundary (3 batches per epoch)
    resumed = batch_stream(ds, sampler, **got[1][1])
    for (batch, state), (rb, rs) in zip(got[2:], [next(resumed) for _ in range(3)]):
        assert torch.equal(batch["video"], rb["video"]) and state == rs


def test_collate_pads_text_features():
    items = [{"latents": torch.zeros(2, 1, 2, 2), "prompt_embeds": torch.ones(3, 5)},
             {"latents": torch.zeros(2, 1, 2, 2), "prompt_embeds": torch.ones(1, 5)}]
    b = collate(items)
    assert b["prompt_embeds"].shape == (2, 3, 5) and b["latents"].shape == (2, 2, 1, 2, 2)
    assert b["prompt_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["prompt_embeds"][1, 1:].abs().sum() == 0


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[2.0, 1.0, 0.5, 1.5]).eval()


def test_encode_with_vae_and_precomputed_text(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=3, frames=9, size=(16, 16))
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):
        save_file({"prompt_embeds": torch.full((2 + i, 6), float(i))}, str(feats / f"clip{i}.safetensors"))
    vae = _tiny_vae()
    ds = VideoFolderDataset(videos, num_frames=5, height=16, width=16, allow_missing_captions=True)
    index = encode_dataset(ds, tmp_path / "lat", vae=vae, text_features_dir=feats, shard_size=2, progress=False)
    meta = json.loads(index.read_text())
    assert meta["count"] == 3 and len(meta["shards"]) == 2 and meta["text_features"]
    lat = LatentDataset(tmp_path / "lat")
    item = lat[2]
    assert item["latents"].shape == (4, 3, 8, 8)  # (5-1)/2+1 frames, 16/2 pixels
    assert item["caption"] == "caption 2"
    assert torch.equal(item["prompt_embeds"], torch.full((4, 6), 2.0))
    assert lat.bucket_ids == [(3, 8, 8)] * 3
    from stdit.pipeline import vae_encode

    torch.testing.assert_close(item["latents"], vae_encode(vae, ds[2]["video"][None])[0], rtol=1e-5, atol=1e-5)


def test_encode_errors(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=2, frames=9, size=(16, 16))
    ds = VideoFolderDataset(videos, num_frames=4, height=16, width=16, allow_missing_captions=True)
    with pytest.raises(ValueError, match="frames - 1 must be divisible by 2"):
        encode_dataset(ds, tmp_path / "lat", vae=_tiny_vae(), progress=False)
    with pytest.raises(FileNotFoundError, match="no precomputed text features for clip0"):
        encode_dataset(ds, tmp_path / "lat2", text_features_dir=tmp_path, progress=False)


def test_encode_cli_with_a_tiny_text_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from stdit.cli import main

    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=2, frames=6, size=(16, 16))
    enc = tmp_path / "t5"
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5EncoderModel(cfg).save_pretrained(enc)
    transformers.ByT5Tokenizer().save_pretrained(enc)
    code = main(["encode", "--videos", str(videos), "--out", str(tmp_path / "lat"), "--text-encoder", str(enc),
                 "--frames", "4", "--height", "16", "--width", "16", "--max-text-length", "32", "--no-progress",
                 "--allow-missing-captions"])
    assert code == 0
    lat = LatentDataset(tmp_path / "lat")
    a, b = lat[0], lat[1]
    assert a["latents"].shape == (3, 4, 16, 16)  # no VAE: pixels
    assert a["prompt_embeds"].shape == (len("caption 0".encode()) + 1, 16)  # bytes + </s>, padding removed
    assert b["caption"] == "" and b["prompt_embeds"].shape == (1, 16)
    assert not torch.equal(a["prompt_embeds"][:1], b["prompt_embeds"][:1])


# ---- nothing silently wrong: captions, unreadable files, truncated caches ------------------------------------
def test_missing_caption_is_an_error_naming_the_files(tmp_path):
    _write_videos(tmp_path)
    with pytest.raises(ValueError, match=r"1 of 3 video\(s\) under .* have no caption \(<stem>.txt beside the video\): "
                       r"clip1.mp4\. .*data.allow_missing_captions=true"):
        VideoFolderDataset(tmp_path, num_frames=4, height=16, width=16)


def test_missing_caption_option_reaches_the_dataset(tmp_path):
    from stdit.data.loader import build_dataset
    from stdit.train_config import build_config

    _write_videos(tmp_path)
    model = {"patch_size": [1, 4, 4], "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": None}
    data = {"kind": "video_folder", "root": str(tmp_path), "num_frames": 4, "height": 16, "width": 16}
    with pytest.raises(ValueError, match="have no caption"):
        build_dataset(build_config({"model": model, "data": data}).data)
    cfg = build_config({"model": model, "data": data}, ["data.allow_missing_captions=true"])
    with pytest.warns(UserWarning, match="1 of 3"):
        assert len(build_dataset(cfg.data)) == 3


def test_uncaptioned_folder_warns_once(tmp_path):
    import warnings

    _write_videos(tmp_path)
    for txt in tmp_path.glob("*.txt"):
        txt.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolderDataset(tmp_path, num_frames=4, height=16, width=16)
    assert [str(w.message) for w in caught if "caption" in str(w.message)] == [
        f"no video under {tmp_path} has a caption (<stem>.txt beside it): every caption is empty (fine for "
        "class-conditional or unconditional models)."]
    assert not ds.has_captions and ds[0]["caption"] == ""


def test_folder_of_unreadable_files_says_so(tmp_path):
    for name in ("a.mp4", "b.webm"):
        (tmp_path / name).write_bytes(b"not a video" * 10)
    with pytest.raises(ValueError, match=r"none of the 2 video file\(s\) under .* can be read: a.mp4 \(.*\), b.webm"):
        VideoFolderDataset(tmp_path, num_frames=4, height=16, width=16)


def test_decode_and_caption_errors_name_their_file(tmp_path):
    _write_videos(tmp_path, n=2)
    (tmp_path / "clip1.txt").write_bytes(b"\xff\xfe caption")  # not UTF-8
    ds = VideoFolderDataset(tmp_path, num_frames=4, height=16, width=16)
    with pytest.raises(ValueError, match=r"clip1.txt: cannot read this caption file \(UnicodeDecodeError"):
        ds[1]
    data = (tmp_path / "clip0.mp4").read_bytes()
    (tmp_path / "clip0.mp4").write_bytes(data[:200])  # damaged after the folder was scanned
    with pytest.raises(ValueError, match=r"clip0.mp4"):
        ds[0]


@pytest.fixture
def latents_dir(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=2, frames=6, size=(16, 16))
    ds = VideoFolderDataset(videos, num_frames=4, height=16, width=16, allow_missing_captions=True)
    return encode_dataset(ds, tmp_path / "lat", shard_size=1, progress=False).parent


def test_truncated_latents_index_names_the_file(latents_dir):
    index = latents_dir / "index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{index}: is truncated or not JSON|{index} is truncated or not JSON"):
        LatentDataset(latents_dir)
    index.write_text(json.dumps({"shards": [{"file": "shard-00000.safetensors", "shapes": [[3, 4, 16, 16]]}]}))
    with pytest.raises(ValueError, match=rf"{index} does not have the layout `stdit encode` writes"):
        LatentDataset(latents_dir)


def test_damaged_latent_shards_name_the_file(latents_dir):
    shard = latents_dir / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    ds = LatentDataset(latents_dir)
    assert ds[0]["latents"].shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match=rf"{shard}: cannot read this latent shard"):
        ds[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shard\(s\) missing from .*: shard-00001.safetensors"):
        LatentDataset(latents_dir)


def test_unreadable_text_features_name_the_file(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=2, frames=6, size=(16, 16))
    (videos / "clip0.safetensors").write_bytes(b"garbage")
    ds = VideoFolderDataset(videos, num_frames=4, height=16, width=16, allow_missing_captions=True)
    with pytest.raises(ValueError, match=r"clip0.safetensors: cannot read these text features"):
        encode_dataset(ds, tmp_path / "lat", progress=False)


def test_encode_cli_errors_are_one_line(tmp_path, capsys):
    from stdit.cli import main

    videos = tmp_path / "videos"
    videos.mkdir()
    _write_videos(videos, n=2, frames=6, size=(16, 16))
    base = ["encode", "--videos", str(videos), "--out", str(tmp_path / "lat"), "--frames", "4", "--height", "16",
            "--width", "16", "--no-progress"]
    cases = [([], r"1 of 2 video\(s\) .*clip1.gif.*--allow-missing-captions"),
             (["--allow-missing-captions", "--vae", str(tmp_path / "no-vae")], r"--vae '.*no-vae': no such local"),
             (["--allow-missing-captions", "--text-features", str(tmp_path / "none")],
              r"--text-features .*none: no such"),
             (["--text-encoder", "a", "--text-features", "b"], r"give --text-encoder or --text-features, not both")]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(message, err), err
