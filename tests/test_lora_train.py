"""LoRA finetuning in the trainer (train.lora, through peft) from a pretrained checkpoint (model.pretrained): only
the adapters train and are checkpointed, the adapter comes out in diffusers' LoRA format and loads into diffusers'
Wan, FSDP2 on 2 ranks equals one process, a killed run resumes to the same curve, and merge-lora bakes it in."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from stdit import StDiT
from stdit.data.latents import write_shard
from stdit.lora import WEIGHT_NAME, inference_model, model_config
from stdit.parallel.checkpoint import CheckpointError, list_checkpoints, read_dcp_metadata, verify_checkpoint
from stdit.train import train
from stdit.train_config import build_config, load_train_config
from stdit.train_utils import read_log

from test_distributed import _torchrun
from test_train import _run, sigkill_at_step
from wan_pipeline import TEXT_DIM, tiny_pipeline, tiny_wan

ATOL = 1e-5
TRAIN = {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "ema_decay": 0.0, "progress": False,
         "lora": {"rank": 4}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy 2-core machine its spin-waits cost 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Wan converted to StDiT and saved (the 'pretrained' model), and a latent cache with text
    features for it: per-clip constant colours plus a little noise, so a rank-4 adapter has something to learn."""
    root = tmp_path_factory.mktemp("lora-assets")
    StDiT.from_wan(tiny_wan(num_layers=2)).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    n = 16
    latents = [torch.randn(16, 1, 1, 1, generator=g).expand(16, 3, 8, 8) + 0.1 * torch.randn(16, 3, 8, 8, generator=g)
               for _ in range(n)]
    text = [torch.randn(5, TEXT_DIM, generator=g) for _ in range(n)]
    (root / "latents").mkdir()
    write_shard(root / "latents" / "shard-00000.safetensors", latents, text)
    index = {"shards": [{"file": "shard-00000.safetensors", "shapes": [list(z.shape) for z in latents],
                         "captions": [""] * n}], "text_features": True, "count": n}
    (root / "latents" / "index.json").write_text(json.dumps(index))
    return root


def raw_config(assets, out, **train):
    return {"model": {"pretrained": str(assets / "base")}, "data": {"kind": "latents", "root": str(assets / "latents")},
            "train": {**TRAIN, "output_dir": str(out), **train}, "sample": {"enabled": False}}


def lora_run(assets, out, overrides=(), **train):
    return build_config(raw_config(assets, out, **train), list(overrides))


def captured_train(cfg, monkeypatch):
    """Train in this process and return the trained model object (its base, adapters and all), as it ends."""
    import stdit.train

    held = {}
    real = stdit.train.wrap_model

    def wrap(model, *args, **kwargs):
        held["model"] = model
        held["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(stdit.train, "wrap_model", wrap)
    summary = train(cfg)
    return summary, held["model"], held["init"]


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([300.0, 800.0]), torch.randn(2, 5, TEXT_DIM,
                                                                                              generator=g)


def out(model, x, t, text):
    with torch.no_grad():
        return model(x, t, text, return_dict=False)[0]


def fixed_loss(model, assets) -> float:
    """The rectified-flow loss on 16 clips with fixed noise and timesteps (no sampling noise between models)."""
    from stdit.data.latents import LatentDataset
    from stdit.diffusion import RectifiedFlow

    ds = LatentDataset(assets / "latents")
    x0 = torch.stack([ds[i]["latents"] for i in range(len(ds))])
    text = torch.stack([ds[i]["prompt_embeds"] for i in range(len(ds))])
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.rand(len(ds), generator=g)
    with torch.no_grad():
        return float(RectifiedFlow().loss(model.eval(), x0, noise=noise, t=t, patch_size=(1, 2, 2),
                                          encoder_hidden_states=text))


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One LoRA run (no EMA: the exported adapter is the trained one) and the trainer's model at its end."""
    cfg = lora_run(assets, tmp_path_factory.mktemp("run") / "run")
    with pytest.MonkeyPatch.context() as mp:
        summary, model, _ = captured_train(cfg, mp)
    return summary, model.eval(), cfg


def test_lora_trains_only_the_adapters_and_lowers_the_loss(assets, tmp_path, monkeypatch):
    cfg = lora_run(assets, tmp_path / "run", steps=40, lr=3e-2, ema_decay=0.9, ckpt_every=10)
    summary, model, init = captured_train(cfg, monkeypatch)
    base = StDiT.from_pretrained(assets / "base").state_dict()
    adapters = {k for k in init if ".lora_" in k}
    assert len(adapters) == 2 * 2 * 10  # A and B on q, k, v, out of attn1 and attn2 and both FFN linears, 2 blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters and all(model.get_parameter(n).dtype == torch.float32 for n in trainable)
    for k, v in model.state_dict().items():
        if k in adapters:
            assert not torch.equal(v, init[k]), f"adapter {k} did not train"
        else:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), f"base weight {k} changed"
    # the rectified-flow loss on fixed noise and timesteps: the base alone, with the trained adapter, with the
    # adapter's EMA (what was exported)
    ema = StDiT.from_pretrained(assets / "base")
    ema.load_lora_adapter(str(tmp_path / "run" / "model"), weight_name=WEIGHT_NAME)
    before, after, averaged = (fixed_loss(m, assets) for m in (StDiT.from_pretrained(assets / "base"), model, ema))
    assert after < 0.85 * before and averaged < 0.9 * before, (before, after, averaged)
    assert summary["last_loss"] < summary["first_loss"]
    # checkpoints hold the adapters, their AdamW moments and their EMA: no base weight
    keys = set(read_dcp_metadata(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]).state_dict_metadata)
    tensors = {k for k in keys if k.startswith(("model.", "ema.", "optim.state."))}
    assert tensors and all(".lora_" in k for k in tensors), sorted(k for k in tensors if ".lora_" not in k)[:5]
    assert {k.split(".", 1)[1] for k in keys if k.startswith("ema.")} == adapters
    assert {k.rsplit(".", 1)[0].removeprefix("optim.state.") for k in keys if k.startswith("optim.state.")} == adapters


def test_saved_adapter_loads_into_diffusers_wan_and_stdit_with_the_same_output(assets, trained):
    from diffusers import WanTransformer3DModel

    summary, model, cfg = trained
    lora_dir = Path(summary["model_dir"])
    assert summary["lora_file"] == str(lora_dir / WEIGHT_NAME) and (lora_dir / "scheduler_config.json").is_file()
    with safe_open(summary["lora_file"], framework="pt") as f:
        keys, header = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k and ".default" not in k for k in keys)
    assert header["transformer.r"] == 4 and header["transformer.base_model_name_or_path"] == str(assets / "base")
    x, t, text = inputs()
    ref = out(model, x, t, text)  # the trainer's model with its adapter
    base = StDiT.from_pretrained(assets / "base").eval()
    assert (out(base, x, t, text) - ref).abs().max() > 1e-3  # the adapter changes the output

    ours = StDiT.from_pretrained(assets / "base").eval()
    ours.load_lora_adapter(str(lora_dir), weight_name=WEIGHT_NAME)
    assert (out(ours, x, t, text) - ref).abs().max() <= ATOL
    wan = StDiT.from_pretrained(assets / "base").to_wan().eval()
    assert isinstance(wan, WanTransformer3DModel)
    wan.load_lora_adapter(str(lora_dir), weight_name=WEIGHT_NAME)
    assert (out(wan, x, t, text) - ref).abs().max() <= ATOL
    # and as WanPipeline.load_lora_weights reads it (the pipeline's own file lookup and key handling)
    pipe = tiny_pipeline(StDiT.from_pretrained(assets / "base").to_wan().eval())
    pipe.load_lora_weights(str(lora_dir), adapter_name="trained")
    assert (out(pipe.transformer, x, t, text) - ref).abs().max() <= ATOL
    # the model the trainer samples with: the base loaded again plus the adapter weights, the training RNG untouched
    rng = torch.get_rng_state()
    sampler = inference_model(cfg, model_config(model), {k: v for k, v in model.state_dict().items() if ".lora_" in k})
    assert torch.equal(torch.get_rng_state(), rng)
    assert (out(sampler, x, t, text) - ref).abs().max() <= ATOL


def test_merge_lora_writes_the_merged_model_and_never_overwrites(assets, trained, tmp_path, capsys):
    from stdit.cli import main

    summary, model, _ = trained
    x, t, text = inputs()
    ref = out(model, x, t, text)
    before = {p.name: p.read_bytes() for p in (assets / "base").iterdir()}
    assert main(["merge-lora", summary["model_dir"], str(tmp_path / "merged")]) == 0  # base named by the adapter
    assert "wrote" in capsys.readouterr().out
    merged = StDiT.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert (out(merged, x, t, text) - ref).abs().max() <= ATOL
    assert main(["merge-lora", summary["lora_file"], str(tmp_path / "half"), "--base", str(assets / "base"),
                 "--scale", "0.5"]) == 0
    half = out(StDiT.from_pretrained(tmp_path / "half").eval(), x, t, text)
    base = out(StDiT.from_pretrained(assets / "base").eval(), x, t, text)
    assert 0 < (half - base).abs().max() < (ref - base).abs().max()
    for target in (tmp_path / "merged", assets / "base"):  # an existing directory, the base itself included
        assert main(["merge-lora", summary["model_dir"], str(target)]) == 2
        assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (assets / "base").iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))



@pytest.mark.parametrize("mode, extra", [("fsdp", ["train.grad_accum=2"]), ("fsdp", ["parallel.sp=2"]),
                                         ("ddp", [])], ids=["fsdp", "fsdp-sp2", "ddp"])
def test_two_rank_lora_matches_one_process(assets, tmp_path, mode, extra):
    """FSDP2 with the frozen base sharded and the adapters trained sharded (EMA, checkpoints and accumulation on),
    Ulysses sequence parallelism over the 2 ranks, or DDP: the same losses, gradient norms and adapter as one
    process."""
    cfg = tmp_path / "cfg.yaml"
    sp = "parallel.sp=2" in extra
    per_rank = 4 if sp else 2  # sequence-parallel ranks share their samples: the global batch stays 4
    # Random A and B (not B = 0): every adapter weight gets a gradient from step 1, so Adam's normalized step does not
    # turn the reduction-order rounding of whole zero-initialized gradients into differences.
    run = dict(steps=4, ckpt_every=2, ema_decay=0.9, lora={"rank": 4, "init_lora_weights": False})
    cfg.write_text(yaml.safe_dump(raw_config(assets, tmp_path / "unused", batch_size=per_rank, **run)))
    printed = _torchrun(cfg, tmp_path / "dist", [f"parallel.mode={mode}", *extra])
    assert f"on 2 x cpu ({mode}, {'sp=2, ' if sp else ''}fp32)" in printed and "LoRA rank 4" in printed
    accum = [e for e in extra if "grad_accum" in e]
    single = train(lora_run(assets, tmp_path / "single", accum, batch_size=4, **run))
    dist_log, one_log = read_log(tmp_path / "dist" / "log.jsonl"), read_log(tmp_path / "single" / "log.jsonl")
    assert len(dist_log) == len(one_log) == 4
    for a, b in zip(dist_log, one_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wd = load_file(str(tmp_path / "dist" / "model" / WEIGHT_NAME))
    w1 = load_file(single["lora_file"])
    assert set(wd) == set(w1) and len(w1) == 40
    for k in w1:  # Adam's step is ~lr whatever the gradient: one near-zero gradient's rounding can move its weight
        torch.testing.assert_close(wd[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)  # by up to lr/100 = 1e-4
    ckpt = list_checkpoints(tmp_path / "dist" / "checkpoints")[-1]
    assert all(".lora_" in k for k in read_dcp_metadata(ckpt).state_dict_metadata if k.startswith("model."))


def test_activation_checkpointing_trains_the_same_adapter(assets, tmp_path):
    """Checkpointed blocks (full recompute, or keeping the self-attention outputs) recompute the adapters too."""
    runs = {name: train(lora_run(assets, tmp_path / name, extra, steps=3, lora={"rank": 4, "init_lora_weights": False}))
            for name, extra in (("plain", []),
                                ("full", ["train.activation_checkpointing=true",
                                          "train.checkpoint_keep_attention=false"]),
                                ("keep", ["train.activation_checkpointing=true"]))}
    ref, ref_log = load_file(runs["plain"]["lora_file"]), read_log(tmp_path / "plain" / "log.jsonl")
    for name in ("full", "keep"):
        assert [r["loss"] for r in read_log(tmp_path / name / "log.jsonl")] == pytest.approx(
            [r["loss"] for r in ref_log], rel=1e-5), name
        w = load_file(runs[name]["lora_file"])
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)



def test_sigkill_at_a_random_step_resumes_to_the_same_loss_curve(assets, tmp_path):
    steps, every = 40, 4
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(assets, tmp_path / "unused", steps=steps, ckpt_every=every,
                                             ema_decay=0.9, lora={"rank": 4, "dropout": 0.1})))
    reference = _run(cfg, tmp_path / "ref")
    killed = _run(cfg, tmp_path / "killed")
    kill_at = random.Random(os.getpid()).randint(every + 1, steps // 2)
    log = tmp_path / "killed" / "log.jsonl"
    sigkill_at_step(killed, log, kill_at)
    ckpts = list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert ckpts, "no checkpoint was written before the kill"
    for c in ckpts:
        verify_checkpoint(c)

    resumed = _run(cfg, tmp_path / "killed")
    printed, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, printed
    assert "resumed from" in printed
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out
    ref, got = read_log(tmp_path / "ref" / "log.jsonl"), read_log(log)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref], f"killed at step {kill_at}"
    a = load_file(str(tmp_path / "ref" / "model" / WEIGHT_NAME))
    b = load_file(str(tmp_path / "killed" / "model" / WEIGHT_NAME))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_adapter_and_allows_a_new_dropout(assets, tmp_path, capsys):
    train(lora_run(assets, tmp_path, ["train.steps=2", "train.ckpt_every=1"]))
    for override, message in (("train.lora.rank=8", r"train.lora.rank: 4 -> 8"),
                              ("train.lora=null", r"turns LoRA off"),
                              ("train.lora.target_modules=[to_q]", r"train.lora.target_modules: \[")):
        with pytest.raises(CheckpointError, match=message):
            train(lora_run(assets, tmp_path, ["train.steps=4", override]))
    train(lora_run(assets, tmp_path, ["train.steps=3", "train.lora.dropout=0.2"]))
    assert "train.lora:" in capsys.readouterr().out and len(read_log(tmp_path / "log.jsonl")) == 3


@pytest.mark.parametrize("overrides, message", [
    (["train.lora.rank=0"], r"train.lora.rank: 0 is out of range; valid range is \[1, inf\]"),
    (["train.lora.rnak=4"], r"unknown key\(s\) train.lora.rnak; valid keys in 'train.lora': rank, alpha"),
    (["train.lora=4"], r"train.lora: got 4; expected a mapping of rank, alpha"),
    (["train.lora.init_lora_weights=pissa"], r"init_lora_weights='pissa' is not one of true, false, gaussian, orth"),
    (["train.lora.init_lora_weights=orthogonal", "train.lora.rank=3"], r"orthogonal needs an even train.lora.rank"),
    (["train.lora.target_modules=[]"], r"train.lora.target_modules must be a non-empty list"),
    (["train.lora.dropout=1"], r"train.lora.dropout must be below 1"),
    (["train.lora.alpha=0"], r"train.lora.alpha must be positive"),
    (["model.num_layers=2"], r"model.pretrained takes the architecture from the checkpoint; remove model.num_layers"),
    (["model.pretrained=null", "model.num_layers=1"], r"model.pretrained: got None; expected a directory"),
])
def test_bad_lora_settings_are_one_clear_error(assets, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        lora_run(assets, tmp_path, overrides)


def test_lora_needs_a_pretrained_model_and_targets_that_exist(assets, tmp_path):
    raw = raw_config(assets, tmp_path)
    raw["model"] = {"num_layers": 1}
    with pytest.raises(ValueError, match=r"train.lora finetunes a trained model: set model.pretrained"):
        build_config(raw)
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no module of this model; its linear layers .*attn1.to_q"):
        train(lora_run(assets, tmp_path, ["train.lora.target_modules=[to_q, to_qq]"]))
    with pytest.raises(FileNotFoundError, match="model.pretrained '/no/such/dir': no such local file or directory"):
        train(lora_run(assets, tmp_path, ["model.pretrained=/no/such/dir"]))


def test_full_finetuning_from_a_pretrained_model(assets, tmp_path):
    """model.pretrained without train.lora: every weight trains, starting from the checkpoint's, and model/ is a
    full save_pretrained directory."""
    summary = train(lora_run(assets, tmp_path, ["train.lora=null", "train.steps=2", "train.lr=1e-3"]))
    tuned = StDiT.from_pretrained(summary["model_dir"]).state_dict()
    base = StDiT.from_pretrained(assets / "base").state_dict()
    assert set(tuned) == set(base)
    assert all((tuned[k] - base[k]).abs().max() < 0.05 for k in base)  # moved from the pretrained weights ...
    assert sum(not torch.equal(tuned[k], base[k]) for k in base) > len(base) // 2  # ... and most of them did


@pytest.mark.parametrize("name", ["lora-wan2.1-t2v-1.3b", "lora-wan2.1-t2v-14b"])
def test_recipe_configs(name):
    cfg = load_train_config(name, ["data.root=latents/"])
    assert cfg.model["pretrained"].startswith("Wan-AI/Wan2.1-T2V-") and cfg.data.kind == "latents"
    assert cfg.train.lora.rank == 32 and cfg.train.precision == "bf16" and cfg.train.activation_checkpointing
    assert cfg.train.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def test_stdit_push_uploads_the_adapter_and_it_loads_from_the_hub(assets, trained, monkeypatch, hub_cache, capsys):
    import huggingface_hub as hf

    from stdit.cli import main
    from test_hub import _fake_upload_to_cache

    summary, model, _ = trained
    created = []
    monkeypatch.setattr(hf, "create_repo", lambda repo_id, **kw: created.append((repo_id, kw)))
    monkeypatch.setattr(hf, "upload_folder", _fake_upload_to_cache(Path(hub_cache)))
    assert main(["push", summary["model_dir"], "stdit-test/lora-push", "--token", "hf_test", "--private"]) == 0
    assert "pushed the LoRA adapter" in capsys.readouterr().out
    assert created == [("stdit-test/lora-push", {"private": True, "token": "hf_test", "exist_ok": True})]
    snap = next((Path(hub_cache) / "models--stdit-test--lora-push" / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors",
                                                     "scheduler_config.json"]
    assert 'load_lora_weights("stdit-test/lora-push")' in (snap / "README.md").read_text()
    x, t, text = inputs()
    ours = StDiT.from_pretrained(assets / "base").eval()
    ours.load_lora_adapter("stdit-test/lora-push", weight_name=WEIGHT_NAME)  # from the Hub cache, offline
    assert (out(ours, x, t, text) - out(model, x, t, text)).abs().max() <= ATOL


def test_stdit_push_refuses_a_file_that_is_not_a_lora(tmp_path, monkeypatch, capsys):
    import huggingface_hub as hf
    from safetensors.torch import save_file

    from stdit.cli import main

    monkeypatch.setattr(hf, "upload_folder", lambda **kw: pytest.fail("uploaded a file that is not a LoRA"))
    (tmp_path / "m").mkdir()
    save_file({"proj_out.weight": torch.zeros(2, 2)}, str(tmp_path / "m" / WEIGHT_NAME))
    assert main(["push", str(tmp_path / "m"), "stdit-test/not-a-lora", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nothing was uploaded" in err, err
