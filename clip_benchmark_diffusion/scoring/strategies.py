"""Which candidates still need which samples: full, staged (Li et al.), t-test (Clark & Jaini),
anytime-valid successive elimination (Howard et al.'s confidence sequences on paired differences).

Each strategy keeps one image's state as tensors: ``err`` (G, N) holds the class error of
candidate g on sample k where ``known`` (G, N) says it is computed. ``wanted(extra)`` says which entries are needed
next as a (G, N) mask; ``record()`` takes computed entries; ``update()`` reads them, eliminates
candidates and says whether the image is done; ``outcome()`` ranks all candidates, best first.
Only a strategy writes its state: callers hand it errors and read its masks.

A strategy is built from its own config class (``Config``, in ``scoring/strategy_options.py``)
by ``from_config``; ``make_strategy`` picks the class the options name.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from scipy import stats

from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.outcome import Outcome
from clip_benchmark_diffusion.scoring.sequential import eliminated_by_leader, paired_gaps, posterior_from_gaps
from clip_benchmark_diffusion.scoring.timesteps import prefix_order
from clip_benchmark_diffusion.scoring.strategy_options import (
    AnytimeConfig,
    FullConfig,
    SiftRefineConfig,
    StagedConfig,
    StrategyConfig,
    TTestConfig,
)


class Strategy:
    """One image's elimination state; subclasses say which samples are needed and whom to drop."""

    # The config class this strategy is built from (its options); set by each concrete strategy.
    Config: ClassVar[type[StrategyConfig]]
    # Concrete strategies by their config's name (the ``strategy`` option), filled as they are defined.
    by_name: ClassVar[dict[str, type["Strategy"]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:
            Strategy.by_name[cls.Config.name] = cls

    def __init__(self, num_candidates: int, num_samples: int) -> None:
        self._err = torch.zeros(num_candidates, num_samples)
        # Which entries of ``err`` are computed: a mask, not NaN in ``err``, so that a value the
        # denoiser got wrong can never pass for "not computed yet" (and be asked for forever).
        self.known = torch.zeros(num_candidates, num_samples, dtype=torch.bool)
        self.alive = torch.ones(num_candidates, dtype=torch.bool)
        # Lower is worse; eliminated candidates rank below survivors, later eliminations higher.
        self.out_round = torch.full((num_candidates,), -1, dtype=torch.long)
        # Samples each candidate's score uses: its elimination point, or the final decision point.
        # Look-ahead may have computed more; those never enter a score.
        self.used = torch.zeros(num_candidates, dtype=torch.long)
        self.done = False
        self._round = 0
        # options.sample_norm == "mean": decisions read every sample's errors divided by their mean
        # over the candidates scored on it (``scores``). Set by ``from_config``.
        self.normalize = False

    @classmethod
    def from_config(cls, config: StrategyConfig, num_candidates: int, *, sample_norm: str = "none",
                    allowed: torch.Tensor | None = None) -> "Strategy":
        """The strategy for one image: ``config`` its options, ``sample_norm`` the error section's
        normalisation, ``allowed`` (G,) bool the candidates it may keep (a shortlist; None: all)."""
        if not isinstance(config, cls.Config):
            raise TypeError(f"{cls.__name__} is built from {cls.Config.__name__}, got {type(config).__name__}")
        strategy = cls._build(config, num_candidates)
        strategy.normalize = sample_norm == "mean"
        if allowed is not None:
            strategy.alive &= allowed.to(torch.bool)
        return strategy

    # -- to override -------------------------------------------------------------------------
    @classmethod
    def _build(cls, config: StrategyConfig, num_candidates: int) -> "Strategy":
        """A fresh strategy with ``config``'s settings."""
        raise NotImplementedError

    def horizon(self) -> int:
        """Samples [0, horizon) are needed for every live candidate now."""
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def err(self) -> torch.Tensor:
        """(G, N) class errors; meaningful where ``known``."""
        return self._err

    @err.setter
    def err(self, values: torch.Tensor) -> None:
        """A complete (G, N) error matrix at once (simulations); the engine uses ``record``."""
        self._err = values
        self.known = torch.ones_like(values, dtype=torch.bool)

    def record(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        """Take ``values`` (G, N) where ``mask`` (G, N) is set and the entry is not known yet: computed
        class errors. A known entry is never overwritten, so callers may pass every computed entry."""
        new = mask & ~self.known
        self._err = torch.where(new, values.to(self._err.dtype), self._err)
        self.known = self.known | new

    @property
    def scores(self) -> torch.Tensor:
        """(G, N) what decisions read: the errors, or (``normalize``) each sample's errors over their
        mean across the candidates scored on it. That removes the several-fold spread of class gaps
        over t from the paired differences: sequential tests then need 3-4x fewer samples in the
        synthetic worlds, but it re-weights t, and a trained model can rank worse under it
        (docs/elimination_benchmark.md). A column is complete once its round is computed, so
        decisions stay functions of the samples read in order."""
        if not self.normalize:
            return self.err
        known = self.known.to(self.err.dtype)
        mean = (self.err * known).sum(0, keepdim=True) / known.sum(0, keepdim=True)  # over computed entries
        return self.err / mean

    def wanted(self, extra: int = 0) -> torch.Tensor:
        """(G, N) mask of entries to compute now; ``extra`` samples of look-ahead fill batches."""
        n = min(self.horizon() + extra, self.err.shape[1])
        mask = torch.zeros_like(self.err, dtype=torch.bool)
        mask[self.alive, :n] = True
        return mask & ~self.known

    def complete(self, n: int) -> bool:
        return bool(self.known[self.alive, :n].all())

    def eliminate(self, losers: torch.Tensor, n: int) -> None:
        """Drop ``losers`` (bool mask) after their first ``n`` samples."""
        self.out_round[losers] = self._round
        self.used[losers] = n
        self.alive &= ~losers
        self._round += 1

    def finish(self, n: int) -> None:
        """The survivors are decided on their first ``n`` samples."""
        self.used[self.alive] = n
        self.done = True

    def outcome(self) -> Outcome:
        k = torch.arange(self.err.shape[1])
        counted = k[None, :] < self.used[:, None]                      # (G, N)
        scores = self.scores
        mean = torch.where(counted, scores, 0.0).sum(1) / self.used.clamp(min=1)
        # Sort key: survivors first (by mean error), then eliminated, latest round first.
        key_round = torch.where(self.alive, torch.full_like(self.out_round, 1 << 40), self.out_round)
        order = torch.argsort(mean, stable=True)
        order = order[torch.argsort(-key_round[order], stable=True)]
        rank = torch.empty(len(mean), dtype=torch.long)
        rank[order] = torch.arange(len(mean))
        gap, sq = paired_gaps(scores, self.used, int(order[0]))
        prob = posterior_from_gaps(gap, sq, self.used, int(order[0]))
        gap = gap.float().masked_fill(self.used == 0, float("nan"))
        return Outcome(rank=rank, mean_error=mean, samples=self.used.clone(), prob=prob, gap=gap)


class FullStrategy(Strategy):
    """Every candidate on every sample: the reference."""

    Config = FullConfig

    @classmethod
    def _build(cls, config: FullConfig, num_candidates: int) -> "FullStrategy":
        return cls(num_candidates, config.max_sample_count)

    def horizon(self) -> int:
        return self.err.shape[1]

    def update(self) -> None:
        if self.complete(self.err.shape[1]):
            self.finish(self.err.shape[1])


class StagedStrategy(Strategy):
    """Li et al.: after stage s (``n_samples[s]`` samples), keep the ``to_keep[s]`` best."""

    Config = StagedConfig

    def __init__(self, num_candidates: int, n_samples: tuple[int, ...], to_keep: tuple[int, ...]) -> None:
        super().__init__(num_candidates, max(n_samples))
        self.n_samples, self.to_keep, self.stage = n_samples, to_keep, 0

    @classmethod
    def _build(cls, config: StagedConfig, num_candidates: int) -> "StagedStrategy":
        return cls(num_candidates, config.n_samples, config.to_keep)

    def horizon(self) -> int:
        return self.n_samples[self.stage]

    def update(self) -> None:
        while not self.done and self.complete(n := self.n_samples[self.stage]):
            keep = self.to_keep[self.stage]
            if self.alive.sum() > keep:
                mean = self.scores[:, :n].mean(1).masked_fill(~self.alive, float("inf"))
                best = torch.argsort(mean, stable=True)[:keep]
                losers = self.alive.clone()
                losers[best] = False
                self.eliminate(losers, n)
            self.stage += 1
            if self.stage == len(self.n_samples) or self.alive.sum() <= 1:
                self.finish(n)


class SequentialStrategy(Strategy):
    """Look after every sample from ``min_samples`` on, until one candidate (or ``survivors``) is left
    or ``max_samples`` is reached; subclasses say which candidates a look drops (``_test``)."""

    survivors = 1

    def __init__(self, num_candidates: int, min_samples: int, max_samples: int) -> None:
        super().__init__(num_candidates, max_samples)
        self.min_samples, self.n = min_samples, 0

    def horizon(self) -> int:
        return max(self.min_samples, self.n + 1)

    def update(self) -> None:
        total = self.err.shape[1]
        while not self.done and self.n < total and self.complete(self.n + 1):
            self.n += 1
            if self.n >= self.min_samples and self.alive.sum() > self.survivors:
                self._test(self.n)
            if self.alive.sum() <= 1 or self.n == total:
                self.finish(self.n)

    def _test(self, n: int) -> None:
        raise NotImplementedError


class TTestStrategy(SequentialStrategy):
    """Clark & Jaini: after each sample, drop candidates a paired t-test says are worse than the best."""

    Config = TTestConfig

    def __init__(self, num_candidates: int, min_samples: int, max_samples: int, p_value: float) -> None:
        super().__init__(num_candidates, min_samples, max_samples)
        self.p_value = p_value

    @classmethod
    def _build(cls, config: TTestConfig, num_candidates: int) -> "TTestStrategy":
        return cls(num_candidates, config.min_samples, config.max_samples, config.p_value)

    def _test(self, n: int) -> None:
        idx = self.alive.nonzero().squeeze(1)
        errs = self.scores[idx, :n].double()                      # (A, n)
        best = errs.mean(1).argmin()
        others = torch.arange(len(idx)) != best
        if not others.any():
            return
        res = stats.ttest_rel(errs[others].numpy(), errs[best].expand_as(errs[others]).numpy(),
                              axis=1, alternative="greater")
        drop = torch.from_numpy(res.pvalue < self.p_value)     # NaN p (no variance) never drops
        if drop.any():
            losers = torch.zeros_like(self.alive)
            losers[idx[others][drop]] = True
            self.eliminate(losers, n)


class AnytimeStrategy(SequentialStrategy):
    """Successive elimination with a time-uniform error guarantee.

    After every shared (t, noise) sample from ``min_samples`` on, each live candidate's paired
    differences to the current leader are checked against the normal-mixture confidence sequence
    (``scoring/sequential.py``) at level ``alpha / (K - 1)``, one pooled variance per image: the
    best class is dropped with probability at most ``alpha``, however many looks and leader
    changes happen (``guarantee="full"``: the class full evaluation on the ``max_samples`` samples
    ranks first, by the finite-population sequence). Elimination stops at ``survivors``
    candidates; more than one survivor are all scored on ``max_samples`` samples and ranked by
    mean error, so top-m stays meaningful.
    """

    Config = AnytimeConfig

    def __init__(self, num_candidates: int, min_samples: int, max_samples: int, alpha: float,
                 survivors: int = 1, guarantee: str = "expected",
                 tightest_at: float = AnytimeConfig.tightest_at, variance: str = "total") -> None:
        super().__init__(num_candidates, min_samples, max_samples)
        self.alpha, self.survivors, self.tightest_at = alpha, survivors, tightest_at
        # "successive": each sample's rank on the sorted noise-level grid (the grids are prefix-ordered)
        self.levels = prefix_order(max_samples) if variance == "successive" else None
        # "full": the pairs are tested against full evaluation on the max_samples samples.
        self.population = max_samples if guarantee == "full" else None
        self.num_compared: int | None = None   # K: the candidates alive at the first look

    @classmethod
    def _build(cls, config: AnytimeConfig, num_candidates: int) -> "AnytimeStrategy":
        return cls(num_candidates, config.min_samples, config.max_samples, config.alpha, config.survivors,
                   config.guarantee, config.tightest_at, config.variance)

    def _test(self, n: int) -> None:
        if self.num_compared is None:  # after any ``allowed`` mask, before any elimination
            self.num_compared = int(self.alive.sum())
        idx = self.alive.nonzero().squeeze(1)
        errs = self.scores[idx, :n].double()                      # (A, n)
        lead = errs.mean(1).argmin()
        others = torch.arange(len(idx)) != lead
        diffs = errs[others] - errs[lead]                      # (A - 1, n)
        drop = eliminated_by_leader(diffs, self.alpha, self.num_compared, tightest_at=self.tightest_at,
                                    population=self.population,
                                    levels=None if self.levels is None else self.levels[:n])
        room = len(idx) - self.survivors                       # never below ``survivors`` candidates
        if int(drop.sum()) > room:
            worst = torch.argsort(diffs.mean(1).masked_fill(~drop, -float("inf")), descending=True)[:room]
            drop = torch.zeros_like(drop)
            drop[worst] = True
        if drop.any():
            losers = torch.zeros_like(self.alive)
            losers[idx[others][drop]] = True
            self.eliminate(losers, n)


class SiftRefineStrategy(Strategy):
    """Sift-and-Refine (Chen et al., NeurIPS 2024, "Diffusion Models are Certifiably Robust
    Classifiers"): a baseline with an absolute threshold, no error level.

    Sift: after every sample n, drop each live candidate whose summed error over the first n samples
    exceeds the lowest sum by more than ``threshold`` (in the model's own error units, so it must be
    chosen per model), until ``keep`` candidates are left or ``max_samples`` are read (then the
    ``keep`` lowest sums survive). Refine: the survivors are scored on all ``max_samples`` samples and
    ranked by mean error, as full evaluation ranks them. The paper's refine draws fresh samples; here
    the survivors reuse the sifted ones, so a survivor's rank is exactly full evaluation's.
    """

    Config = SiftRefineConfig

    def __init__(self, num_candidates: int, max_samples: int, threshold: float, keep: int = 1) -> None:
        super().__init__(num_candidates, max_samples)
        self.threshold, self.keep, self.n, self.sifting = threshold, keep, 0, True

    @classmethod
    def _build(cls, config: SiftRefineConfig, num_candidates: int) -> "SiftRefineStrategy":
        return cls(num_candidates, config.max_samples, config.sift_threshold, config.sift_keep)

    def horizon(self) -> int:
        return self.n + 1 if self.sifting else self.err.shape[1]

    def update(self) -> None:
        total = self.err.shape[1]
        while self.sifting and self.n < total and self.complete(self.n + 1):
            self.n += 1
            idx = self.alive.nonzero().squeeze(1)
            sums = self.scores[idx, : self.n].double().sum(1)                  # (A,)
            drop = sums - sums.min() > self.threshold
            if self.n == total and int((~drop).sum()) > self.keep:  # sift budget spent: the keep best go on
                drop = torch.ones_like(drop)
                drop[torch.argsort(sums, stable=True)[: self.keep]] = False
            if drop.any():
                losers = torch.zeros_like(self.alive)
                losers[idx[drop]] = True
                self.eliminate(losers, self.n)
            self.sifting = int(self.alive.sum()) > self.keep and self.n < total
        if self.alive.sum() <= 1:
            self.finish(self.n)
        elif not self.sifting and self.complete(total):
            self.finish(total)


def make_strategy(options: ScoringOptions, num_candidates: int, allowed: torch.Tensor | None = None) -> Strategy:
    """The strategy ``options`` select, for one image of ``num_candidates`` candidates (``allowed``:
    the ones it may keep, as ``Strategy.from_config``)."""
    config = options.strategy_config
    return Strategy.by_name[config.name].from_config(config, num_candidates, sample_norm=options.error.sample_norm,
                                                     allowed=allowed)


def staged_calls(num_classes: int, n_samples: tuple[int, ...], to_keep: tuple[int, ...], members: int = 1) -> int:
    """Denoiser calls per image of staged evaluation on nested grids (no ties, no look-ahead)."""
    calls, alive, seen = 0, num_classes, 0
    for n, keep in zip(n_samples, to_keep):
        calls += alive * (n - seen) * members
        seen, alive = n, min(alive, keep)
    return calls
