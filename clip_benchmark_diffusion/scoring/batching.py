"""Denoiser batches sized to the device (issue 27): ``batch_size=0`` ("auto").

On CUDA the engine probes, once per model and options, the largest batch of the run's own inputs
(family, resolution, dtype, conditioning) that runs without an out-of-memory error: it doubles
from ``AUTO_START`` until a batch fails or reaches ``AUTO_MAX``, then bisects between the last
batch that ran and the first that failed. An out-of-memory error later (fragmentation, a longer
prompt) still halves the batch with nothing lost (``ScoringEngine._run_fitting``). Elsewhere
memory is not the limit and a larger batch buys little (scripts/benchmark_throughput.py), so
``auto`` is ``AUTO_CPU``, the default before ``auto`` existed.

The conditioning table is the other memory that grows with a run: at ImageNet scale with
``error_mean`` (1,000 classes x 80 templates) a T5 family's table is 80k rows of up to 333 tokens.
:func:`table_home` keeps it on the device when it fits in ``TABLE_SHARE`` of the free memory and
in pinned CPU memory otherwise; the engine then moves only each batch's rows to the device, so
device memory grows with the batch, not with the class count. The host holds the table once
(``adapter/text_table.py``), and a table larger than the host's available memory is refused before
its prompts are encoded.
"""
from __future__ import annotations

import contextlib
import functools
import resource
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import psutil
import torch

ENCODE_CHUNK = 512   # prompts per text-encoder call (80k at once would hold 80k prompts' activations)
AUTO_CPU = 64        # rows per forward when memory is not the limit
AUTO_START = 8       # the first CUDA probe
AUTO_MAX = 1024      # beyond this no family gains throughput, and one round's items rarely fill it
TABLE_SHARE = 0.25   # the share of free device memory a resident conditioning table may take
STATIC_SIZES = 5     # row counts a denoiser compiled with static shapes sees: batch, batch/2, ..., batch/16


class CpuWorkers:
    """``cpu_workers=N`` on a CPU: one denoiser batch runs as N contiguous row slices at once, each in its
    own thread with 1/N of torch's threads (a thread's OpenMP team is its own, so the slices do not
    share cores). A small denoiser's kernels (the shipped 28 px UNet's convolutions have 16 to 64
    channels) do not keep several threads busy: at batch 200 two threads do 1.5x one thread's work, so
    two one-thread slices can gain up to 1.25x on 2 cores; measured 1.0x to 1.2x (docs/throughput.md).
    Each row's inputs are the same as in one call and the slices are put back in order, so scores
    are those of a smaller denoiser batch."""

    def __init__(self, workers: int, device: torch.device, threads: int | None = None) -> None:
        self.workers = workers if device.type == "cpu" else 1
        self.threads = max(1, (threads or torch.get_num_threads()) // self.workers)

    def map(self, run: Callable[[slice], torch.Tensor], rows: int) -> torch.Tensor:
        """``run`` over ``rows`` rows in slices (one call when there is one worker or too few rows);
        the outputs concatenated in row order."""
        n = min(self.workers, rows)
        if n <= 1:
            return run(slice(0, rows))
        cuts = [rows * j // n for j in range(n + 1)]
        futures = [_pool(self.workers).submit(self._run_slice, run, slice(lo, hi), self.threads)
                   for lo, hi in zip(cuts, cuts[1:])]
        return torch.cat([f.result() for f in futures])

    @staticmethod
    def _run_slice(run: Callable[[slice], torch.Tensor], rows: slice, threads: int) -> torch.Tensor:
        if torch.get_num_threads() != threads:   # this worker thread's own setting, made once
            torch.set_num_threads(threads)
        with torch.no_grad():                    # grad mode is per thread: the caller's does not carry over
            return run(rows)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per worker count for the process: its threads keep their thread setting between batches."""
    return ThreadPoolExecutor(workers, thread_name_prefix="denoiser")


def largest_fitting_batch(fits: Callable[[int], bool], start: int = AUTO_START, cap: int = AUTO_MAX) -> int:
    """The largest n in [1, cap] with ``fits(n)``, assuming that a batch that fits makes every smaller
    one fit; ``fits`` runs one batch of n rows and says whether memory sufficed. At most about
    2 log2(cap) probes; 1 when even one row does not fit (the run then fails on its first batch)."""
    lo, hi = 0, min(start, cap)             # lo: largest known to fit (0: none); hi: smallest known to fail
    if fits(hi):
        lo = hi
        while lo < cap:                     # double until a failure or the cap
            n = min(2 * lo, cap)
            if not fits(n):
                hi = n
                break
            lo = n
        else:
            return cap
    else:
        n = hi
        while n > 1:                        # halve until one fits
            n //= 2
            if fits(n):
                lo = n
                break
            hi = n
        if lo == 0:
            return 1
    while hi - lo > 1:                      # bisect between the last fit and the first failure
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def static_rows(n: int, batch: int) -> int:
    """The rows a batch of ``n`` is padded to for a denoiser compiled with static shapes (``compile=on``):
    the smallest of ``batch``, ``ceil(batch / 2)``, ..., ``ceil(batch / 16)`` that holds it, so that a
    run compiles at most ``STATIC_SIZES`` shapes per batch size and a partial batch wastes at most half
    its rows (the tiny ones below batch/16 more). ``n`` itself when it exceeds ``batch``."""
    if n >= batch:
        return n
    sizes = [-(-batch // 2**j) for j in range(STATIC_SIZES)]
    return min(s for s in sizes if s >= n)


def eager_probes() -> contextlib.AbstractContextManager:
    """Compiled modules run eagerly inside (``torch.compiler.set_stance``, torch >= 2.6): the auto batch
    probe tries a dozen row counts that would each compile a static shape."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def table_bytes(cond: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in cond.values())


def table_home(nbytes: int, device: torch.device, free_bytes: Callable[[], int] | None = None) -> str:
    """Where a conditioning table of ``nbytes`` should live: ``"device"`` (off CUDA, or on a CUDA device
    when it takes at most ``TABLE_SHARE`` of the free memory), else ``"pinned"`` CPU memory, from which
    the engine gathers each batch's rows and moves only those (``"host"`` where no CUDA can pin)."""
    if device.type != "cuda":
        return "device"
    free = free_bytes() if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    if nbytes <= TABLE_SHARE * free:
        return "device"
    return "pinned" if torch.cuda.is_available() else "host"   # a CUDA-less process can only plan


def place_table(cond: dict[str, torch.Tensor], device: torch.device,
                free_bytes: Callable[[], int] | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """The conditioning table moved where :func:`table_home` says: ``(table, streamed)``. A table already
    there is returned as itself (``to``, ``cpu`` and ``pin_memory`` return a tensor already in place)."""
    home = table_home(table_bytes(cond), device, free_bytes)
    if home == "device":
        return {k: v.to(device) for k, v in cond.items()}, False
    return {k: (v.cpu().pin_memory() if home == "pinned" else v.cpu()) for k, v in cond.items()}, True


def host_free_bytes() -> int:
    """Memory the host can still give this process (what the kernel calls available)."""
    return int(psutil.virtual_memory().available)


def gather_rows(cond: dict[str, torch.Tensor], rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's conditioning rows, gathered where the table lives and moved to ``device``
    (asynchronously from pinned memory)."""
    return {k: v[rows.to(v.device)].to(device, non_blocking=True) for k, v in cond.items()}


def peak_memory_bytes(device: torch.device) -> int:
    """The run's peak memory: allocated on a CUDA device, else the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or the RuntimeError other backends raise."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or \
            isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
