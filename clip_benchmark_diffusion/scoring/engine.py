"""The packed-batch scoring engine.

One call scores a dataloader batch of images against the candidate classes. Work items are
(image, candidate, condition, sample) quadruples; every round each unfinished image's strategy
says which it needs, the items of all images are packed into denoiser batches of
``options.batch_size`` (halved, for the rest of the run, when the device runs out of memory), and
the errors are scattered back. When a round would leave the
denoiser under-filled, strategies are asked for look-ahead samples (computed, counted, and only
used in order, so decisions never depend on batching).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.batching import (AUTO_CPU, CpuWorkers, eager_probes, gather_rows,
                                                        is_out_of_memory, largest_fitting_batch, static_rows)
from clip_benchmark_diffusion.scoring.noise import NoiseBank
from clip_benchmark_diffusion.scoring.outcome import ImageResult
from clip_benchmark_diffusion.scoring.strategies import Strategy, make_strategy
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid


@dataclass(frozen=True)
class Levels:
    """The noise level of each row of a denoiser batch (slices of the engine's :class:`NoiseGrid`)."""

    a: torch.Tensor            # (N,) float32, on the denoiser's device
    b: torch.Tensor            # (N,)
    model_time: torch.Tensor   # (N,) the denoiser's timestep input

    def rows(self, s: slice) -> "Levels":
        return Levels(a=self.a[s], b=self.b[s], model_time=self.model_time[s])


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, levels: Levels, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_t (N, C, H, W) float32, the rows' levels and conditioning -> eps_hat (N, C, H, W) float32."""


Conditioning = dict[str, torch.Tensor]  # tensors with one row per prompt (or class), same keys for all


@dataclass
class Candidates:
    """The classes to choose from: each is one or more conditioning rows."""

    cond: Conditioning        # each (P, ...): the family's denoiser inputs, on the denoiser's device
    members: torch.Tensor     # (G, M) row of cond for member m of class g; -1 pads unequal classes

    @property
    def num_classes(self) -> int:
        return self.members.shape[0]


@dataclass
class EngineStats:
    """Cost accounting, cumulative over calls."""

    denoiser_calls: int = 0
    denoiser_batches: int = 0
    denoiser_seconds: float = 0.0
    wall_seconds: float = 0.0
    images: int = 0
    decided_calls: int = 0   # the calls of the images decided so far (the rest are in flight)

    def as_dict(self) -> dict[str, float]:
        return {
            "images": self.images,
            "denoiser_calls": self.denoiser_calls,
            "mean_denoiser_batch": self.denoiser_calls / max(self.denoiser_batches, 1),
            "seconds_per_image": self.wall_seconds / max(self.images, 1),
            "share_outside_denoiser": 1 - self.denoiser_seconds / self.wall_seconds if self.wall_seconds else 0.0,
        }


class NonFiniteOutput(RuntimeError):
    """The denoiser returned NaN or inf: no number of retries can turn it into a score."""


@dataclass
class _ImageState:
    latent: torch.Tensor          # (C, H, W)
    noise: NoiseBank
    strategy: Strategy
    cerr: torch.Tensor            # (G, M, N) per-condition error, valid where ``have``
    # (G, M, N) which errors are computed (padding members count as computed). An explicit mask, not
    # NaN in ``cerr``: a denoiser that returns NaN would otherwise look "not computed yet" forever.
    have: torch.Tensor
    calls: int = 0
    # (q, 3) class, member, sample of the errors computed since the last checkpoint: a save writes
    # only these, so its cost follows the compute since the last save, not the size of cerr
    unsaved: list[torch.Tensor] = field(default_factory=list)


class Checkpoints(Protocol):
    """Per-image partial work that outlives the process (the adapter keeps it in the score store)."""

    def load(self, i: int) -> tuple[torch.Tensor, int] | None:
        """Image i's saved (G, M, N) errors (NaN where not computed) and denoiser calls, if any."""

    def save(self, i: int, cerr: torch.Tensor, calls: int, new: torch.Tensor) -> None:
        """Keep image i's errors so far: ``new`` (q, 3) are the class, member and sample of those
        computed since its previous save (the rest of ``cerr`` was handed over before)."""


# The checkpoint format (and its users) mark missing errors with NaN. That stays unambiguous because
# ``_run`` refuses any non-finite error before it is stored: a computed error is never NaN.


CHECKPOINT_S = 5.0  # at most this much compute is lost when the process is killed
# Saving may take at most this share of the time: when one round of saves takes longer than this
# share of CHECKPOINT_S (a slow disk, a huge batch), the next save waits proportionally longer.
MAX_SAVE_SHARE = 0.05


class ScoringEngine:
    checkpoint_s = CHECKPOINT_S
    max_save_share = MAX_SAVE_SHARE

    def __init__(self, denoiser: Denoiser, grid: NoiseGrid, objective: str, options: ScoringOptions,
                 device: torch.device | str, progress: Callable[[dict], None] | None = None,
                 nonfinite_error: Callable[[str], Exception] = NonFiniteOutput,
                 note: Callable[[str], None] | None = None, probe_batch: bool | None = None) -> None:
        """``grid`` holds at least ``options.max_sample_count`` noise levels in sample order;
        ``objective`` is what the denoiser was trained to predict (for the ``native`` weighting).
        ``nonfinite_error(what)`` is raised when a denoiser batch is not finite (the caller knows
        the model, dtype and options that a user can change). With ``options.batch_size`` 0 (auto) the
        batch is probed on the first round's inputs when ``probe_batch`` (None: on CUDA), else ``AUTO_CPU``."""
        self.nonfinite_error = nonfinite_error
        # The denoiser batch in use: options.batch_size until the device runs out of memory, then halved
        # (for the rest of the run: the engine lives as long as the model). ``note`` says so in one line.
        self.probe_batch = torch.device(device).type == "cuda" if probe_batch is None else probe_batch
        self.batch_size = options.batch_size or (0 if self.probe_batch else AUTO_CPU)   # 0: probed at first use
        self.note = note
        if len(grid) < options.max_sample_count:
            raise ValueError(f"the grid has {len(grid)} levels, the options need {options.max_sample_count}")
        self.denoiser, self.grid, self.options = denoiser, grid, options
        self.device = torch.device(device)
        self.workers = CpuWorkers(options.cpu_workers, self.device)
        # a denoiser compiled with static shapes gets its partial batches padded to a few row counts
        self.static_shapes = options.fast_path.compile != "off"
        self.stats = EngineStats()
        self.progress = progress
        weight, scale = smath.sample_weighting(grid, options.weighting, objective)
        self._weight = weight.to(self.device)                          # (N,)
        self._scale = scale.to(self.device) if scale is not None else None
        self._a, self._b = grid.a.float().to(self.device), grid.b.float().to(self.device)
        self._model_time = grid.model_time.float().to(self.device)
        self._unsettled: int | None = None   # the image _run is writing errors into, if any
        self.checkpoint_seconds = 0.0        # time spent saving checkpoints, cumulative
        self.probe_seconds = 0.0             # time the auto batch probe's forwards took

    def score(self, latents: torch.Tensor, seeds: list[int], cands: Candidates,
              on_done: Callable[[int, ImageResult], None] | None = None,
              allowed: torch.Tensor | None = None, checkpoints: Checkpoints | None = None) -> list[ImageResult]:
        """Score ``latents`` (B, C, H, W) against ``cands``; ``seeds`` from the image contents.

        ``on_done(i, result)`` is called as soon as image i is decided (to persist it at once).
        ``allowed`` (B, G) limits each image to some candidates (the others rank last, unscored).
        ``checkpoints`` saves each undecided image's errors every ``checkpoint_s`` seconds and
        restores them at the start: a restored image replays the same decisions (strategies read
        samples in order) without recomputing what was saved. On KeyboardInterrupt (Ctrl-C, and
        SIGTERM through the integration's handler) every image in flight is saved before it propagates.
        """
        start = time.perf_counter()
        calls_before = self.stats.denoiser_calls
        self._unsettled = None
        results: dict[int, ImageResult] = {}
        G, M = cands.members.shape
        N = self.options.max_sample_count
        valid = cands.members >= 0                                    # (G, M)
        rows = [None] * len(latents) if allowed is None else list(allowed.cpu())
        states = [
            _ImageState(latent=lat, noise=NoiseBank(seed, tuple(lat.shape), self.device),
                        strategy=make_strategy(self.options, G, allowed=row), cerr=torch.zeros(G, M, N),
                        have=(~valid)[:, :, None].expand(G, M, N).clone())
            for lat, seed, row in zip(latents, seeds, rows)
        ]
        if checkpoints is not None:
            for i, st in enumerate(states):
                saved = checkpoints.load(i)
                if saved is not None and saved[0].shape == st.cerr.shape:
                    st.have = ~saved[0].isnan() | ~valid[:, :, None]
                    st.cerr, st.calls = saved[0].nan_to_num(0.0), saved[1]
        try:
            self._rounds(states, cands, valid, start, calls_before, results, on_done, checkpoints)
        except KeyboardInterrupt:
            if checkpoints is not None:  # the work of every image in flight outlives the process
                self._save(states, checkpoints, results)
            raise
        self.stats.wall_seconds += time.perf_counter() - start
        return [results[i] for i in range(len(states))]

    def _rounds(self, states: list[_ImageState], cands: Candidates, valid: torch.Tensor, start: float,
                calls_before: int, results: dict[int, ImageResult],
                on_done: Callable[[int, ImageResult], None] | None, checkpoints: Checkpoints | None) -> None:
        """Score until every image is decided (``results`` filled in as they are)."""
        last_save, interval = time.perf_counter(), self.checkpoint_s
        while active := [i for i, s in enumerate(states) if not s.strategy.done]:
            items = self._collect(states, active, valid, 0)            # (Q, 4): image, class, member, sample
            if not self.batch_size and len(items):
                self._probe_batch(states, items, cands)
            items = torch.cat([items, self._fill(states, active, valid, len(items))])
            pos = 0
            while pos < len(items):                                    # restored images: may be none
                chunk = items[pos: pos + self.batch_size]
                self._run_fitting(states, chunk, cands)
                pos += len(chunk)
                if checkpoints is not None and time.perf_counter() - last_save >= interval:
                    cost = self._save(states, checkpoints, results)
                    if self.checkpoint_s > 0:  # 0: after every denoiser batch, as tests and recorders ask
                        # bounded share of the time: a slow save stretches the interval to match
                        interval = max(self.checkpoint_s, cost / self.max_save_share)
                    last_save = time.perf_counter()
                if self.progress:  # a heartbeat within rounds too: a full strategy's round is the whole batch
                    self.progress({"active": len(active), "candidates_left": sum(
                        int(states[i].strategy.alive.sum()) for i in active) / len(active)})
            for i in active:
                st = states[i]
                done_cls = st.have.all(1)                              # (G, N) every member computed
                st.strategy.record(done_cls, self._class_error(st.cerr, valid))
                st.strategy.update()
                if st.strategy.done:
                    self.stats.images += 1
                    spent = time.perf_counter() - start
                    per_call = spent / max(self.stats.denoiser_calls - calls_before, 1)
                    result = ImageResult(outcome=st.strategy.outcome(), denoiser_calls=st.calls,
                                         seed=st.noise.seed, seconds=st.calls * per_call)
                    self.stats.decided_calls += st.calls
                    st.unsaved = []      # its result is stored now: its checkpoint is never written again
                    if on_done:
                        on_done(i, result)
                    results[i] = result
            if self.progress:
                self.progress({"active": len(active), "candidates_left": sum(
                    int(states[i].strategy.alive.sum()) for i in active) / len(active)})

    def _save(self, states: list[_ImageState], checkpoints: Checkpoints, results: dict[int, ImageResult]) -> float:
        """Checkpoint what each undecided image computed since its last save; returns the seconds it took.

        Images already decided (their result is stored) and the one image ``_run`` was interrupted
        while writing (its errors and calls may disagree) are not saved.
        """
        t0 = time.perf_counter()
        for i, st in enumerate(states):
            if i in results or i == self._unsettled or not st.unsaved:
                continue
            new = torch.cat(st.unsaved)
            checkpoints.save(i, st.cerr, st.calls, new)
            st.unsaved = []  # only now: a save interrupted before this line is written again, harmlessly
        spent = time.perf_counter() - t0
        self.checkpoint_seconds += spent
        return spent

    @staticmethod
    def _class_error(cerr: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(G, M, N) -> (G, N): mean over each class's real members."""
        return cerr.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)

    def _collect(self, states: list[_ImageState], active: list[int], valid: torch.Tensor,
                 extra: int) -> torch.Tensor:
        """Items the strategies want, ``extra`` samples beyond their horizon included."""
        parts = []
        for i in active:
            st = states[i]
            want = st.strategy.wanted(extra)[:, None, :] & ~st.have                 # (G, M, N)
            idx = want.nonzero()                                       # (q, 3): class, member, sample
            parts.append(torch.cat([torch.full((len(idx), 1), i), idx], 1))
        return torch.cat(parts) if parts else torch.empty(0, 4, dtype=torch.long)

    def _fill(self, states: list[_ImageState], active: list[int], valid: torch.Tensor,
              queued: int) -> torch.Tensor:
        """Look-ahead items that fill the round's last, partial denoiser batch (``options.lookahead``).

        They are computed and counted, but a strategy only reads samples in order, so decisions
        never depend on them; they cost denoiser work for candidates that may be dropped later.
        """
        room = -queued % self.batch_size
        if not self.options.lookahead or not room:
            return torch.empty(0, 4, dtype=torch.long)
        ahead = self._collect(states, active, valid, self.options.lookahead)
        horizons = torch.zeros(len(states), dtype=torch.long)
        horizons[active] = torch.tensor([states[i].strategy.horizon() for i in active])
        lag = ahead[:, 3] - horizons[ahead[:, 0]]
        ahead, lag = ahead[lag >= 0], lag[lag >= 0]                    # only beyond the horizon
        return ahead[torch.argsort(lag, stable=True)[:room]]

    def _probe_batch(self, states: list[_ImageState], items: torch.Tensor, cands: Candidates) -> None:
        """``batch_size`` auto: the largest batch of these items' inputs that fits (scoring/batching.py);
        the probes' outputs are thrown away, so results do not depend on them."""
        def fits(n: int) -> bool:
            try:
                with eager_probes():   # a compiled denoiser would compile every row count probed
                    self._forward(states, items[torch.arange(n) % len(items)], cands, pad=False)
                return True
            except Exception as exc:  # noqa: BLE001 - only out-of-memory means "does not fit"
                if not is_out_of_memory(exc):
                    raise
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return False

        before = self.stats.denoiser_seconds
        self.batch_size = largest_fitting_batch(fits)
        # the probes' forwards are not scoring: their time is the probe's, as their calls are not counted
        self.probe_seconds, self.stats.denoiser_seconds = self.stats.denoiser_seconds - before, before
        if self.note is not None:
            self.note(f"denoiser batch auto: {self.batch_size} rows fit this model, resolution and dtype "
                      f"(probed in {self.probe_seconds:.1f} s; batch_size=N sets it)")

    def _forward(self, states: list[_ImageState], chunk: torch.Tensor, cands: Candidates,
                 pad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noise, the denoiser's estimate and the sample indices (on the device) of ``chunk``'s items.
        For a denoiser compiled with static shapes (and ``pad``) a partial batch is run padded with
        copies of its last item (:func:`static_rows`), whose outputs are dropped: each row's output
        depends on its own inputs only."""
        n = len(chunk)
        if pad and self.static_shapes:
            chunk = chunk[torch.arange(static_rows(n, self.batch_size)).clamp(max=n - 1)]
        img, g, m, k = chunk.unbind(1)
        x0 = torch.stack([states[i].latent for i in img.tolist()])    # (n, C, H, W)
        eps = torch.empty_like(x0, dtype=torch.float32)
        for i in torch.unique(img).tolist():                          # per image, not per item
            sel = (img == i).to(self.device)
            eps[sel] = states[i].noise.get(k[img == i])
        kd = k.to(self.device)
        levels = Levels(a=self._a[kd], b=self._b[kd], model_time=self._model_time[kd])
        x_t = smath.add_noise(x0.float(), eps, levels.a, levels.b)
        cond = gather_rows(cands.cond, cands.members[g, m], self.device)   # each (n, ...), from a streamed table too
        t0 = time.perf_counter()
        eps_hat = self.workers.map(lambda s: self.denoiser(x_t[s], levels.rows(s), {c: v[s] for c, v in cond.items()}),
                                   len(x_t))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.denoiser_seconds += time.perf_counter() - t0
        return eps[:n], eps_hat[:n], kd[:n]

    def _run(self, states: list[_ImageState], chunk: torch.Tensor, cands: Candidates) -> None:
        img, g, m, k = chunk.unbind(1)
        eps, eps_hat, kd = self._forward(states, chunk, cands)
        self.stats.denoiser_calls += len(chunk)
        self.stats.denoiser_batches += 1
        scale = self._scale[kd] if self._scale is not None else None
        err = (smath.sample_error(eps, eps_hat, self.options.loss, scale) * self._weight[kd]).cpu()
        self._check_finite(eps_hat, err)
        for i in torch.unique(img).tolist():
            sel = img == i
            self._unsettled = i  # an interrupt in these lines leaves image i's state unsaveable
            states[i].cerr[g[sel], m[sel], k[sel]] = err[sel]
            states[i].have[g[sel], m[sel], k[sel]] = True
            states[i].calls += int(sel.sum())
            states[i].unsaved.append(chunk[sel, 1:])
            self._unsettled = None

    def _run_fitting(self, states: list[_ImageState], chunk: torch.Tensor, cands: Candidates) -> None:
        """:meth:`_run`, halving the denoiser batch on an out-of-memory error and running the chunk in
        pieces. Nothing is lost: an image's state changes only after its denoiser call returned, and
        the pieces draw the same (t, noise) samples, so the errors equal an unsplit run's."""
        try:
            self._run(states, chunk, cands)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not is_out_of_memory(exc) or len(chunk) == 1:
                raise
            del exc                                                     # its traceback holds the batch's tensors
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            previous, self.batch_size = len(chunk), max(1, len(chunk) // 2)
            if self.note is not None:
                self.note(f"the denoiser ran out of memory at a batch of {previous}; carrying on at "
                          f"{self.batch_size} with nothing lost (batch_size={self.batch_size} starts there)")
            pos = 0
            while pos < len(chunk):                    # at the batch in use: it may halve again on the way
                part = chunk[pos: pos + self.batch_size]
                self._run_fitting(states, part, cands)
                pos += len(part)

    def _check_finite(self, eps_hat: torch.Tensor, err: torch.Tensor) -> None:
        """Stop at the first batch with a NaN or inf output: the same inputs give it again on every
        retry, and an infinite error ties every class (class 0 would win with confidence 1)."""
        if bool(torch.isfinite(err).all()):
            return
        bad = ~torch.isfinite(eps_hat.flatten(1)).all(1).cpu() | ~torch.isfinite(err)
        kind = "NaN" if bool(eps_hat.isnan().any()) or bool(err.isnan().any()) else "inf"
        raise self.nonfinite_error(f"{kind} for {int(bad.sum())} of {len(err)} inputs")

