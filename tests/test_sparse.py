"""Sliding-tile attention in the model and the trainer (:mod:`stdit.sparse`): a window covering every tile is dense
attention, a smaller one changes only the blocks and timesteps it names, bad settings are refused with one error,
and the trainer trains with it (after a dense curriculum)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from stdit.sparse import TileAttention
from stdit.train_config import build_config


def _call(model, x, t, text):
    with torch.no_grad():
        return model(x, t, text, return_dict=False)[0]


@pytest.fixture
def setup():
    model = tiny_model(attention_head_dim=32, num_layers=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 12, 14, generator=g)  # token grid 5 x 6 x 7: no tile divides it
    text = torch.randn(2, 7, 24, generator=g)
    return model, x, text


def test_a_window_over_every_tile_is_dense_attention(setup):
    model, x, text = setup
    dense = _call(model, x, 500.0, text)
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), window=(5, 5, 5)))
    assert torch.allclose(_call(model, x, 500.0, text), dense, atol=1e-5, rtol=0)
    model.set_tile_attention(None)
    assert torch.equal(_call(model, x, 500.0, text), dense)


def test_the_window_layers_and_timesteps_it_names(setup):
    model, x, text = setup
    dense = _call(model, x, 500.0, text)
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), window=(1, 1, 1)))
    sparse = _call(model, x, 500.0, text)
    assert (sparse - dense).abs().max() > 1e-3  # attention within one tile differs from attention over all tokens
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), window=(1, 1, 1), layers=(1,)))
    one_layer = _call(model, x, 500.0, text)
    assert (one_layer - dense).abs().max() > 1e-4 and (one_layer - sparse).abs().max() > 1e-4
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), window=(1, 1, 1), max_timestep=400))
    assert torch.equal(_call(model, x, 500.0, text), dense)  # noisier than max_timestep: dense
    assert torch.allclose(_call(model, x, 300.0, text), _call_sparse(model, x, 300.0, text), atol=1e-6)


def _call_sparse(model, x, t, text):
    other = tiny_model(attention_head_dim=32, num_layers=3)
    other.load_state_dict(model.state_dict())
    other.set_tile_attention(TileAttention(tile=(2, 2, 4), window=(1, 1, 1)))
    return _call(other, x, t, text)


def test_topk_selection(setup):
    model, x, text = setup
    dense = _call(model, x, 500.0, text)
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), select="topk", keep=1.0))
    assert torch.allclose(_call(model, x, 500.0, text), dense, atol=1e-5, rtol=0)
    model.set_tile_attention(TileAttention(tile=(2, 2, 4), select="topk", keep=0.25))
    assert (_call(model, x, 500.0, text) - dense).abs().max() > 1e-3


def test_topk_tile_mask_keeps_the_highest_pooled_scores():
    from stdit.kernels.attention_sparse import TileLayout, topk_tile_mask

    lay = TileLayout.build((2, 4, 6), (1, 4, 4))  # 4 tiles, two of them cut to 8 tokens
    g = torch.Generator().manual_seed(0)
    q, k = (lay.to_tiles(torch.randn(2, 48, 3, 16, generator=g)) for _ in range(2))
    mask = topk_tile_mask(q, k, lay, 2)
    assert (mask.kv_count == 2).all()
    n = lay.n_valid.float().view(1, 4, 1, 1)
    qp, kp = (x.view(2, 4, 16, 3, 16).sum(2) / n for x in (q, k))  # padding rows are zero: the mean of the real
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp)
    top = scores.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(mask.kv_index.long(), top)
    with pytest.raises(ValueError, match="num_tiles"):
        topk_tile_mask(q, k, lay, 5)


def test_tile_attention_refuses_bad_settings(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="power of two >= 16"):
        TileAttention(tile=(3, 4, 4))
    with pytest.raises(ValueError, match="three positive ints"):
        TileAttention(window=(1, 2))
    with pytest.raises(ValueError, match="max_timestep"):
        TileAttention(max_timestep=1200)
    with pytest.raises(ValueError, match="select"):
        TileAttention(select="random")
    with pytest.raises(ValueError, match="keep"):
        TileAttention(select="topk", keep=0)
    with pytest.raises(ValueError, match="block indices"):
        model.set_tile_attention(TileAttention(layers=(0, 3)))
    with pytest.raises(TypeError, match="TileAttention"):
        model.set_tile_attention({"tile": (4, 4, 4)})
    with pytest.raises(ValueError, match="factorized"):
        tiny_model(attention_mode="factorized").set_tile_attention(TileAttention())


def test_density_of_a_window():
    cfg = TileAttention(tile=(4, 4, 4), window=(3, 3, 3))
    # Wan 480p latent tokens: 6 x 8 x 13 tiles; 27 of them (edge windows shifted inwards) per query tile
    assert cfg.density((21, 30, 52)) == pytest.approx(27 / (6 * 8 * 13))


def test_train_config_tile_attention(tmp_path):
    base = {"model": {"patch_size": [1, 4, 4], "num_attention_heads": 2, "attention_head_dim": 16}}
    cfg = build_config(base, ["train.tile_attention.window=[1,3,3]", "train.tile_attention.tile=[1,4,4]"])
    assert cfg.train.tile_attention.window == [1, 3, 3] and cfg.train.tile_attention.dense_steps == 0
    with pytest.raises(ValueError, match="train.tile_attention: .*power of two"):
        build_config(base, ["train.tile_attention.tile=[3,3,3]"])
    with pytest.raises(ValueError, match="replaces full 3D self-attention"):
        build_config({"model": {**base["model"], "attention_mode": "factorized"}},
                     ["train.tile_attention.dense_steps=2"])
    with pytest.raises(ValueError, match="sub-section's key"):
        build_config(base, ["train.lr.x=1"])


def test_training_with_tile_attention_after_a_dense_curriculum(tmp_path, monkeypatch):
    from stdit import train
    from stdit.sparse import TileSwitch

    calls = []
    real = TileSwitch.__init__

    def spy(self, config):
        calls.append(config)
        real(self, config)

    monkeypatch.setattr(TileSwitch, "__init__", spy)
    out = tmp_path / "run"
    rc = train.main(["--config", "configs/tiny.yaml", f"train.output_dir={out}", "train.steps=3",
                          "train.ckpt_every=0", "train.progress=false", "sample.enabled=false",
                          "model.patch_size=[1,4,4]", "model.num_layers=1", "model.ffn_dim=64",
                          "train.tile_attention.tile=[1,4,4]", "train.tile_attention.window=[1,1,3]",
                          "train.tile_attention.dense_steps=1"])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert len(calls) == 1 and calls[0].window == (1, 1, 3)  # switched on once, after the dense step
    assert rc == 0


def test_sample_cli_with_tile_attention(tmp_path, capsys):
    from stdit.cli import main
    from stdit.pipeline import make_scheduler

    tiny_model(text_dim=None, num_classes=2, in_channels=3, out_channels=3).save_pretrained(tmp_path / "m")
    make_scheduler("euler", 1.0).save_pretrained(tmp_path / "m")
    base = ["sample", "--model", str(tmp_path / "m"), "--class-label", "1", "--frames", "2", "--height", "16",
            "--width", "16", "--steps", "2", "--scale", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "dense.gif")]) == 0
    assert main(base + ["--out", str(tmp_path / "tiles.gif"), "--tile-attention", "window", "--tile", "1", "4", "4",
                        "--window", "1", "1", "1"]) == 0
    assert (tmp_path / "dense.gif").read_bytes() != (tmp_path / "tiles.gif").read_bytes()
    assert main(base + ["--out", str(tmp_path / "bad.gif"), "--tile-attention", "topk", "--tile", "3", "3", "3"]) == 2
    assert "power of two" in capsys.readouterr().err
