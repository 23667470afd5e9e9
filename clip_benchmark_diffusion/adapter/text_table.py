"""The text side of the class table: each prompt's conditioning rows and the candidate table built
from them, one row per prompt (``error_mean``) or one mean row per class (``embedding_mean``).

Memory at ImageNet scale decides the shape. A real SD3's T5 row is 333 x 4096 bfloat16 values
(2.7 MB), so 1,000 classes x 80 templates as one row per prompt is 218 GB, and as class means 2.7 GB.
Hence:

- prompts are encoded ``batching.ENCODE_CHUNK`` at a time, and an ``embedding_mean`` table keeps a
  class's prompt rows only until its mean is taken: its memory grows with the classes, not the prompts;
- the table is allocated once, where it will live (pinned CPU memory when it will be streamed to a
  CUDA device), and filled row by row; the rows kept for reuse are views of it, so the host holds one
  copy, and a rebuild over the same prompts (new options, a new task on the same classes) reuses it;
- its size is known after the first chunk, and a table larger than the host's available memory is
  refused then, in one line that says what to change, before the other prompts are encoded.

Rows are reused while the options keep the tokens the model reads (``max_sequence_length``).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from itertools import chain

import torch

from clip_benchmark_diffusion.adapter.conditioning import mean_rows, stack_rows
from clip_benchmark_diffusion.adapter.prompts import PromptTable
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import batching
from clip_benchmark_diffusion.scoring.engine import Candidates, Conditioning

Row = tuple[Hashable, Conditioning]


class TextTable:
    """The text encoders' rows of ``prompts`` under ``model``, and the candidate tables made of them."""

    def __init__(self, model: LoadedModel, prompts: PromptTable) -> None:
        self.model, self.prompts = model, prompts
        self._token_limits: list[int] | None = None     # what the kept rows were encoded with
        self._keys: list[Hashable] = []                  # the rows of the last table: prompt ids, or
        self._rows: dict[Hashable, Conditioning] = {}    # ("mean", prompt ids) per class; views of it
        self._host: Conditioning | None = None

    def conditioning(self, prompt_ids: list[int], options: ScoringOptions) -> Conditioning:
        """The stacked text states of ``prompt_ids``: the kept rows, the others encoded now and not kept
        (caption selection encodes each batch's captions; keeping them would grow with the dataset)."""
        self._check_limits(options)
        fresh = dict(self._encoded(sorted({i for i in prompt_ids if i not in self._rows}), options))
        return stack_rows([self._rows[i] if i in self._rows else fresh[i] for i in prompt_ids])

    def candidates(self, groups: list[torch.Tensor], options: ScoringOptions,
                   device: torch.device) -> tuple[Candidates, bool]:
        """The classes ``groups`` (each its prompt ids) as the engine's candidate table on ``device``,
        and whether it is streamed from pinned CPU memory."""
        self._check_limits(options)
        ids = [tuple(grp.tolist()) for grp in groups]
        if options.template_ensemble == "embedding_mean":
            keys: list[Hashable] = [("mean", g) for g in dict.fromkeys(ids)]
            row = {k: r for r, k in enumerate(keys)}
            members = torch.tensor([[row[("mean", g)]] for g in ids], dtype=torch.long)   # (G, 1)
            cond, streamed = self._table(keys, lambda missing: self._class_means(missing, options), device,
                                         hint="use fewer classes or a shorter max_sequence_length")
        else:
            keys = sorted({i for g in ids for i in g})
            row = {k: r for r, k in enumerate(keys)}
            members = torch.full((len(ids), max(len(g) for g in ids)), -1, dtype=torch.long)
            for c, g in enumerate(ids):
                uniq = list(dict.fromkeys(g))
                members[c, : len(uniq)] = torch.tensor([row[i] for i in uniq])
            cond, streamed = self._table(keys, lambda missing: self._encoded(missing, options), device,
                                         hint="use template_ensemble=embedding_mean (one row per class) "
                                              "or fewer templates")
        return Candidates(cond=cond, members=members), streamed

    @property
    def host(self) -> Conditioning | None:
        """The last table as the host holds it (the candidates' own tensors off CUDA or when streamed)."""
        return self._host

    def held_bytes(self) -> int:
        """Host memory the text side holds: the last table and the kept rows, each storage counted once
        (the kept rows are views of the table, so this is the table's size)."""
        tensors = [v for row in self._rows.values() for v in row.values()] + list((self._host or {}).values())
        return sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in tensors}.values())

    # -- internals ---------------------------------------------------------------------------
    def _check_limits(self, options: ScoringOptions) -> None:
        limits = [limit for _, _, limit in self.model.token_limits(options)]
        if limits != self._token_limits:
            self._keys, self._rows, self._host, self._token_limits = [], {}, None, limits

    def _table(self, keys: list[Hashable], produce: Callable[[list[Hashable]], Iterable[Row]], device: torch.device,
               hint: str) -> tuple[Conditioning, bool]:
        """One row per key, in order: the kept rows, then ``produce(missing keys)``'s, written into a
        table allocated once where it will live; the kept rows become views of it."""
        if keys != self._keys or self._host is None:
            missing = [k for k in keys if k not in self._rows]
            produced: Iterator[Row] = iter(produce(missing)) if missing else iter(())
            first = next((self._rows[k] for k in keys if k in self._rows), None)
            head: list[Row] = []
            if first is None:
                head = [next(produced)]
                first = head[0][1]
            nbytes = len(keys) * batching.table_bytes(first)
            self._check_host_memory(nbytes, len(keys), hint)
            home = batching.table_home(nbytes, device)
            host = {k: torch.empty((len(keys), *v.shape), dtype=v.dtype, pin_memory=home == "pinned")
                    for k, v in first.items()}
            position = {k: r for r, k in enumerate(keys)}
            kept = ((k, self._rows[k]) for k in keys if k in self._rows)
            written = set()
            for key, row in chain(kept, head, produced):
                for name, value in row.items():
                    host[name][position[key]] = value
                written.add(key)
            if len(written) != len(keys):      # an unwritten row would be uninitialised memory
                raise RuntimeError(f"text table: {len(keys) - len(written)} of {len(keys)} rows were not produced")
            self._keys, self._host = list(keys), host
            self._rows = {k: {name: v[r] for name, v in host.items()} for k, r in position.items()}
        return batching.place_table(self._host, device)   # a host or pinned table is streamed as itself

    def _check_host_memory(self, nbytes: int, rows: int, hint: str) -> None:
        free = batching.host_free_bytes()
        if nbytes > free:
            raise UserError(f"the conditioning table needs {nbytes / 1e9:.1f} GB ({rows} rows of "
                            f"{nbytes / rows / 1e6:.2f} MB) and this machine has {free / 1e9:.1f} GB available: "
                            f"{hint}")

    def _encoded(self, ids: list[int], options: ScoringOptions) -> Iterator[Row]:
        """``(prompt id, row)`` for ``ids``, through the text encoders a chunk at a time, on the CPU."""
        for s in range(0, len(ids), batching.ENCODE_CHUNK):
            part = ids[s: s + batching.ENCODE_CHUNK]
            cond = {k: v.cpu() for k, v in self.model.encode_prompts([self.prompts.texts[i] for i in part],
                                                                     options).items()}
            for j, i in enumerate(part):
                yield i, {k: v[j] for k, v in cond.items()}

    def _class_means(self, keys: Iterable[Hashable], options: ScoringOptions) -> Iterator[Row]:
        """``(("mean", ids), mean row)`` per class: its prompts' rows (kept ones, else encoded) are held
        only until the last class that uses them has its mean."""
        groups = [key[1] for key in keys]
        rows = {i: self._rows[i] for g in groups for i in g if i in self._rows}
        todo = sorted({i for g in groups for i in g} - rows.keys())
        uses = Counter(i for g in groups for i in set(g))
        waiting = {g: len(set(g) - rows.keys()) for g in groups}
        holders: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for g in groups:
            for i in set(g):
                holders[i].append(g)

        def mean(g: tuple[int, ...]) -> Row:
            out = mean_rows([rows[i] for i in g])
            for i in set(g):
                uses[i] -= 1
                if not uses[i]:
                    del rows[i]
            return ("mean", g), out

        for g in groups:
            if not waiting[g]:
                yield mean(g)
        for i, row in self._encoded(todo, options):
            rows[i] = row
            for g in holders[i]:
                waiting[g] -= 1
                if not waiting[g]:
                    yield mean(g)
