"""StDiTPipeline with a text encoder: prompts (Wan's feature padding, parity with diffusers' WanPipeline),
negative prompts in guidance, num_videos_per_prompt, step-end callbacks, save/load, and ``stdit sample --prompt``
with its checks that run before any sampling."""

import json
import re

import pytest
import torch

from stdit.cli import main
from stdit.export import read_video
from stdit.model import StDiT
from stdit.pipeline import StDiTPipeline, make_scheduler
from wan_pipeline import TEXT_DIM, tiny_pipeline, tiny_wan

PROMPTS = ["a red square moves left", "a blue   circle moves right &amp; fast"]
L = 16  # max_sequence_length: short, so the tests stay fast (the default is Wan's 512)
KW = dict(num_frames=2, height=8, width=8, num_inference_steps=3, output_type="latent", max_sequence_length=L)


@pytest.fixture(scope="module")
def wan():
    """diffusers' WanPipeline with a tiny random UMT5 and an offline word-level tokenizer: the reference."""
    return tiny_pipeline(tiny_wan())


@torch.no_grad()  # as the pipelines run the encoder (with autograd on, torch may take another attention path)
def wan_embeds(wan, prompts, **kw):
    return wan._get_t5_prompt_embeds(prompts, max_sequence_length=L, **kw)


def model(text_dim=TEXT_DIM, **kw):
    torch.manual_seed(0)
    m = StDiT(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
              freq_dim=32, ffn_dim=64, num_layers=2, text_dim=text_dim, **kw)
    with torch.no_grad():  # random outputs, so every input visibly changes the result
        m.proj_out.weight.normal_(std=0.2)
    return m.eval()


def text_pipe(wan, m=None):
    p = StDiTPipeline(m or model(), make_scheduler("euler", 2.0), text_encoder=wan.text_encoder,
                      tokenizer=wan.tokenizer)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_prompt_features_match_diffusers_wan_and_its_zero_padding(wan):
    p = text_pipe(wan)
    ours, neg = p.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=L)
    ref = wan_embeds(wan, PROMPTS, num_videos_per_prompt=1)
    assert ours.shape == (2, L, TEXT_DIM) and neg is None
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # Wan's convention: the encoder's features over the real tokens (5 and, once cleaned to "a blue circle moves
    # right & fast", 7), exact zeros after them up to max_sequence_length
    assert [len(wan.tokenizer(t).input_ids) for t in ("a red square moves left", "a blue circle moves right & fast")
            ] == [5, 7]
    for row, n in zip(ours, (5, 7)):
        assert (row[:n].abs().sum(-1) > 0).all() and (row[n:] == 0).all()
    # the encoder ran with the mask: the real tokens' features do not depend on how far the padding goes
    longer, _ = p.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=2 * L)
    torch.testing.assert_close(longer[:, :L], ours, rtol=1e-5, atol=1e-6)
    # per-prompt copies, and negative prompts, as diffusers' encode_prompt gives them
    pos, neg = p.encode_prompt(PROMPTS, "blue circle", num_videos_per_prompt=3, max_sequence_length=L)
    with torch.no_grad():
        ref_pos, ref_neg = wan.encode_prompt(PROMPTS, "blue circle", num_videos_per_prompt=3, max_sequence_length=L)
    torch.testing.assert_close(pos, ref_pos, rtol=0, atol=0)
    torch.testing.assert_close(neg, ref_neg, rtol=0, atol=0)


def test_the_prompt_path_equals_the_same_precomputed_embeds(wan):
    p = text_pipe(wan)
    emb, neg = wan_embeds(wan, PROMPTS), wan_embeds(wan, ["blue circle"] * 2)
    for guidance in (1.0, 3.0):
        a = p(prompt=PROMPTS, negative_prompt="blue circle", guidance_scale=guidance, generator=gen(), **KW).frames
        b = p(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=guidance, generator=gen(), **KW).frames
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    one = p(prompt=PROMPTS[0], generator=gen(), **KW).frames  # a string is a batch of one
    assert one.shape == (1, 3, 2, 8, 8)


def test_negative_prompt_is_the_unconditional_branch_of_guidance(wan):
    p = text_pipe(wan)
    noise = torch.randn(1, 3, 2, 8, 8, generator=gen())

    def run(**extra):
        return p(prompt="a red square moves left", latents=noise.clone(), **KW, **extra).frames

    no_neg = run(guidance_scale=3.0)
    with_neg = run(negative_prompt="blue circle", guidance_scale=3.0)
    other_neg = run(negative_prompt="a black square", guidance_scale=3.0)
    assert not torch.allclose(no_neg, with_neg, atol=1e-4) and not torch.allclose(with_neg, other_neg, atol=1e-4)
    # guidance off: the negative prompt plays no part (and is not encoded)
    torch.testing.assert_close(run(negative_prompt="blue circle"), run(), rtol=0, atol=0)
    # the prompt as its own negative: guidance is the conditional result
    torch.testing.assert_close(run(negative_prompt="a red square moves left", guidance_scale=3.0), run(),
                               rtol=1e-4, atol=1e-4)
    # no negative prompt: zeros, the null text stdit trains with (negative_prompt="" gives Wan's default)
    zeros = torch.zeros(1, L, TEXT_DIM)
    torch.testing.assert_close(no_neg, run(negative_prompt_embeds=zeros, guidance_scale=3.0))


def test_num_videos_per_prompt(wan):
    p = text_pipe(wan)
    out = p(prompt=PROMPTS, num_videos_per_prompt=3, generator=gen(), **{**KW, "output_type": "pt"}).frames
    assert out.shape == (6, 2, 3, 8, 8)
    lat = p(prompt=PROMPTS, num_videos_per_prompt=3, negative_prompt=["blue", "red"], guidance_scale=2.0,
            generator=gen(), **KW).frames
    assert lat.shape == (6, 3, 2, 8, 8) and not torch.allclose(lat[0], lat[1])  # fresh noise for each copy
    # the copies of prompt i are videos i*3 .. i*3+2: the same as sampling prompt i alone from their noise
    noise = torch.randn(6, 3, 2, 8, 8, generator=gen(4))
    many = p(prompt=PROMPTS, num_videos_per_prompt=3, latents=noise.clone(), **KW).frames
    alone = p(prompt=[PROMPTS[1]] * 3, latents=noise[3:].clone(), **KW).frames
    torch.testing.assert_close(many[3:], alone, rtol=1e-5, atol=1e-5)
    emb = wan_embeds(wan, PROMPTS)  # precomputed features are repeated too
    assert p(prompt_embeds=emb, num_videos_per_prompt=2, generator=gen(), **KW).frames.shape[0] == 4
    cls = StDiTPipeline(model(text_dim=None, num_classes=3), make_scheduler("euler"))
    cls.set_progress_bar_config(disable=True)
    assert cls(class_labels=[0, 2], num_videos_per_prompt=2, **KW).frames.shape[0] == 4
    with pytest.raises(ValueError, match="num_videos_per_prompt=0"):
        p(prompt=PROMPTS, num_videos_per_prompt=0, **KW)


def test_callback_on_step_end_sees_each_step_and_can_change_the_latents(wan):
    p = text_pipe(wan)
    seen = []

    def record(pipe, i, t, kw):
        assert pipe is p and set(kw) == {"latents", "prompt_embeds"}
        seen.append((i, float(t), kw["latents"].clone(), kw["prompt_embeds"].shape))
        return {}

    ref = p(prompt=PROMPTS[0], generator=gen(), callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **KW).frames
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][3] == (1, L, TEXT_DIM)
    assert [s[1] for s in seen] == p.scheduler.timesteps.tolist()
    torch.testing.assert_close(seen[-1][2], ref)  # it saw the latents after each step

    def zero_after_first(pipe, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 0 else kw

    changed = p(prompt=PROMPTS[0], generator=gen(), callback_on_step_end=zero_after_first, **KW).frames
    assert not torch.allclose(changed, ref) and torch.isfinite(changed).all()
    last = p(prompt=PROMPTS[0], generator=gen(), callback_on_step_end=lambda pipe, i, t, kw: {
        "latents": torch.full_like(kw["latents"], 7.0)}, **KW).frames
    assert (last == 7.0).all()  # the callback's latents are what the pipeline returns

    # swapping the text mid-run: the later steps see the new features
    other = wan_embeds(wan, [PROMPTS[1]])
    swap = p(prompt=PROMPTS[0], generator=gen(), callback_on_step_end=lambda pipe, i, t, kw: {
        "prompt_embeds": other}, callback_on_step_end_tensor_inputs=["prompt_embeds"], **KW).frames
    assert not torch.allclose(swap, ref)

    from diffusers.callbacks import PipelineCallback

    class Stop(PipelineCallback):  # diffusers' callback classes work too; pipe._interrupt ends the loop
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            pipeline._interrupt = step_index >= 0
            return callback_kwargs

    stopped = p(prompt=PROMPTS[0], generator=gen(), callback_on_step_end=Stop(), **KW).frames
    torch.testing.assert_close(stopped, seen[0][2], rtol=0, atol=0)  # the latents after the first step
    with pytest.raises(ValueError, match="not among"):
        p(prompt=PROMPTS[0], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"], **KW)


def test_output_types_with_prompts(wan):
    p = text_pipe(wan)
    kw = {**KW, "output_type": "pt"}
    pt = p(prompt=PROMPTS, generator=gen(), **kw).frames
    arr = p(prompt=PROMPTS, generator=gen(), **{**kw, "output_type": "np"}).frames
    pil = p(prompt=PROMPTS, generator=gen(), **{**kw, "output_type": "pil"}).frames
    assert pt.shape == (2, 2, 3, 8, 8) and arr.shape == (2, 2, 8, 8, 3) and len(pil) == 2 and len(pil[0]) == 2
    torch.testing.assert_close(torch.from_numpy(arr), pt.permute(0, 1, 3, 4, 2), rtol=1e-6, atol=1e-6)


def test_clear_errors(wan):
    p = text_pipe(wan)
    no_encoder = StDiTPipeline(model(), make_scheduler("euler"))
    with pytest.raises(ValueError, match="prompt strings need a text encoder and its tokenizer"):
        no_encoder(prompt="a red square", **KW)
    with pytest.raises(ValueError, match="prompt or prompt_embeds, not both"):
        p(prompt="a red square", prompt_embeds=torch.zeros(1, L, TEXT_DIM), **KW)
    with pytest.raises(ValueError, match="negative_prompt or negative_prompt_embeds, not both"):
        p(prompt="a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, L, TEXT_DIM), guidance_scale=2,
          **KW)
    with pytest.raises(ValueError, match="prompt was given but this model takes no text"):
        text_pipe(wan, model(text_dim=None, num_classes=2))(prompt="a red square", **KW)
    with pytest.raises(ValueError, match=r"gives features of shape \(1, 16, 32\), but the model takes "
                                         r"\[B, L, text_dim=24\]"):
        text_pipe(wan, model(text_dim=24))(prompt="a red square", **KW)
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(1, 4, 8\)"):
        p(prompt_embeds=torch.zeros(1, 4, 8), **KW)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        p(prompt=PROMPTS, negative_prompt=["a", "b", "c"], guidance_scale=2.0, **KW)
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        p(prompt=[], **KW)
    with pytest.raises(ValueError, match="text-conditioned: pass prompt_embeds"):
        p(**KW)
    for bad in (dict(num_frames=0), dict(height=-8), dict(num_inference_steps=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}.*positive integer"):
            p(prompt="a", **{**KW, **bad})


def test_save_and_load_with_text_encoder_and_tokenizer(wan, tmp_path):
    p = text_pipe(wan)
    p.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"] and index["tokenizer"][0] == "transformers"
    assert index["transformer"] == ["stdit.model", "StDiT"]
    q = StDiTPipeline.from_pretrained(tmp_path / "pipe")
    q.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, negative_prompt="blue", guidance_scale=2.0, **KW)
    torch.testing.assert_close(q(generator=gen(), **kw).frames, p(generator=gen(), **kw).frames, rtol=0, atol=0)
    # the optional components can be left out when loading, and a pipeline saved without them still loads
    bare = StDiTPipeline.from_pretrained(tmp_path / "pipe", text_encoder=None, tokenizer=None)
    assert bare.text_encoder is None and bare.tokenizer is None
    StDiTPipeline(p.transformer, p.scheduler).save_pretrained(tmp_path / "bare")
    assert StDiTPipeline.from_pretrained(tmp_path / "bare").text_encoder is None


# ---------------------------------------------------------------- stdit sample


def _one_error_line(capsys, pattern):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def _sample(*args):
    return main(["sample", "--frames", "2", "--height", "8", "--width", "8", "--steps", "2", "--scale", "1",
                 "--no-progress", "--max-sequence-length", str(L), *map(str, args)])


def test_sample_cli_with_prompts(wan, tmp_path, capsys):
    p = text_pipe(wan)
    p.save_pretrained(tmp_path / "pipe")
    assert _sample("--model", tmp_path / "pipe", "--prompt", *PROMPTS, "--negative-prompt", "blue",
                   "--guidance", "3", "--out", tmp_path / "a.gif") == 0
    assert "wrote" in capsys.readouterr().out
    gif = read_video(tmp_path / "a.gif")
    assert gif.shape == (2, 2 + 10, 2 + 2 * 10, 3)  # two videos side by side
    # a model directory without a text encoder, given one with --text-encoder (a folder holding text_encoder/
    # and tokenizer/, or a plain transformers directory)
    p.transformer.save_pretrained(tmp_path / "model")
    p.scheduler.save_pretrained(tmp_path / "model")  # the pipeline's scheduler, so the videos can be compared
    p.text_encoder.save_pretrained(tmp_path / "umt5")
    p.tokenizer.save_pretrained(tmp_path / "umt5")
    for enc in (tmp_path / "pipe", tmp_path / "umt5"):
        assert _sample("--model", tmp_path / "model", "--text-encoder", enc, "--prompt", *PROMPTS,
                       "--negative-prompt", "blue", "--guidance", "3", "--out", tmp_path / "b.gif") == 0
        assert (read_video(tmp_path / "b.gif") == gif).all()  # the same seed, text and weights: the same video
    assert _sample("--model", tmp_path / "model", "--text-encoder", tmp_path / "umt5", "--prompt", PROMPTS[0],
                   "--num-videos", "2", "--out", tmp_path / "c.gif") == 0
    assert read_video(tmp_path / "c.gif").shape == (2, 2 + 10, 2 + 2 * 10, 3)


@pytest.fixture
def no_sampling(monkeypatch):
    """Any check that fails must fail before the pipeline samples (or loads a text encoder)."""
    def fail(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(StDiTPipeline, "__call__", fail)
    monkeypatch.setattr("stdit.sample.load_text_encoder", fail)


def test_sample_cli_checks_before_sampling(wan, tmp_path, capsys, monkeypatch, no_sampling):
    text_pipe(wan).transformer.save_pretrained(tmp_path / "model")
    model(text_dim=None, num_classes=2).save_pretrained(tmp_path / "cls")
    (tmp_path / "file").write_text("")
    (tmp_path / "dir.gif").mkdir()
    m, out = tmp_path / "model", tmp_path / "x.gif"
    cases = [
        (["--model", m, "--prompt", "a", "--out", tmp_path / "x.avi"], r"unsupported video format '\.avi'"),
        (["--model", m, "--prompt", "a", "--out", tmp_path / "x"], r"unsupported video format '\(no suffix\)'"),
        (["--model", m, "--prompt", "a", "--out", tmp_path / "file" / "x.gif"], r"is a file, not a directory"),
        (["--model", m, "--prompt", "a", "--out", tmp_path / "dir.gif"], r"is a directory"),
        (["--model", m, "--prompt", "a", "--out", out, "--frames", "0"], r"--frames 0: must be a positive integer"),
        (["--model", m, "--prompt", "a", "--out", out, "--height", "-8"], r"--height -8: must be a positive"),
        (["--model", m, "--prompt", "a", "--out", out, "--height", "9"], r"height=9 must be a multiple of 2"),
        (["--model", m, "--prompt", "a", "--out", out], r"--prompt needs a text encoder .* holds none"),
        (["--model", tmp_path / "cls", "--prompt", "a", "--text-encoder", m, "--out", out],
         r"this model takes no text"),
        (["--model", m, "--prompt", "a", "--prompt-embeds", tmp_path / "file", "--out", out], r"not both"),
        (["--model", m, "--prompt", "a", "--text-encoder", tmp_path / "nope", "--out", out],
         r"--text-encoder .*nope: no such file or directory"),
        (["--model", tmp_path / "nope", "--out", out], r"--model .*nope: no such file or directory"),
    ]
    for args, pattern in cases:
        assert _sample(*args) == 2, args
        _one_error_line(capsys, pattern)
    monkeypatch.setattr("stdit.sample.os.access", lambda *a: False)  # (the tests may run as root)
    assert _sample("--model", m, "--prompt", "a", "--out", out) == 2
    _one_error_line(capsys, r"cannot write to .* \(permission denied\)")
    assert not out.exists()
