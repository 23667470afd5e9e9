"""One image's result: its class ranking, mean errors, samples seen and the probabilities made from
them (``Outcome``: what ``strategies.py`` builds and calibration reads), with its cost and seed
(``ImageResult``: what the engine returns and the score store keeps as JSON)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Outcome:
    """The result for one image."""

    rank: torch.Tensor          # (G,) 0 = best
    # (G,) mean class error over the samples each candidate saw (sample_norm "mean": of the normalised errors)
    mean_error: torch.Tensor
    samples: torch.Tensor       # (G,) samples each candidate saw
    # (G,) P(candidate has the lowest expected error | the samples seen); see ``sequential.best_probability``.
    # None in results stored before it existed.
    prob: torch.Tensor | None = None
    # (G,) each candidate's mean paired difference to the top-1 class over the samples it used (0 for
    # the top-1, NaN if unscored): what a temperature turns into probabilities. None in older results.
    gap: torch.Tensor | None = None

    def gaps(self) -> torch.Tensor:
        """``gap``, or for results stored before it, the unpaired difference of mean errors."""
        if self.gap is not None:
            return self.gap
        return torch.where(self.samples > 0, self.mean_error - self.mean_error[self.rank.argmin()], float("nan"))

    def probabilities(self, temperature: float, power: float = 1.0) -> torch.Tensor | None:
        """(G,) float64 class probabilities: the sampling posterior ``prob`` (``temperature`` 0; None in
        results stored before it existed) or the temperature-scaled softmax of the paired gaps
        (``calibration.error_softmax``); unscored candidates get 0."""
        if not temperature:
            return self.prob
        from clip_benchmark_diffusion.calibration import error_softmax

        gaps = self.gaps().double().nan_to_num(0.0).numpy()
        return torch.from_numpy(error_softmax(gaps, self.samples.numpy(), temperature, power))

    def top1_probability(self, temperature: float, power: float = 1.0) -> float | None:
        """The top-1 class's entry of ``probabilities``."""
        prob = self.probabilities(temperature, power)
        return None if prob is None else float(prob[int(self.rank.argmin())])

    @property
    def confidence(self) -> float | None:
        """The probability of the top-1 class."""
        return None if self.prob is None else float(self.prob[self.rank.argmin()])


@dataclass
class ImageResult:
    outcome: Outcome
    denoiser_calls: int
    seed: int
    # Wall time charged to this image: its share of its scoring call, in proportion to its calls.
    seconds: float = 0.0

    def to_payload(self) -> dict:
        """Plain JSON for the score store."""
        o = self.outcome
        return {"rank": o.rank.tolist(), "mean_error": o.mean_error.tolist(), "samples": o.samples.tolist(),
                "prob": None if o.prob is None else o.prob.tolist(),
                "gap": None if o.gap is None else o.gap.tolist(),
                "calls": self.denoiser_calls, "seed": self.seed, "seconds": self.seconds}

    @classmethod
    def from_payload(cls, p: dict) -> "ImageResult":
        prob = p.get("prob")  # absent in payloads stored before calibrated confidence
        outcome = Outcome(rank=torch.tensor(p["rank"]), mean_error=torch.tensor(p["mean_error"]),
                          samples=torch.tensor(p["samples"]),
                          prob=None if prob is None else torch.tensor(prob, dtype=torch.float64),
                          gap=None if p.get("gap") is None else torch.tensor(p["gap"]))
        return cls(outcome=outcome, denoiser_calls=p["calls"], seed=p["seed"], seconds=p["seconds"])
