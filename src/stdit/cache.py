"""Step caching for StDiT: skip the whole block stack on steps where it would change little (TeaCache / MagCache).

Between neighbouring sampling steps a DiT's block stack adds nearly the same residual (block-stack output minus
input) to its input. A step cache keeps the residual of the last step it computed and, on a step whose input moved
little since, returns ``input + kept residual`` instead of running the blocks. Two criteria decide "little":

- ``"teacache"`` (TeaCache): the relative L1 change, from the previous step, of an indicator that costs nothing next
  to the blocks: the first block's modulated input ``LN(x)(1 + scale) + shift`` (``indicator="modulated"``) or the
  timestep modulation (``"timestep"``, what TeaCache uses for Wan). The change is rescaled by a polynomial calibrated
  per model (the residual's relative change as a function of the indicator's), accumulated over skipped steps, and
  the blocks run again once the sum reaches ``threshold``.
- ``"magcache"`` (MagCache): the calibrated ratio of residual magnitudes between neighbouring steps; the error
  ``sum |1 - prod ratio|`` since the last computed step must stay under ``threshold``.

The first ``protect_first`` and last ``protect_last`` steps always run, as do steps after ``max_skip_steps`` skips in
a row. State is kept per guidance branch: diffusers' ``cache_context("cond")`` / ``("uncond")`` (WanPipeline) name
the branch of a call, and ``"uncond+cond"`` (StDiTPipeline's batched guidance) names a batch whose rows are the
branches in that order (``"uncond:2+cond:1"`` gives row counts), so either pipeline keeps one residual and one
accumulator per branch, and a calibration from one serves the other. A batched call skips only when every branch
would. Under sequence parallelism the criterion is reduced over the group, so all ranks decide alike.

    from stdit.cache import StepCacheConfig, calibrating, enable_step_cache

    with calibrating(pipe.transformer) as cal:   # uncached runs that record the statistics
        pipe(prompt_embeds=emb, guidance_scale=5.0, num_inference_steps=50)
    cal.result().save(model_dir)                  # model_dir/step_cache.json, beside config.json
    enable_step_cache(pipe.transformer, StepCacheConfig.from_pretrained(model_dir, threshold=0.2))

With the cache disabled (or ``threshold=0``) the model's output is bitwise that of the uncached model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

METHODS = ("teacache", "magcache")
INDICATORS = ("modulated", "timestep")
CALIBRATION_FILE = "step_cache.json"
_HOOK = "stdit_step_cache"
_FORMAT = "stdit-step-cache"


@dataclasses.dataclass
class StepCacheConfig:
    """Settings of a step cache (see the module docstring).

    Args:
        method: ``"teacache"`` or ``"magcache"``.
        threshold: how much accumulated change a skip may carry; 0 never skips.
        protect_first, protect_last: steps at the start and end that always run the blocks.
        max_skip_steps: skipped steps in a row before the blocks must run (None: no limit).
        indicator: TeaCache's indicator, ``"modulated"`` or ``"timestep"``.
        coefficients: TeaCache's rescaling polynomial, highest power first (None: the raw change).
        fit_range: the indicator changes the polynomial was fitted on; beyond them the rescaled change grows in
            proportion to the change from the nearest end (a polynomial's own extrapolation can run anywhere).
        mag_ratios: MagCache's residual magnitude ratio per step, per branch name (``{"cond": [...], ...}``).
        num_inference_steps: steps of a run, needed only where the caller gives no ``cache_context`` step index.
        calibrate: never skip; record the statistics that :func:`calibrating` turns into a calibration.
    """

    method: str = "teacache"
    threshold: float = 0.1
    protect_first: int = 1
    protect_last: int = 1
    max_skip_steps: int | None = 3
    indicator: str = "modulated"
    coefficients: list[float] | None = None
    fit_range: tuple[float, float] | None = None
    mag_ratios: dict[str, list[float]] | None = None
    num_inference_steps: int | None = None
    calibrate: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {METHODS}.")
        if self.indicator not in INDICATORS:
            raise ValueError(f"indicator={self.indicator!r}; choose one of {INDICATORS}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"threshold={self.threshold!r}: must be a finite number >= 0 (0 never skips).")
        for name in ("protect_first", "protect_last", "max_skip_steps", "num_inference_steps"):
            value = getattr(self, name)
            low = 0 if name.startswith("protect") else 1
            if value is None and name in ("max_skip_steps", "num_inference_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}.")
        if self.method == "magcache" and not self.mag_ratios and not self.calibrate:
            raise ValueError("magcache needs the model's mag_ratios: calibrate once (stdit.cache.calibrating, or "
                             "`stdit sample --calibrate-cache`), then StepCacheConfig.from_pretrained(model_dir, "
                             "method='magcache').")
        if self.mag_ratios is not None:
            self.mag_ratios = {str(k): [float(r) for r in v] for k, v in dict(self.mag_ratios).items()}
        if self.coefficients is not None:
            self.coefficients = [float(c) for c in self.coefficients]
        if self.fit_range is not None:
            lo, hi = (float(v) for v in self.fit_range)
            if not 0 <= lo <= hi:
                raise ValueError(f"fit_range={self.fit_range!r}: must be (low, high) with 0 <= low <= high.")
            self.fit_range = (lo, hi)

    @classmethod
    def from_pretrained(cls, path, **settings) -> "StepCacheConfig":
        """A config with the calibration saved in ``path`` (a model directory holding ``step_cache.json``, or that
        file); ``settings`` (``method``, ``threshold``, ...) override the rest."""
        return cls.from_calibration(StepCacheCalibration.load(path), **settings)

    @classmethod
    def from_calibration(cls, calibration: "StepCacheCalibration", **settings) -> "StepCacheConfig":
        base = dict(indicator=calibration.indicator, coefficients=calibration.coefficients,
                    fit_range=calibration.fit_range, mag_ratios=calibration.mag_ratios)
        return cls(**{**base, **settings})


@dataclasses.dataclass
class StepCacheCalibration:
    """What a calibration measured on one model: TeaCache's rescaling polynomial (fitted to ``fit_points``
    (indicator change, residual change) pairs with the indicator changes in ``fit_range``) and MagCache's per-step
    magnitude ratios per branch, for ``num_inference_steps`` steps (other step counts are interpolated, nearest).
    ``info`` holds free-form notes on the runs (scheduler, guidance, sizes)."""

    indicator: str
    coefficients: list[float] | None
    mag_ratios: dict[str, list[float]]
    num_inference_steps: int
    runs: int
    fit_points: int
    fit_range: tuple[float, float] | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.fit_range is not None:  # JSON gives a list back
            self.fit_range = tuple(float(v) for v in self.fit_range)

    def save(self, path) -> Path:
        """Write ``step_cache.json`` into the directory ``path`` (or to the file ``path``); returns the file."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / CALIBRATION_FILE
        path.write_text(json.dumps({"format": _FORMAT, "version": 1, **dataclasses.asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "StepCacheCalibration":
        """From ``step_cache.json`` in a model directory (or a pipeline directory's transformer/), or that file."""
        path = Path(path)
        file = path
        if path.is_dir():  # a model directory, or a saved pipeline's, whose transformer/ holds the model
            file = path / CALIBRATION_FILE
            if not file.is_file() and (path / "transformer" / CALIBRATION_FILE).is_file():
                file = path / "transformer" / CALIBRATION_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no step cache calibration at {file}: calibrate first (stdit.cache.calibrating "
                                    "or `stdit sample --calibrate-cache`).")
        data = json.loads(file.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"{file} is not a stdit step cache calibration (format {data.get('format')!r}).")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class _BranchState(BaseState):
    """One guidance branch's cache: the kept residual, the last indicator and the accumulators."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs):
        self.step = -1  # the step index of the last call
        self.residual = None  # block-stack output minus input at the last computed step
        self.indicator = None  # TeaCache's indicator at the last call
        self.change = None  # the indicator's relative change at this call (calibration records it)
        self.distance = 0.0  # accumulated rescaled change (TeaCache) or error (MagCache) since the last compute
        self.ratio = 1.0  # MagCache's accumulated magnitude ratio
        self.skipped = 0  # skipped steps in a row


class _BranchStates(StateManager):
    """diffusers' ``StateManager``, so that ``cache_context`` sets its context, holding one state per branch."""

    def __init__(self):
        super().__init__(_BranchState)

    def branch(self, name: str) -> _BranchState:
        if name not in self._state_cache:
            self._state_cache[name] = _BranchState()
        return self._state_cache[name]


def parse_layout(name: str, rows: int) -> list[tuple[str, int, int]]:
    """``(branch, first row, end row)`` for a context name: ``"cond"``, ``"uncond+cond"`` (equal row shares, in
    order) or ``"uncond:2+cond:1"`` (row counts); parts without a count share the rows the others leave."""
    parts = []
    for part in name.split("+"):
        branch, _, count = part.partition(":")
        if not branch or (count and not count.isdigit()):
            raise ValueError(f"cache context {name!r}: each part is a branch name, optionally ':rows'.")
        parts.append((branch, int(count) if count else None))
    names = [p for p, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"cache context {name!r} names a branch twice.")
    counted = sum(c for _, c in parts if c is not None)
    free = [p for p, c in parts if c is None]
    rest = rows - counted
    if rest < 0 or (free and rest % len(free)) or (not free and rest):
        raise ValueError(f"cache context {name!r} does not split a batch of {rows} rows into its branches.")
    layout, start = [], 0
    for branch, count in parts:
        n = count if count is not None else rest // len(free)
        layout.append((branch, start, start + n))
        start += n
    return layout


def _nearest(values: list[float], length: int) -> list[float]:
    """``values`` resampled to ``length`` entries by nearest index (MagCache's interpolation)."""
    if len(values) == length:
        return values
    if length == 1:
        return values[-1:]
    scale = (len(values) - 1) / (length - 1)
    return [values[round(i * scale)] for i in range(length)]


class StepCacheHook(ModelHook):
    """The cache on one model. A diffusers ``ModelHook`` on the model (with no effect on its ``forward``) so that
    ``cache_context`` reaches its branch states and ``_reset_stateful_cache`` (run by pipelines at the end of a call)
    clears them; the skipping itself wraps the model's ``_run_blocks``. ``computed`` / ``skipped`` count block-stack
    calls since the cache was enabled."""

    _is_stateful = True

    def __init__(self, config: StepCacheConfig):
        super().__init__()
        self.config = config
        self.branches = _BranchStates()
        self.computed = 0
        self.skipped = 0
        self.records: dict[str, list[dict[int, tuple]]] = {}  # calibration: branch -> runs -> step -> stats

    def reset_state(self, module):
        self.branches.reset()
        return module

    def run_blocks(self, model, inner, x, timestep_proj, *rest, **kwargs):
        if torch.is_grad_enabled():  # training: the blocks always run and the cache is left alone
            return inner(x, timestep_proj, *rest, **kwargs)
        layout = parse_layout(self._context_name(), x.shape[0])
        states = [self.branches.branch(name) for name, _, _ in layout]
        step, total = self._where(states)
        if self._should_skip(model, x, timestep_proj, layout, states, step, total):
            residual = torch.cat([s.residual for s in states]) if len(states) > 1 else states[0].residual
            for s in states:
                s.skipped += 1
            self.skipped += 1
            self._advance(states, step)
            return x + residual
        out = inner(x, timestep_proj, *rest, **kwargs)
        self._keep(model, x, out, layout, states, step)
        self._advance(states, step)
        self.computed += 1
        return out

    def _context_name(self) -> str:
        context = self.branches._context
        return context.name if context is not None else "default"

    def _where(self, states) -> tuple[int, int | None]:
        """This call's step index and the run's step count; a new run (the index went back) resets the states."""
        context = self.branches._context
        total = self.config.num_inference_steps
        if context is not None and context.step_index is not None:
            step = int(context.step_index)
            total = context.num_inference_steps or total
        elif total is None:
            raise ValueError("the step cache needs to know the step: call the model inside "
                             "model.cache_context(name, step_index=i, num_inference_steps=n) (the pipelines do), or "
                             "set StepCacheConfig(num_inference_steps=n) to count calls.")
        else:
            step = (states[0].step + 1) % total
        for s in states:
            if step <= s.step:
                s.reset()
        return step, total

    @torch.compiler.disable
    def _should_skip(self, model, x, timestep_proj, layout, states, step, total) -> bool:
        """Update every branch's accumulators for this step; True where all of them may skip."""
        cfg = self.config
        protected = step < cfg.protect_first or (total is not None and step >= total - cfg.protect_last)
        indicator, token_wise = None, False
        if cfg.method == "teacache" or cfg.calibrate:
            indicator, token_wise = _indicator(model, x, timestep_proj, cfg.indicator)
        skip = not (protected or cfg.calibrate)
        for (name, a, b), s in zip(layout, states):
            usable = s.residual is not None and s.residual.shape == (b - a, *x.shape[1:])
            s.change = None
            if indicator is not None:
                ind = indicator[a:b]
                if s.indicator is not None and s.indicator.shape == ind.shape:
                    cur, prev = (_real(model, t) if token_wise else t for t in (ind, s.indicator))
                    num, den = _sums(model, [_l1(cur, prev), prev.float().abs().sum()], token_wise)
                    s.change = num / max(den, 1e-30)
                s.indicator = ind
            if cfg.method == "teacache":
                if s.change is None:
                    usable = False
                else:
                    s.distance += self._rescale(s.change)
            else:
                s.ratio *= self._mag_ratio(name, step, total)
                s.distance += abs(1.0 - s.ratio)
            within = cfg.max_skip_steps is None or s.skipped < cfg.max_skip_steps
            skip = skip and usable and within and s.distance < cfg.threshold
        return skip

    def _rescale(self, change: float) -> float:
        coefficients, fit_range = self.config.coefficients, self.config.fit_range
        if coefficients is None:
            return change
        at = change
        if fit_range is not None:
            at = min(max(change, fit_range[0]), fit_range[1])
        # Clamped at zero: a negative estimate would let the accumulated change shrink and skipping run on unbounded.
        value = max(float(np.polyval(coefficients, at)), 0.0)
        return value * change / at if at > 0 else value

    def _mag_ratio(self, name: str, step: int, total: int | None) -> float:
        ratios = self.config.mag_ratios or {}
        if name not in ratios:
            if len(ratios) != 1:
                raise ValueError(f"no MagCache ratios for the branch {name!r}; calibrated branches: "
                                 f"{', '.join(ratios) or 'none'}.")
            name = next(iter(ratios))
        values = ratios[name] if total is None else _nearest(ratios[name], total)
        return values[min(step, len(values) - 1)]

    @torch.compiler.disable
    def _keep(self, model, x, out, layout, states, step) -> None:
        residual = out - x
        for (name, a, b), s in zip(layout, states):
            r = residual[a:b]
            if self.config.calibrate:
                self._record(model, name, step, s, r)
            s.residual, s.distance, s.ratio, s.skipped = r, 0.0, 1.0, 0

    @staticmethod
    def _advance(states, step) -> None:
        for s in states:
            s.step = step

    def _record(self, model, name, step, state, residual) -> None:
        """One step's calibration statistics for one branch: the indicator's relative change, the residual's relative
        L1 change and MagCache's mean per-token magnitude ratio, each against the previous step."""
        prev = state.residual
        change, rel, ratio = state.change, None, None
        if prev is not None and prev.shape == residual.shape:
            cur, prev = _real(model, residual).float(), _real(model, prev).float()
            ratios = torch.linalg.vector_norm(cur, dim=-1) / (torch.linalg.vector_norm(prev, dim=-1) + 1e-8)
            num, den, ratio_sum, count = _sums(model, [_l1(cur, prev), prev.abs().sum(), ratios.sum(),
                                                       torch.tensor(float(ratios.numel()))])
            rel, ratio = num / max(den, 1e-30), ratio_sum / max(count, 1.0)
        runs = self.records.setdefault(name, [])
        if not runs or step <= max(runs[-1]):
            runs.append({})
        runs[-1][step] = (change, rel, ratio)

    def calibration(self, degree: int = 4, info: dict | None = None) -> StepCacheCalibration:
        """The calibration from the recorded runs: the polynomial (``degree``, fewer where there are few points)
        through every (indicator change, residual change) pair, and per branch the mean ratio of each step."""
        pairs = [(c, r) for runs in self.records.values() for run in runs for c, r, _ in run.values()
                 if c is not None and r is not None]
        if not pairs:
            raise ValueError("nothing to calibrate from: run the pipeline (two or more steps) inside calibrating().")
        xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        deg = min(degree, len(set(xs.tolist())) - 1)
        coefficients = None
        if deg >= 1:
            # Polynomial.fit scales the changes to [-1, 1] before fitting (the raw ones are small, so a degree-4 fit
            # on them is ill-conditioned); convert() gives the coefficients in the raw changes again.
            fit = np.polynomial.Polynomial.fit(xs, ys, deg).convert()
            coefficients = [float(c) for c in fit.coef[::-1]]
        ratios, steps = {}, set()
        for name, runs in self.records.items():
            lengths = {len(run) for run in runs}
            steps |= lengths
            n = max(lengths)
            full = [run for run in runs if len(run) == n]
            ratios[name] = [float(np.mean([run[i][2] if run[i][2] is not None else 1.0 for run in full]))
                            for i in range(n)]
        if len(steps) != 1:
            raise ValueError(f"the calibration runs have different step counts ({sorted(steps)}); calibrate with one.")
        return StepCacheCalibration(indicator=self.config.indicator, coefficients=coefficients, mag_ratios=ratios,
                                    num_inference_steps=steps.pop(), runs=max(len(r) for r in self.records.values()),
                                    fit_points=len(pairs), fit_range=(float(xs.min()), float(xs.max())),
                                    info=dict(info or {}))


def _indicator(model, x, timestep_proj, kind: str) -> tuple[torch.Tensor, bool]:
    """TeaCache's indicator and whether it is per token: the first block's modulated input ``[B, S, D]``, or the
    modulation itself, ``[B, n_mod, D]`` (per token, ``[B, S, n_mod, D]``, for Wan 2.2's per-token timesteps)."""
    per_token = timestep_proj.ndim == 4
    if kind == "timestep":
        return timestep_proj, per_token
    from stdit.ops import norm_modulate

    mods = model.blocks[0].scale_shift_table + timestep_proj.float()  # as StDiTBlock.forward modulates
    shift, scale = mods.select(-2, 0), mods.select(-2, 1)
    if not per_token:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return norm_modulate(x, shift, scale, eps=model.config.eps), True


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().sum()


def _real(model, t: torch.Tensor) -> torch.Tensor:
    """The real tokens of ``t`` ``[B, S_local, ...]``: under sequence parallelism the last shards end in padding."""
    sp = getattr(model, "_sp", None)
    if sp is None:
        return t
    n = t.shape[1]
    return t[:, :min(max(sp.seq_len - sp.rank * n, 0), n)]


def _sums(model, values: list[torch.Tensor], token_wise: bool = True) -> list[float]:
    """Sums over the whole sequence: on one rank as they are; under sequence parallelism, for token-wise values,
    reduced over the group, so every rank reads the same numbers and takes the same decision (a rank that skipped
    alone would leave the others waiting in the attention's all-to-all)."""
    sp = getattr(model, "_sp", None)
    if not token_wise or sp is None:
        return [float(v) for v in values]
    import torch.distributed as dist

    packed = torch.stack([v.detach().float().reshape(()) for v in values])
    dist.all_reduce(packed, group=sp.group)
    return packed.tolist()


def enable_step_cache(model, config: StepCacheConfig | None = None, **settings) -> StepCacheHook:
    """Turn the step cache on for a StDiT (``config``, or a :class:`StepCacheConfig` built from ``settings``)."""
    if not callable(getattr(model, "_run_blocks", None)) or not hasattr(model, "blocks"):
        raise TypeError(f"the step cache runs on a StDiT; got {type(model).__name__} (StDiT.from_wan converts Wan).")
    if config is not None and settings:
        raise ValueError("pass a StepCacheConfig or its settings, not both.")
    if get_step_cache(model) is not None:
        raise ValueError("the step cache is already on: stdit.cache.disable_step_cache(model) first.")
    if getattr(model, "is_cache_enabled", False):
        raise ValueError(f"a diffusers cache ({type(model._cache_config).__name__}) is on: model.disable_cache() "
                         "first; two caches would skip on each other's outputs.")
    hook = StepCacheHook(config if config is not None else StepCacheConfig(**settings))
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, _HOOK)
    # An instance attribute shadows the class's method, as diffusers' hooks shadow forward; deleting it restores it.
    model._run_blocks = functools.partial(hook.run_blocks, model, model._run_blocks)
    # CacheMixin's record of the cache that is on, so is_cache_enabled is true and diffusers' enable_cache refuses a
    # second cache
    model._cache_config = hook.config
    return hook


def disable_step_cache(model) -> None:
    """Turn the step cache off; the model computes every step again (bitwise as if it had never been on)."""
    if get_step_cache(model) is None:
        return
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(_HOOK, recurse=False)
    del model._run_blocks
    model._cache_config = None


def get_step_cache(model) -> StepCacheHook | None:
    """The model's step cache hook (its ``config``, ``computed`` and ``skipped`` counts), or None when off."""
    registry = getattr(model, "_diffusers_hook", None)
    return registry.get_hook(_HOOK) if registry is not None else None


class Calibrator:
    """What :func:`calibrating` yields: ``result()`` gives the calibration of the runs made inside the block."""

    def __init__(self, hook: StepCacheHook, degree: int, info: dict | None):
        self.hook, self.degree, self.info = hook, degree, info

    def result(self) -> StepCacheCalibration:
        return self.hook.calibration(self.degree, self.info)


@contextmanager
def calibrating(model, indicator: str = "modulated", degree: int = 4, info: dict | None = None):
    """Record calibration statistics over the sampling runs made inside the block (the blocks run at every step, so
    the samples are the uncached ones). Run the pipeline as it will be used (scheduler, steps, guidance, sizes);
    a few prompts or seeds make the fit steadier. A step cache that was on is off inside the block, on after."""
    previous = get_step_cache(model)
    if previous is not None:
        disable_step_cache(model)
    hook = enable_step_cache(model, StepCacheConfig(calibrate=True, indicator=indicator))
    try:
        yield Calibrator(hook, degree, info)
    finally:
        disable_step_cache(model)
        if previous is not None:
            enable_step_cache(model, previous.config)
