"""The distiller bank: one small distiller per exploration group, all in batched tensors.

Distiller (reference form): ĥ = LayerNorm(x + ((x·A) ⊙ SiLU(x·G + b))·B), with per-slot
A, G ∈ R^{d×r}, b ∈ R^r, B ∈ R^{r×d} and LayerNorm weight/bias ∈ R^d. Slot s of every group is
row s of each bank tensor, so one call serves a batch whatever its mix of groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller_grads import loss_and_grads
from esamp_sgl.transfer import to_device

PARAM_NAMES = ("A", "G", "b", "B", "ln_w", "ln_b")
Params = tuple[torch.Tensor, ...]  # in PARAM_NAMES order, each with a leading slot dimension


def distill(x: torch.Tensor, A: torch.Tensor, G: torch.Tensor, b: torch.Tensor, B: torch.Tensor,
            ln_w: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """The distiller on x [..., n, d] with weights A, G [..., d, r], b [..., 1, r] or [r], B [..., r, d]."""
    y = x + torch.matmul(torch.matmul(x, A) * F.silu(torch.matmul(x, G) + b), B)
    return F.layer_norm(y, (y.shape[-1],)) * ln_w + ln_b


def distiller_forward(params: Params, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """ĥ for rows x [N, d], row i using slot[i]. Graph-safe: fixed shapes, no host syncs.

    Rows gather their slot's weights ([N, d, r] each), which is simple and fine at the row
    counts of one decode step; the Triton kernel avoids the gather on GPU.
    """
    A, G, b, B, ln_w, ln_b = (p.index_select(0, slot) for p in params)
    return distill(x.unsqueeze(1), A, G, b.unsqueeze(1), B, ln_w.unsqueeze(1), ln_b.unsqueeze(1)).squeeze(1)


WARMUP_PADDED_ROWS = 4096  # per warm-up step: groups × the widest group's rows (at d = 4096, 64 MiB fp32)


def slot_chunks(slot: list[int], budget: int) -> list[list[int]]:
    """``slot`` as per-row slot lists, one per chunk of groups (rows of other chunks −1), each
    chunk's groups padded to its widest holding at most ``budget`` rows (a group wider than
    ``budget`` makes a chunk alone)."""
    counts: dict[int, int] = {}
    for s in slot:
        if s >= 0:
            counts[s] = counts.get(s, 0) + 1
    chunks: list[set[int]] = []
    widest = 0
    for s, rows in sorted(counts.items(), key=lambda item: item[1]):  # narrow groups together
        if chunks and max(widest, rows) * (len(chunks[-1]) + 1) <= budget:
            chunks[-1].add(s)
        else:
            chunks.append({s})
        widest = rows  # sorted: the newest is the widest of its chunk
    return [[s if s in chunk else -1 for s in slot] for chunk in chunks]


@dataclass(frozen=True)
class RowGroups:
    """Rows of one batch grouped by slot, built on the host (no device sync): [L, n] row indices
    padded with N."""

    live: torch.Tensor  # [L] distinct slots ≥ 0, sorted
    index: torch.Tensor  # [L, n] row indices into x; padding points at row N (a zero row)
    valid: torch.Tensor  # [L, n] False on padding

    @classmethod
    def of(cls, slot: torch.Tensor | list[int], device: torch.device) -> "RowGroups":
        slot = slot.tolist() if isinstance(slot, torch.Tensor) else list(slot)
        members: dict[int, list[int]] = {}
        for row, s in enumerate(slot):  # plain Python: a few rows, and no tiny-tensor ops
            if s >= 0:
                members.setdefault(s, []).append(row)
        live = sorted(members)
        width = max((len(m) for m in members.values()), default=0)
        padded = [members[s] + [len(slot)] * (width - len(members[s])) for s in live]
        index = torch.tensor(padded, dtype=torch.int64).view(len(live), width)
        return cls(to_device(torch.tensor(live, dtype=torch.int64), torch.int64, device),
                   to_device(index, torch.int64, device), to_device(index < len(slot), torch.bool, device))


def distiller_forward_grouped(params: Params, x: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """ĥ [L, n, d] for the grouped rows: one batched product per weight, no per-row weight gather
    (which costs r times more memory traffic). Eager only: the grouping is data-dependent."""
    L, n = groups.index.shape
    rows = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, groups.index.flatten()).view(L, n, x.shape[1])
    A, G, b, B, ln_w, ln_b = params
    return distill(rows, A, G, b.unsqueeze(1), B, ln_w.unsqueeze(1), ln_b.unsqueeze(1))


def init_slot(d: int, cfg: ESampConfig, *, generator: torch.Generator | None = None,
              base: dict[str, torch.Tensor] | None = None,
              mlp: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights a fresh slot starts from, by ``cfg.init``.

    random: N(0, init_std), gate bias ``gate_bias``, LayerNorm identity (the reference).
    base:   a copy of a per-model base distiller (``base``: tensors named as PARAM_NAMES).
    svd:    from the model's last MLP (``mlp``: gate_proj [I, d], up_proj [I, d], down_proj [d, I]):
            the top-r singular directions of down_proj pick the intermediate subspace, so the
            distiller starts as a rank-r projection of that MLP.
    """
    r = cfg.rank
    if cfg.init == "base":
        if base is None:
            raise ValueError("init='base' needs a base distiller")
        return {k: base[k].detach().to(torch.float32).clone() for k in PARAM_NAMES}
    weights = {
        "A": torch.randn(d, r, generator=generator) * cfg.init_std,
        "G": torch.randn(d, r, generator=generator) * cfg.init_std,
        "b": torch.full((r,), cfg.gate_bias),
        "B": torch.randn(r, d, generator=generator) * cfg.init_std,
        "ln_w": torch.ones(d),
        "ln_b": torch.zeros(d),
    }
    if cfg.init == "svd":
        if mlp is None:
            raise ValueError("init='svd' needs the model's last MLP weights")
        down = mlp["down_proj"].to(torch.float32)  # [d, I]
        u, s, vh = torch.linalg.svd(down, full_matrices=False)
        v_r = vh[:r].T  # [I, r]
        weights["A"] = mlp["up_proj"].to(torch.float32).T @ v_r
        weights["G"] = mlp["gate_proj"].to(torch.float32).T @ v_r
        weights["b"] = torch.zeros(r)
        weights["B"] = (u[:, :r] * s[:r]).T.contiguous()
    return weights


class DistillerBank:
    """``num_slots`` distillers of width ``d`` with their optimizer state."""

    def __init__(self, num_slots: int, d: int, cfg: ESampConfig, *, device: torch.device | str = "cpu",
                 seed: int = 0, base: dict[str, torch.Tensor] | None = None,
                 mlp: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg, self.d, self.num_slots = cfg, d, num_slots
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        template = init_slot(d, cfg, generator=gen, base=base, mlp=mlp)
        self.template = tuple(template[k].to(self.device) for k in PARAM_NAMES)
        self.params: Params = tuple(t.unsqueeze(0).repeat(num_slots, *([1] * t.dim())) for t in self.template)
        n_state = 2 if cfg.optimizer == "adamw" else 0
        self.state = [tuple(torch.zeros_like(p) for p in self.params) for _ in range(n_state)]
        self.slot_steps = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        self.train_steps = 0
        self.reset_count = torch.zeros((), dtype=torch.int64, device=self.device)  # device-side: no sync
        self.last_loss: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0, dtype=torch.int64), torch.empty(0))

    def checksum(self) -> str:
        """A digest of every slot's weights, bit for bit: equal across tensor-parallel ranks that
        trained alike. Waits for the device (a side stream may be training): /server_info only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        digest = hashlib.sha256()
        for p in self.params:
            digest.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def reset_slots(self, slots: torch.Tensor) -> None:
        """Give ``slots`` fresh weights and optimizer state."""
        for p, t in zip(self.params, self.template):
            p[slots] = t
        for moments in self.state:
            for m in moments:
                m[slots] = 0
        self.slot_steps[slots] = 0

    @torch.no_grad()
    def predict(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return distiller_forward(self.params, x.to(torch.float32), slot)

    def train_step(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor | list[int]) -> None:
        """One optimizer step per slot present in ``slot`` (rows with slot < 0 are skipped).

        ``slot`` is read on the host (a CPU tensor or list, as the scheduler knows it), so that
        grouping rows by slot costs no device sync and a CUDA side stream never blocks the host.
        Each slot's loss is the MSE over its own rows (fp32): a slot's update does not depend on
        other groups' rows. A slot whose weights become non-finite is reset and counted.
        Losses before the step land in ``last_loss`` as (slots, losses) tensors.
        """
        groups = RowGroups.of(slot, self.device)
        if len(groups.live) == 0:
            return
        L, n = groups.index.shape
        flat_index = groups.index.flatten()
        rows = torch.cat([x.to(torch.float32), x.new_zeros(1, x.shape[1], dtype=torch.float32)])
        rows = rows.index_select(0, flat_index).view(L, n, -1)
        target = torch.cat([h.to(torch.float32), h.new_zeros(1, h.shape[1], dtype=torch.float32)])
        target = target.index_select(0, flat_index).view(L, n, -1)
        valid = groups.valid.to(torch.float32)
        weight = valid / valid.sum(1, keepdim=True)
        for step in range(self.cfg.steps_per_decode):
            # index_select copies: the live slots' weights, updated in place and written back.
            sub = tuple(p.index_select(0, groups.live) for p in self.params)
            slot_loss, grads = loss_and_grads(sub, rows, target, weight)
            if step == 0:
                self.last_loss = (groups.live, slot_loss)
            updated = self._apply_update(groups.live, sub, grads)
        self._reset_non_finite(groups.live, updated)
        self.train_steps += 1

    def warm_up(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor | list[int]) -> None:
        """``cfg.warmup_steps`` training steps on prompt (prefill) states before decoding;
        ``slot`` per row as in train_step. A step pads every group to the widest one ([groups,
        widest, d] fp32 per temporary: one long prompt beside many would take GBs at 7B), so the
        groups train in chunks of at most WARMUP_PADDED_ROWS padded rows; a slot's update depends
        on its own rows alone, so the chunks change nothing else."""
        for chunk in slot_chunks(slot.tolist() if isinstance(slot, torch.Tensor) else list(slot),
                                 WARMUP_PADDED_ROWS):
            for _ in range(self.cfg.warmup_steps):
                self.train_step(x, h, chunk)

    def losses(self) -> dict[int, float]:
        """{slot: loss before the last step} (a host sync; for tests and reporting)."""
        live, loss = self.last_loss
        return dict(zip(live.tolist(), loss.tolist()))

    def _apply_update(self, live: torch.Tensor, sub: Params, grads: Params) -> Params:
        """Write the live slots' updated weights into the bank, in place of the copies ``sub``
        (no [L, d, r] temporaries: on CPU fresh tensors of that size cost page faults every
        step); returns them, as written."""
        cfg = self.cfg
        self.slot_steps[live] += 1
        updated = sub
        if cfg.optimizer == "sgd":
            for p, s, g in zip(self.params, updated, grads):
                p.index_copy_(0, live, s.sub_(g, alpha=cfg.lr))
            return updated
        beta1, beta2, eps, weight_decay = 0.9, 0.999, 1e-8, 0.01
        step = self.slot_steps[live].to(torch.float32)
        m_all, v_all = self.state
        for p, s, g, m_bank, v_bank in zip(self.params, updated, grads, m_all, v_all):
            shape = (-1,) + (1,) * (g.dim() - 1)
            m = m_bank.index_select(0, live).mul_(beta1).add_(g, alpha=1 - beta1)
            v = v_bank.index_select(0, live).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1 ** step).view(shape)
            v_hat = v / (1 - beta2 ** step).view(shape)
            s.mul_(1 - cfg.lr * weight_decay).sub_(cfg.lr * m_hat / (v_hat.sqrt() + eps))
            p.index_copy_(0, live, s)
            m_bank.index_copy_(0, live, m)
            v_bank.index_copy_(0, live, v)
        return updated

    def _reset_non_finite(self, live: torch.Tensor, written: Params) -> None:
        """Reset live slots whose weights (``written``: what the step wrote for them) are not all
        finite (a NaN/inf reaches the slot's sum)."""
        finite = torch.stack([w.flatten(1).sum(1) for w in written]).isfinite().all(0)
        if self.device.type == "cpu":
            bad = live[~finite]
            if len(bad):
                self.reset_slots(bad)
                self.reset_count += len(bad)
            return
        # On CUDA, without a host sync: every live slot is rewritten, bad ones from the template.
        for p, w, t in zip(self.params, written, self.template):
            p.index_copy_(0, live, torch.where(finite.view((-1,) + (1,) * t.dim()), w, t))
        for moments in self.state:
            for m in moments:
                m[live] = torch.where(finite.view((-1,) + (1,) * (m.dim() - 1)), m[live], 0)
        self.slot_steps[live] = torch.where(finite, self.slot_steps[live], 0)
        self.reset_count += (~finite).sum()
