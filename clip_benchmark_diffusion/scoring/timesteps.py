"""Which (timestep, noise) samples an image sees, in which order."""
from __future__ import annotations

import torch


def uniform_grid(n: int, num_train_timesteps: int) -> torch.Tensor:
    """Li et al.'s grid ``range(T // n // 2, T, T // n)``: n evenly spaced timesteps."""
    step = max(num_train_timesteps // n, 1)
    grid = torch.arange(step // 2, num_train_timesteps, step)[:n]
    if len(grid) < n:
        raise ValueError(f"cannot place {n} distinct timesteps in {num_train_timesteps}")
    return grid


def _radical_inverse(i: int) -> float:
    """Base-2 van der Corput value of ``i``."""
    out, f = 0.0, 0.5
    while i:
        out += f * (i & 1)
        i >>= 1
        f /= 2
    return out


def sample_order(n: int, num_train_timesteps: int) -> torch.Tensor:
    """The uniform grid of ``n`` timesteps, ordered so that every prefix is spread out.

    Sample ``k`` of an image uses timestep ``order[k]``. Ordering by the van der Corput sequence
    makes the prefixes nested near-uniform grids (exactly uniform at powers of two), so staged
    evaluation reuses every earlier sample and successive elimination always sees the whole
    timestep range.
    """
    grid = uniform_grid(n, num_train_timesteps)
    order = sorted(range(n), key=_radical_inverse)
    return grid[torch.tensor(order)]
