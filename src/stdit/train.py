"""Train a StDiT with rectified flow: ``torchrun --nproc_per_node=N -m stdit.train --config X.yaml key.sub=value``.

The same command without torchrun (``python -m stdit.train`` or ``stdit train``) runs in one process, on the
CPU too. Every random draw of a sample (noise, timestep, condition dropout) is seeded by the sample's position in
the global batch stream, so a run gives the same losses on 1 or N ranks and after a resume.

Writes to ``train.output_dir``: ``log.jsonl``, ``checkpoints/``, ``samples/``, ``loss.png``, ``config.yaml`` and
the final ``model/`` (``StDiT.from_pretrained`` loads it; it also holds the sampling scheduler's config);
``train.tracker`` also sends each log record to TensorBoard (``tensorboard/``) or wandb. With
``train.lora`` (finetuning ``model.pretrained`` through peft, see :mod:`stdit.lora`) only the adapters train and are
checkpointed, and ``model/`` holds the adapter in diffusers' LoRA format instead.

Re-running into an output directory resumes its newest good checkpoint. It refuses, changing nothing, when another
trainer holds the directory (``.lock``), when every checkpoint is corrupt, when it holds a previous run but no
checkpoint (or ``train.resume=none`` was given), and when the checkpoint's model differs from the config's; other
changed settings apply from the next step and are listed when the run resumes. SIGINT/SIGTERM stop after the
current step with a checkpoint and one line saying how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from stdit.parallel.checkpoint import (CheckpointError, checkpoint_dir, find_resume, list_checkpoints,
                                       load_checkpoint, save_checkpoint)
from stdit.parallel.dist import (DistInfo, all_reduce_mean, barrier, broadcast_object, cleanup, data_parallel_mesh,
                                 init_distributed, resolve_mode, wrap_model)
from stdit.train_config import Config, describe, load_train_config, resume_report

# train settings held in the optimizer/scheduler state of a checkpoint: set again from the config on a change
_OPTIM_KEYS = ("train.lr", "train.betas", "train.weight_decay", "train.warmup_steps", "train.steps",
               "train.min_lr_ratio")


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after a step, with a checkpoint of that step (the message says where)."""

    def __init__(self, message: str, signum: int, is_main: bool):
        super().__init__(message)
        self.signum, self.is_main = signum, is_main


def _say(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


def _per_sample_draws(shape, uids: list[int], seed: int, cond_dropout: float, first_frame_prob: float = 0.0):
    """Noise, a standard-normal timestep draw, a dropout coin and a first-frame coin for each sample, seeded by its
    global id."""
    noise, u, drop, first = [], [], [], []
    for uid in uids:
        g = torch.Generator().manual_seed(seed * 1_000_003 + uid)
        noise.append(torch.randn(shape, generator=g))
        u.append(torch.randn(1, generator=g))
        drop.append(torch.rand(1, generator=g) < cond_dropout)
        # drawn last and only when used, so runs without it draw exactly what they drew before
        first.append(torch.rand(1, generator=g) < first_frame_prob if first_frame_prob > 0
                     else torch.zeros(1, dtype=torch.bool))
    return torch.stack(noise), torch.cat(u), torch.cat(drop), torch.cat(first)


def _conditioning(core, batch: dict, x0: torch.Tensor, drop: torch.Tensor, device) -> dict:
    cfg = core.config
    kwargs = {}
    b = x0.shape[0]
    drop = drop.to(device)
    if cfg.num_classes:
        labels = batch.get("class_label")
        labels = labels.to(device) if labels is not None else torch.full((b,), cfg.num_classes, device=device)
        if labels.max() >= cfg.num_classes:
            raise ValueError(f"the data has class label {int(labels.max())} but model.num_classes={cfg.num_classes}.")
        kwargs["class_labels"] = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels).long()
    if cfg.text_dim is not None:
        if "prompt_embeds" not in batch:
            raise ValueError("model.text_dim is set but the data has no text features; use data.kind=latents "
                             "(written by `stdit encode`) or set model.text_dim: null.")
        emb = batch["prompt_embeds"].to(device)
        kwargs["encoder_hidden_states"] = emb * (~drop).view(-1, 1, 1).to(emb.dtype)
        kwargs["encoder_attention_mask"] = batch["prompt_mask"].to(device)
    if cfg.condition_channels:
        kwargs["condition"] = core.i2v_condition(x0[:, :, :1], x0.shape[2])
    elif "condition" in batch:  # Wan 2.1 I2V: the condition input `stdit encode --image-condition` stored
        kwargs["input_condition"] = batch["condition"].to(device)
    if cfg.image_dim is not None:
        # kept under condition dropout: Wan's unconditional branch drops the text, not the image
        image = batch["image_embeds"].to(device)
        if cfg.pos_embed_seq_len:  # first-last frame: one row per image, as the pipeline passes them ([2B, L, D])
            image = image.reshape(-1, cfg.pos_embed_seq_len // 2, image.shape[-1])
        kwargs["encoder_hidden_states_image"] = image
    return kwargs


def check_i2v_data(mc, item: dict, x_key: str) -> None:
    """One clear error when the data does not carry what the model's inputs need. A Wan 2.1 I2V model
    (``in_channels`` > ``out_channels``, no ``condition_channels``) reads latents of ``out_channels`` channels plus the
    stored condition input of the rest, and, with ``image_dim``, CLIP image features."""
    x = item[x_key]
    cond = mc.in_channels - (mc.out_channels or mc.in_channels) if not mc.condition_channels else 0
    encode_hint = ("encode the data with `stdit encode --vae ... --image-encoder <CLIP dir> --image-condition first` "
                   "(first-last for a first-last-frame model)")
    if cond > 0:
        if "condition" not in item:
            raise ValueError(f"model.in_channels={mc.in_channels} with out_channels={mc.out_channels} is Wan 2.1 "
                             f"image-to-video: its input is the noisy latents plus a {cond}-channel condition, which "
                             f"the data does not have; {encode_hint}.")
        if item["condition"].shape[0] != cond or item["condition"].shape[1:] != x.shape[1:]:
            raise ValueError(f"the data's condition input is {list(item['condition'].shape)} but the model takes "
                             f"{cond} condition channels over the latents' {list(x.shape[1:])}; {encode_hint} with "
                             "the model's VAE.")
    expected = mc.in_channels - cond
    if x.shape[0] != expected:
        raise ValueError(f"the data has {x.shape[0]} channels but the model takes {expected} "
                         f"(model.in_channels={mc.in_channels}{f', of which {cond} condition' if cond else ''}); make "
                         "them match.")
    if mc.image_dim is not None:
        if "image_embeds" not in item:
            raise ValueError(f"model.image_dim={mc.image_dim} (Wan 2.1 image-to-video's CLIP image branch) needs "
                             f"image features in the data; {encode_hint}.")
        if item["image_embeds"].shape[-1] != mc.image_dim:
            raise ValueError(f"the data's image features are {item['image_embeds'].shape[-1]}-dimensional but "
                             f"model.image_dim={mc.image_dim}; encode them with the model's image encoder.")
        n = mc.pos_embed_seq_len
        if n is not None and item["image_embeds"].shape[0] != n:
            raise ValueError(f"model.pos_embed_seq_len={n} (first-last-frame) takes {n} image tokens per clip, the "
                             f"data has {item['image_embeds'].shape[0]}; encode with --image-condition first-last.")


def _full_weights(wrapped, ema, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights for sampling and export (EMA if kept; ``trainable_only``: a LoRA run's adapters); a
    collective, so every rank calls it."""
    if ema is not None:
        return ema.full_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))
    return {k: v.float() for k, v in sd.items()}


def write_samples(cfg: Config, model, dataset, out_dir: Path, tag: str, shift: float, device) -> list[Path]:
    """Sample a grid of videos (one row per class) and write it in each of ``sample.formats``."""
    from stdit.export import export_video, video_grid
    from stdit.pipeline import StDiTPipeline, make_scheduler

    sc, mc = cfg.sample, model.config
    if mc.image_dim is not None or (not mc.condition_channels and mc.in_channels > (mc.out_channels or 0) > 0):
        print(f"no {tag} samples: a Wan 2.1 image-to-video model samples through diffusers' WanImageToVideoPipeline "
              "with its image encoder and VAE (see the README's 'Use with diffusers'); the trained model is exported "
              "as usual.", flush=True)
        return []
    vae = None
    if sc.vae:
        from diffusers import AutoModel

        vae = AutoModel.from_pretrained(sc.vae).to(device).eval()
    pipe = StDiTPipeline(model.to(device), make_scheduler(sc.scheduler, shift), vae)
    pipe.set_progress_bar_config(disable=True)
    n = sc.videos_per_class
    kwargs = {}
    if mc.num_classes:
        kwargs["class_labels"] = [c for c in range(mc.num_classes) for _ in range(n)]
    else:
        kwargs["batch_size"] = n
    if mc.text_dim is not None or mc.condition_channels:
        from stdit.data.loader import collate

        items = collate([dataset[i] for i in range(min(n, len(dataset)))])
        if mc.text_dim is not None:
            kwargs["prompt_embeds"], kwargs["prompt_attention_mask"] = items["prompt_embeds"], items["prompt_mask"]
        if mc.condition_channels:
            if "video" not in items:
                return []
            kwargs["image"] = (items["video"][:, :, 0] + 1) / 2
        kwargs.pop("class_labels", None)
        kwargs.pop("batch_size", None)
    frames = pipe(num_frames=cfg.data.num_frames, height=cfg.data.height, width=cfg.data.width,
                  num_inference_steps=sc.num_inference_steps, guidance_scale=sc.guidance_scale,
                  generator=torch.Generator().manual_seed(sc.seed), output_type="pt", **kwargs).frames
    grid = video_grid(list(frames.cpu()), cols=n if mc.num_classes else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [export_video(grid, out_dir / f"{tag}.{fmt}", fps=sc.fps, scale=sc.scale) for fmt in sc.formats]
    if sc.compare and cfg.data.kind == "synthetic" and cfg.data.class_by == "shape" and "class_labels" in kwargs:
        from stdit.data.synthetic import report_samples

        try:  # a measurement must not cost the trained model, which is exported after the samples
            png, m = report_samples(frames, kwargs["class_labels"], dataset, out_dir, tag)
        except Exception as e:
            print(f"could not compare the {tag} samples with the data: {e!r}", flush=True)
        else:
            paths.append(png)
            print(f"samples vs data: shape recognized in {m['shape']:.0%} of clips, one object in "
                  f"{m['one_object']:.0%} of frames, palette colour in {m['palette']:.0%}, the data's speed in "
                  f"{m['speed']:.0%} of steps ({out_dir / f'{tag}_metrics.json'})", flush=True)
    return paths


def train(cfg: Config) -> dict:
    """Run training as configured; returns a summary (paths, first/last loss) on every rank."""
    from stdit.train_utils import ManualGC

    info = init_distributed(cfg.parallel.backend)
    try:
        with _locked(Path(cfg.train.output_dir), info), ManualGC(cfg.train.gc_every) as collector:
            summary = _train(cfg, info, collector)
    except BaseException:
        cleanup(wait_for_all=False)
        raise
    cleanup()
    return summary


@contextlib.contextmanager
def _locked(out: Path, info: DistInfo):
    """Hold ``out``'s lock (rank 0 takes it; every rank raises the same error when another trainer has it)."""
    from stdit.train_utils import OutputDirLock, OutputDirLocked

    lock, error = None, None
    if info.is_main:
        try:
            lock = OutputDirLock(out, log=lambda m: _say(info, m)).__enter__()
        except OutputDirLocked as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise OutputDirLocked(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _previous_run(out: Path, ckpt_root: Path) -> str | None:
    """What of an earlier run ``out`` holds that starting over would truncate or overwrite, if anything."""
    from stdit.train_utils import read_log

    found = []
    if list_checkpoints(ckpt_root):
        found.append(f"checkpoints {', '.join(c.name for c in list_checkpoints(ckpt_root))}")
    records = read_log(out / "log.jsonl")
    if records:
        found.append(f"log.jsonl with {len(records)} steps")
    if (out / "model").exists():
        found.append("model/")
    return ", ".join(found) or None


def _plan_resume(cfg: Config, info: DistInfo, out: Path, ckpt_root: Path, global_batch: int):
    """The checkpoint to resume (or None) and the notes on what changed since it; refusals raise on every rank."""
    resume_from = find_resume(ckpt_root, cfg.train.resume, info, log=lambda m: _say(info, m))
    error, notes, changed = None, [], []
    if info.is_main:
        if resume_from is None:
            held = _previous_run(out, ckpt_root)
            if held:
                why = ("train.resume=none starts a new run" if cfg.train.resume == "none"
                       else "there is no checkpoint in it to resume from")
                error = (f"{out} already holds a run ({held}) and {why}; starting over would truncate or overwrite "
                         "it. Nothing was changed. Pick a new train.output_dir (or move this one away).")
        else:
            meta = json.loads((resume_from / "meta.json").read_text())
            saved = meta.get("config")
            if saved is None and (out / "config.yaml").is_file():  # checkpoints written before configs were kept
                saved = yaml.safe_load((out / "config.yaml").read_text())
            if saved:
                st = saved.get("train", {})
                saved_world = meta.get("world_size")
                saved_gb = (st.get("batch_size", 0) * st.get("grad_accum", 1)
                            * (saved_world // saved.get("parallel", {}).get("sp", 1))) if saved_world else None
                refusals, notes = resume_report(saved, cfg.to_dict(), int(meta["step"]), saved_gb, global_batch,
                                                saved_world, info.world_size)
                if refusals:
                    error = (f"refusing to resume {resume_from}: it was trained with a different config: "
                             + "; ".join(refusals) + ". Nothing was changed. Put these back to continue that run, "
                             "or start the new one in a new train.output_dir (train.resume=none).")
                changed = [n.split(":")[0] for n in notes]
    error, notes, changed = broadcast_object((error, notes, changed))
    if error:
        raise CheckpointError(error)
    return resume_from, notes, changed


def _stop_requested(stopper, info: DistInfo, device) -> int:
    """The signal that asked any rank to stop (0: none); a collective under torchrun, so all ranks stop together."""
    if not info.distributed:
        return stopper.signum
    import torch.distributed as dist

    flag = torch.tensor([stopper.signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class Tracker:
    """Where each log record goes besides ``log.jsonl`` (``train.tracker``, main rank only); this one: nowhere."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard(Tracker):
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class _Wandb(Tracker):
    def __init__(self, out: Path, cfg: Config):
        import wandb

        self.wandb = wandb
        wandb.init(project="stdit", dir=str(out), config=cfg.to_dict())

    def log(self, record: dict) -> None:
        self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        self.wandb.finish()


# train.tracker -> the module it needs and the pip package that provides it
_TRACKER_NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def _require_tracker(name: str | None) -> None:
    """Raise, before any work starts, when the chosen tracker's package is not installed."""
    if name is None:
        return
    module, package = _TRACKER_NEEDS[name]
    try:
        importlib.import_module(module)
    except ImportError as e:
        via = " (torch's SummaryWriter writes through it)" if name == "tensorboard" else ""
        raise ImportError(f"train.tracker={name} needs the {package} package{via}: pip install {package} "
                          "(or set train.tracker=null).") from e


def _make_tracker(name: str | None, out: Path, cfg: Config) -> Tracker:
    if name == "tensorboard":
        return _TensorBoard(out)
    if name == "wandb":
        return _Wandb(out, cfg)
    return Tracker()


class _RunLog:
    """``log.jsonl`` (flushed after every record, so a killed run keeps its steps) and the tracker (main rank)."""

    def __init__(self, path: Path, tracker: Tracker):
        self.file, self.tracker = open(path, "a"), tracker

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tracker.log(record)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.tracker.close()


@dataclass
class _Run:
    """What one run trains with, the same on every rank: built by :func:`_setup`, used by every step after."""

    cfg: Config
    info: DistInfo
    precision: str
    mode: str
    dp_rank: int
    dp_world: int
    model: torch.nn.Module  # the model itself; ``wrapped`` is it under DDP/FSDP (the same object without)
    arch: dict
    tile: Any
    wrapped: torch.nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    flow: Any
    dataset: Any
    sampler: Any
    x_key: str
    patch: tuple
    sample_shift: float
    data_state: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})  # where the data stream is
    stream: Any = None
    autocast: Any = None

    @property
    def tc(self):
        return self.cfg.train

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def lora(self) -> bool:
        return self.cfg.train.lora is not None


def _train(cfg: Config, info: DistInfo, collector) -> dict:
    from stdit.train_utils import StopOnSignal

    tc = cfg.train
    out = Path(tc.output_dir)
    precision = ("bf16" if info.device.type == "cuda" else "fp32") if tc.precision == "auto" else tc.precision
    mode = resolve_mode(cfg.parallel.mode, info)
    sp = cfg.parallel.sp
    if sp > 1 and not info.distributed:  # checked before any work starts
        raise ValueError(f"parallel.sp={sp} needs a multiple of {sp} processes: launch with "
                         f"torchrun --nproc_per_node=N (N divisible by {sp}).")
    if sp > 1 and "pretrained" not in cfg.model:
        _check_sp(sp, cfg.model, info.world_size)
    _require_tracker(tc.tracker)
    # ranks of one sequence-parallel group train on the same samples: data parallelism is over groups
    dp_rank, dp_world = info.rank // sp, info.world_size // sp
    t_start = time.time()
    resume_from, changes, changed_keys = _plan_resume(cfg, info, out, out / "checkpoints",
                                                      tc.batch_size * tc.grad_accum * dp_world)

    run = _setup(cfg, info, precision, mode, dp_rank, dp_world)
    step = _resume(run, resume_from, changes, changed_keys) if resume_from is not None else 0
    saved_step = step if resume_from is not None else None
    _start_outputs(run, fresh=resume_from is None)
    bar = _start_stream(run, step)

    log = _RunLog(out / "log.jsonl", _make_tracker(tc.tracker, out, cfg)) if info.is_main else None
    run.wrapped.train()
    try:
        with StopOnSignal() as stopper:
            while step < tc.steps:
                t0 = time.time()
                loss, grad_norm = _train_step(run, step)
                step += 1
                collector.step(step)
                loss_value = float(all_reduce_mean(loss))
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step}; lower train.lr or check "
                                             "the data.")
                _log_step(run, log, bar, step, loss_value, grad_norm, time.time() - t0, t_start)
                if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.steps:
                    _save(run, step)
                    saved_step = step
                signum = _stop_requested(stopper, info, run.device)
                if signum:  # log and tracker closed (in finally) after the checkpoint
                    where = checkpoint_dir(run.ckpt_root, step) if saved_step == step else _save(run, step)
                    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at step {step} of {tc.steps}; "
                                          f"checkpoint {where}. To resume, run the same command again "
                                          "(train.resume=auto continues from it).", signum, info.is_main)
                if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                    _sample(run, f"step_{step:08d}")
    finally:  # the tracker is finished however the loop ends (a signal, an error)
        bar.close()
        if log is not None:
            log.close()

    if tc.ckpt_every and step != saved_step:  # re-running a finished run: its checkpoint is already this state
        _save(run, step)
    return _export(run, step, t_start)


def _setup(cfg: Config, info: DistInfo, precision: str, mode: str, dp_rank: int, dp_world: int) -> _Run:
    """Model (seeded), its DDP/FSDP wrapper, EMA, optimizer, schedule, flow, dataset and sampler; checks the data."""
    from stdit.data.buckets import BucketBatchSampler
    from stdit.data.loader import bucket_ids, build_dataset
    from stdit.diffusion import RectifiedFlow
    from stdit.lora import build_model, model_config
    from stdit.train_utils import EMA, warmup_cosine

    tc, device, sp = cfg.train, info.device, cfg.parallel.sp
    torch.manual_seed(tc.seed)
    model = build_model(cfg, precision)
    arch = model_config(model)
    if sp > 1 and "pretrained" in cfg.model:  # a pretrained model's heads are known once it is loaded
        _check_sp(sp, arch, info.world_size)
    if tc.attention_backend:
        model.set_attention_backend(tc.attention_backend)
    tile = None
    if tc.tile_attention is not None:
        from stdit.sparse import TileAttention

        tile = TileAttention(tile=tc.tile_attention.tile, window=tc.tile_attention.window)
    if tc.fp8_linears:
        from stdit.fp8 import convert_fp8_training

        model.to(device)  # the capability check reads the model's device
        convert_fp8_training(model, tc.fp8_linears)
    if tc.activation_checkpointing:
        model.enable_gradient_checkpointing(keep_attention=tc.checkpoint_keep_attention,
                                             keep_matmuls=tc.checkpoint_keep_matmuls)
    if sp > 1:
        from stdit.parallel.ulysses import new_sp_group

        model.enable_sequence_parallel(new_sp_group(sp))
    model.to(device)
    if tc.compile:
        model.compile_blocks()
    mesh = None
    if mode == "fsdp":
        mesh = data_parallel_mesh(info, cfg.parallel.sp, cfg.parallel.dp_shard, cfg.parallel.dp_replicate)
    wrapped = wrap_model(model, info, mode, torch.bfloat16 if precision == "bf16" else None,
                         cfg.parallel.reshard_after_forward, mesh)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup) if tc.ema_decay > 0 else None
    # torch's fused AdamW: one kernel over all parameters instead of a loop of ops per parameter (on the tiny CPU
    # model 3.4 ms against 10.4 ms a step); FSDP2's sharded DTensors keep the default implementation
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=tc.lr,
                                  betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                  fused=True if mode != "fsdp" else None)
    scheduler = warmup_cosine(optimizer, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    flow = RectifiedFlow(**asdict(cfg.diffusion))

    dataset = build_dataset(cfg.data)
    sampler = BucketBatchSampler(bucket_ids(dataset), tc.batch_size, seed=tc.seed, rank=dp_rank,
                                 world_size=dp_world, grad_accum=tc.grad_accum)
    first = dataset[0]
    x_key = "video" if "video" in first else "latents"
    check_i2v_data(model.config, first, x_key)
    patch = tuple(model.config.patch_size)
    sample_shift = flow.shift_for(tuple(first[x_key].shape), patch)
    if tc.first_frame_prob > 0 and (patch[0] != 1 or model.config.condition_channels or "condition" in first):
        why = (f"model.patch_size[0]={patch[0]} puts the first latent frame in one token with the next ones"
               if patch[0] != 1 else "the model is Wan 2.1-style image-to-video, which takes the first frame as its "
               "condition input already")
        raise ValueError(f"train.first_frame_prob={tc.first_frame_prob} (Wan 2.2 TI2V's clean first frame) needs a "
                         f"model with temporal patch 1 and no condition channels: {why}. Set "
                         "train.first_frame_prob=0.")
    return _Run(cfg, info, precision, mode, dp_rank, dp_world, model, arch, tile, wrapped, ema, optimizer, scheduler,
                flow, dataset, sampler, x_key, patch, sample_shift)


def _resume(run: _Run, resume_from: Path, changes: list[str], changed_keys: list[str]) -> int:
    """Load the checkpoint (model, optimizer, EMA, schedule, data position, RNG) into ``run``; returns its step."""
    tc, device = run.tc, run.device
    meta, rng = load_checkpoint(resume_from, run.wrapped, run.optimizer, run.info, run.ema, trainable_only=run.lora)
    run.scheduler.load_state_dict(meta["scheduler"])
    step, run.data_state = int(meta["step"]), meta["data"]
    if any(k in changed_keys for k in _OPTIM_KEYS):
        _apply_optim_settings(run.optimizer, run.scheduler, tc)
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    _say(run.info, f"resumed from {resume_from} at step {step}" + (
        f"; changed since that checkpoint (applies from step {step + 1}):\n  " + "\n  ".join(changes)
        if changes else ""))
    return step


def _start_outputs(run: _Run, fresh: bool) -> None:
    """``config.yaml`` and, for a new run, an empty ``log.jsonl`` (rank 0 writes; every rank waits for it)."""
    if run.info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
        if fresh:
            (run.out / "log.jsonl").write_text("")
    barrier()


def _start_stream(run: _Run, step: int):
    """Start the batch stream where the data state points, say what trains, and return the progress bar."""
    from tqdm.auto import tqdm

    from stdit.data.loader import batch_stream

    cfg, info, tc, device, mode, sp = run.cfg, run.info, run.tc, run.device, run.mode, run.cfg.parallel.sp
    run.stream = batch_stream(run.dataset, run.sampler, run.data_state["epoch"], run.data_state["position"],
                              cfg.data.num_workers)
    run.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if run.precision == "bf16" and mode != "fsdp"
                    else contextlib.nullcontext())
    gbs = tc.batch_size * run.dp_world
    n_all = sum(p.numel() for p in run.model.parameters())
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    frozen = f" (LoRA rank {tc.lora.rank}; {(n_all - n_params) / 1e6:.2f}M frozen)" if run.lora else ""
    _say(info, f"training {n_params / 1e6:.2f}M parameters{frozen} on {info.world_size} x {device.type} ({mode}, "
               f"{f'sp={sp}, ' if sp > 1 else ''}"
               f"{run.precision}), global batch {gbs * tc.grad_accum}, {tc.steps} steps -> {run.out}")
    return tqdm(total=tc.steps, initial=step, disable=not (info.is_main and tc.progress), desc="train",
                dynamic_ncols=True)


def _train_step(run: _Run, step: int):
    """One optimizer step (``step`` done before it) over ``grad_accum`` micro-batches, then the EMA update.

    Returns this rank's mean loss (a tensor; the caller averages it over ranks) and the clipped gradient norm.
    """
    tc, device, model, wrapped, flow, mode = run.tc, run.device, run.model, run.wrapped, run.flow, run.mode
    if run.tile is not None and (step >= tc.tile_attention.dense_steps) != (model._tile_switch is not None):
        model.set_tile_attention(run.tile)  # from the start, or after the dense curriculum steps
    loss_sum = torch.zeros((), device=device)
    for micro in range(tc.grad_accum):
        # Fetching may start a DataLoader iterator, which draws its seed from the global RNG; isolated, that
        # RNG is the model's alone (LoRA dropout), so a resumed run draws the same masks as an unbroken one.
        with torch.random.fork_rng(devices=[]):
            batch, run.data_state = next(run.stream)
        x0 = batch[run.x_key].to(device, torch.float32)
        base = ((step * tc.grad_accum + micro) * run.dp_world + run.dp_rank) * tc.batch_size
        uids = list(range(base, base + x0.shape[0]))
        noise, u, drop, keep_first = _per_sample_draws(tuple(x0.shape[1:]), uids, tc.seed,
                                                       tc.cond_dropout, tc.first_frame_prob)
        t = flow.t_from_normal(u, flow.shift_for(tuple(x0.shape), run.patch)).to(device)
        kwargs = _conditioning(model, batch, x0, drop, device)
        last = micro == tc.grad_accum - 1
        if mode == "fsdp":
            wrapped.set_requires_gradient_sync(last)
        sync = wrapped.no_sync() if mode == "ddp" and not last else contextlib.nullcontext()
        with sync, run.autocast:
            loss = flow.loss(wrapped, x0, noise=noise.to(device), t=t, patch_size=run.patch,
                             clean_first_frame=keep_first if tc.first_frame_prob > 0 else None, **kwargs)
            (loss / tc.grad_accum).backward()
        loss_sum += loss.detach()
    clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(step)
    return loss_sum / tc.grad_accum, grad_norm


def _log_step(run: _Run, log: _RunLog | None, bar, step: int, loss_value: float, grad_norm, dt: float,
              t_start: float) -> None:
    """Write step ``step``'s record (every ``log_every`` steps and the last; rank 0) and move the progress bar."""
    tc = run.tc
    gbs = tc.batch_size * run.dp_world
    if log is not None and (step % tc.log_every == 0 or step == tc.steps):
        log.write({"step": step, "loss": loss_value, "lr": run.scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "samples_per_s": gbs * tc.grad_accum / dt,
                   "elapsed_s": time.time() - t_start})
    bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{gbs * tc.grad_accum / dt:.1f}")
    bar.update()


def _save(run: _Run, at_step: int) -> Path:
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return save_checkpoint(run.ckpt_root, at_step, run.wrapped, run.optimizer, run.info, run.ema, rng=rng,
                           keep=run.tc.keep_ckpts, extra={"scheduler": run.scheduler.state_dict(),
                                                          "data": run.data_state, "config": run.cfg.to_dict()},
                           trainable_only=run.lora)


def _sample(run: _Run, tag: str) -> list[Path]:
    from stdit.lora import inference_model

    if not run.cfg.sample.enabled:
        return []
    weights = _full_weights(run.wrapped, run.ema, run.lora)
    paths = []
    if run.info.is_main:
        try:
            model = inference_model(run.cfg, run.arch, weights)
            model.set_tile_attention(run.tile)
            paths = write_samples(run.cfg, model, run.dataset, run.out / "samples", tag, run.sample_shift,
                                  run.device)
        except (ImportError, OSError) as e:  # a missing video codec must not cost the trained model
            _say(run.info, f"could not write the {tag} samples: {e}")
    barrier()
    return paths


def _export(run: _Run, step: int, t_start: float) -> dict:
    """The final samples, loss plot and ``model/`` (rank 0 writes them); returns the run's summary."""
    from stdit.lora import inference_model, save_adapter
    from stdit.train_utils import plot_loss, read_log

    cfg, out = run.cfg, run.out
    summary: dict = {"output_dir": str(out), "steps": step, "wall_s": time.time() - t_start}
    summary["samples"] = [str(p) for p in _sample(run, "final")]
    weights = _full_weights(run.wrapped, run.ema, run.lora) if run.tc.export else None
    if run.info.is_main:
        records = read_log(out / "log.jsonl")
        if records:
            summary["loss_png"] = str(plot_loss(records, out / "loss.png"))
            w = min(20, max(1, len(records) // 2))
            summary["first_loss"] = sum(r["loss"] for r in records[:w]) / w
            summary["last_loss"] = sum(r["loss"] for r in records[-w:]) / w
        if weights is not None:
            from stdit.pipeline import make_scheduler

            model_dir = out / "model"
            if run.lora:
                summary["lora_file"] = str(save_adapter(model_dir, run.model, weights, cfg.model["pretrained"]))
            else:
                inference_model(cfg, run.arch, weights).save_pretrained(model_dir)
            make_scheduler(cfg.sample.scheduler, run.sample_shift).save_pretrained(model_dir)
            summary["model_dir"] = str(model_dir)
        _report(summary)
    barrier()
    return summary


def _check_sp(sp: int, arch: dict, world_size: int) -> None:
    import inspect

    from stdit.model import StDiT
    from stdit.parallel.ulysses import check_sp_size

    heads = arch.get("num_attention_heads",
                     inspect.signature(StDiT.__init__).parameters["num_attention_heads"].default)
    check_sp_size(sp, heads, world_size)


def _apply_optim_settings(optimizer, scheduler, tc) -> None:
    """Put the config's lr, betas and weight decay into the loaded optimizer state and the learning rate of the
    schedule (recomputed for the config's warmup/steps) at the resumed step, so a changed setting really applies."""
    for group in optimizer.param_groups:
        group["initial_lr"], group["betas"], group["weight_decay"] = tc.lr, tuple(tc.betas), tc.weight_decay
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _report(s: dict) -> None:
    lines = [f"done: {s['steps']} steps in {s['wall_s']:.0f} s; outputs in {s['output_dir']}/"]
    if "first_loss" in s:
        lines.append(f"  loss: {s['first_loss']:.4f} (first 20 steps) -> {s['last_loss']:.4f} (last 20 steps), "
                     f"{s['first_loss'] / s['last_loss']:.1f}x lower")
    for p in s.get("samples", []):
        lines.append(f"  {'samples vs data' if str(p).endswith('.png') else 'sample video'}: {p}")
    if "loss_png" in s:
        lines.append(f"  loss curve:   {s['loss_png']}")
    if "lora_file" in s:
        lines.append(f"  LoRA adapter: {s['lora_file']}  (WanPipeline.load_lora_weights / stdit merge-lora)")
    elif "model_dir" in s:
        lines.append(f"  model:        {s['model_dir']}  (StDiT.from_pretrained / stdit sample --model)")
    print("\n".join(lines), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n  stdit train configs/tiny.yaml\n"
                     "  torchrun --nproc_per_node=2 -m stdit.train --config configs/tiny.yaml train.lr=3e-4 "
                     "parallel.mode=fsdp\nRun with --list-keys to see every key, its default and meaning.")
    parser.add_argument("items", nargs="*", metavar="CONFIG | section.key=value",
                        help="a YAML config (path or name in configs/) and/or dotted overrides")
    parser.add_argument("--config", help="the YAML config (alternative to the positional form)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its default and exit")


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print(describe())
        return 0
    items = list(args.items)
    config = args.config
    if config is None:
        plain = [i for i in items if "=" not in i]
        if len(plain) != 1:
            print("error: give one config (a YAML path or a name such as tiny), then any section.key=value "
                  "overrides.", file=sys.stderr)
            return 2
        config = plain[0]
        items.remove(config)
    try:
        cfg = load_train_config(config, items)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        train(cfg)
    except TrainingStopped as e:
        if e.is_main:
            print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted before the first training step finished; nothing was saved.", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stdit.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
