"""ESamp's decode step in the form a captured CUDA graph can replay.

A graph replays fixed kernels on fixed addresses, so everything the step reads or writes per row
lives in persistent buffers sized for the largest captured batch: β and slot are loaded from the
host *before* a replay (``load``), the step inside the graph reads them and writes the rows'
shallow state, deep state, ĥ and novelty into snapshot buffers (``step``), and the host reads
those *after* the replay (``rows``) — to queue the training job, to post-filter, to report.
Rows past the live batch (the graph's padding) carry β = 0 and come out unchanged.

The same object runs eagerly on CPU (``--esamp-decode-path graph``), which is how these machines
verify the logic; capture and replay themselves can only be exercised on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from esamp_sgl.config import MixVariant
from esamp_sgl.distiller import Params
from esamp_sgl.latent_step import distill_and_mix, distill_and_mix_sharded


@dataclass(frozen=True)
class Snapshot:
    """The live rows of the last step, views into the persistent buffers (valid until the next
    step writes them again: copy what must outlive it)."""

    x: torch.Tensor  # [n, d] fp32 shallow state
    h: torch.Tensor  # [n, d] fp32 final normalized state
    h_hat: torch.Tensor  # [n, d] fp32 distiller prediction (= h on rows with β = 0)
    novelty: torch.Tensor  # [n] fp32


class GraphRows:
    def __init__(self, max_rows: int, d: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.beta = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self.slot = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.held = torch.zeros(max_rows, dtype=torch.bool, device=device)  # rows of this rank's groups
        self.x = torch.zeros(max_rows, d, dtype=torch.float32, device=device)
        self.h = torch.zeros_like(self.x)
        self.h_hat = torch.zeros_like(self.x)
        self.novelty = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self._live = 0  # rows [0, _live) hold a step's β; the rest are zero
        self._pin = device.type == "cuda"
        # Post-filter: where the captured graphs' LM head writes L([h; ĥ]) (paired_logits), and
        # each graph's L(ĥ) rows in it, keyed by the graph's (padded) batch size.
        self._paired_logits: torch.Tensor | None = None
        self.amateur_by_rows: dict[int, torch.Tensor] = {}

    def load(self, beta: list[float], slot: list[int]) -> None:
        """Before a step: β and bank slot of the live rows (host lists, row i = batch row i; slot
        −1: a row of no group, or of a group another TP rank holds); every other row gets β = 0.
        One host-to-device copy per buffer, no sync."""
        n = len(beta)
        if n > self.max_rows:
            raise ValueError(f"{n} rows exceed the {self.max_rows} rows captured")
        if n == 0 and self._live == 0:
            return
        self.beta[n:].zero_()
        self.held[n:].zero_()
        if n:
            self.beta[:n].copy_(torch.tensor(beta, dtype=torch.float32, pin_memory=self._pin), non_blocking=True)
            self.slot[:n].copy_(torch.tensor([max(s, 0) for s in slot], dtype=torch.int64, pin_memory=self._pin),
                                non_blocking=True)
            self.held[:n].copy_(torch.tensor([s >= 0 for s in slot], dtype=torch.bool, pin_memory=self._pin),
                                non_blocking=True)
        self._live = n

    def clear(self) -> None:
        """β = 0 on every row: the next step leaves every row as it is."""
        self.load([], [])

    def step(self, params: Params, x: torch.Tensor, h: torch.Tensor, variant: MixVariant, mix: bool,
             start: Params | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             on_error: Callable[[Exception], None] | None = None) -> torch.Tensor:
        """Inside the graph, for all n rows of the (padded) batch: ĥ, novelty and the snapshot;
        returns h with every row mixed (``mix``) or h unchanged (post-filter mode mixes the logits
        after the graph, from the snapshot's ĥ). ``start``: as in distill_and_mix; ``reduce`` and
        ``on_error``: the groups are sharded over TP ranks (distill_and_mix_sharded). Graph-safe:
        fixed shapes, no host syncs."""
        n = h.shape[0]
        if reduce is None:
            h_mix, h_hat, novelty = distill_and_mix(params, x, h, self.slot[:n], self.beta[:n], variant, start=start)
        else:
            h_mix, h_hat, novelty = distill_and_mix_sharded(params, x, h, self.slot[:n], self.held[:n],
                                                            self.beta[:n], reduce, variant, start=start,
                                                            on_error=on_error)
        self.x[:n].copy_(x)
        self.h[:n].copy_(h)
        self.h_hat[:n].copy_(h_hat)
        self.novelty[:n].copy_(novelty)
        return h_mix if mix else h

    def paired_logits(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """The logits buffer for an LM-head pass over [h; ĥ] (``rows`` = 2n) in a decode graph:
        one buffer of 2·max_rows rows that every captured graph writes, as they all write SGLang's
        own logits buffer (``like``: its width and dtype), which 2n rows do not fit. Without it
        SGLang gives each graph a fresh [2n, V] fp32 output that the graph keeps for good: for
        SGLang's batch sizes up to 256 and a 152k vocabulary, ≈ 5 GB. None if ``rows`` exceed it."""
        if rows > 2 * self.max_rows:
            return None
        if self._paired_logits is None or self._paired_logits.shape[1:] != like.shape[1:]:
            self._paired_logits = torch.empty(2 * self.max_rows, *like.shape[1:], dtype=like.dtype, device=like.device)
        return self._paired_logits[:rows]

    def captured_amateur(self, rows: int) -> torch.Tensor | None:
        """The L(ĥ) the graph captured for ``rows`` (padded) rows computes (None if unknown)."""
        return self.amateur_by_rows.get(rows)

    def rows(self, n: int) -> Snapshot:
        """After a step: the first ``n`` (live) rows it wrote."""
        return Snapshot(self.x[:n], self.h[:n], self.h_hat[:n], self.novelty[:n])
