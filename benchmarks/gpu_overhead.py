"""ESamp's decode-step cost against a Llama-7B-shaped decode step, on one CUDA GPU.

Run by scripts/gpu_check.py (torch + triton only: no SGLang, no model download). The model is
built from random bf16 weights with Llama-2-7B's shapes (32 layers, d = 4096, MLP 11008, 32 heads,
vocabulary 32000) and decodes one token per row against a fixed KV cache of CONTEXT tokens; the
decoder up to its final norm is captured in a CUDA graph, as SGLang captures its decode step, and
the LM head runs after it in both arms. ESamp's step is what the server's eager decode path adds,
post-filter mode (the default recipe): the owed training step (side-stream lane, staleness 1), the
shallow state, the fused distill-and-mix kernel, the LM head over [h; ĥ] in one pass instead of h
alone, the min-p candidate mask and the reweighting. Both arms are timed per step (CUDA events over
STEPS steps after a warm-up) at batch 1, 16, 64 and 256, one group per 8 rows. Beside them, the
post-filter's top-k / top-p candidate mask by each of its paths at Qwen2.5's vocabulary
(candidate_mask_paths). Without CUDA the same code runs on the CPU at TINY's shapes, so CI
exercises it; those figures say nothing about a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank
from esamp_sgl.lane import CudaStreamLane, DeferredLane
from esamp_sgl.latent_step import distill_and_mix
from esamp_sgl.mix import TOP_K_ALL, candidate_mask, contrast_candidates_, nucleus_mask
from esamp_sgl.transfer import to_device


@dataclass(frozen=True)
class Shape:
    d: int
    mlp: int
    layers: int
    heads: int
    vocab: int


LLAMA_7B = Shape(d=4096, mlp=11008, layers=32, heads=32, vocab=32000)
TINY = Shape(d=64, mlp=128, layers=2, heads=4, vocab=300)
BATCHES = (1, 16, 64, 256)
CONTEXT = 256  # KV-cache tokens per row
ROWS_PER_GROUP = 8
STEPS = 20
BETA, MIN_P = 0.5, 0.05
QWEN_VOCAB = 151936  # the candidate masks are timed at Qwen2.5's vocabulary
TOP_K, TOP_P = 50, 0.95


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


class RandomDecoder:
    """A Llama-shaped decoder with random weights: one decode step for ``batch`` rows."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = shape
        g = torch.Generator(device=device).manual_seed(0)

        def weight(*dims: int) -> torch.Tensor:
            return (torch.randn(*dims, generator=g, device=device, dtype=torch.float32) * dims[-1] ** -0.5).to(dtype)

        d = shape.d
        self.layers = [(torch.ones(d, device=device, dtype=dtype), weight(3 * d, d), weight(d, d),
                        torch.ones(d, device=device, dtype=dtype), weight(2 * shape.mlp, d), weight(d, shape.mlp))
                       for _ in range(shape.layers)]
        self.embed = weight(shape.vocab, d)
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.input_norm = torch.ones(d, device=device, dtype=dtype)  # layer 0's: ESamp's shallow state
        self.lm_head = weight(shape.vocab, d)

    def kv_cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s, hd = self.shape, self.shape.d // self.shape.heads
        dev, dt = self.embed.device, self.embed.dtype
        return [(torch.randn(batch, s.heads, CONTEXT, hd, device=dev, dtype=dt),
                 torch.randn(batch, s.heads, CONTEXT, hd, device=dev, dtype=dt)) for _ in range(s.layers)]

    def final_state(self, ids: torch.Tensor, cache: list) -> torch.Tensor:
        """The final normed hidden state of one decode step (the cache is read, not extended)."""
        s = self.shape
        b, hd = ids.shape[0], s.d // s.heads
        h = self.embed[ids]
        for (n1, qkv, o, n2, gate_up, down), (k_cache, v_cache) in zip(self.layers, cache):
            q, k, v = (_rms(h, n1) @ qkv.T).view(b, 3, s.heads, 1, hd).unbind(1)
            keys, values = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
            attn = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            h = h + attn.reshape(b, s.d) @ o.T
            g, u = (_rms(h, n2) @ gate_up.T).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(g) * u) @ down.T
        return _rms(h, self.norm)


class EsampStep:
    """ESamp's work in one post-filter decode step, as the server's eager path does it."""

    def __init__(self, model: RandomDecoder, batch: int, device: torch.device) -> None:
        groups = max(1, batch // ROWS_PER_GROUP)
        self.bank = DistillerBank(groups, model.shape.d, ESampConfig(init="random", rank=32, init_std=0.02),
                                  device=device)
        self.lane = (CudaStreamLane if device.type == "cuda" else DeferredLane)(self.bank, staleness=1)
        self.slot_host = torch.arange(batch) // ROWS_PER_GROUP % groups
        self.slot = to_device(self.slot_host, torch.int64, device)
        self.beta = torch.full((batch,), BETA, device=device)
        self.min_p = torch.full((batch,), MIN_P, device=device)
        self.ones = torch.ones(batch, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.int64, device=device)
        self.model = model

    def logits(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.lane.begin_step()
        x = _rms(self.model.embed[ids], self.model.input_norm)
        _, h_hat, _ = distill_and_mix(self.lane.forward_params, x, h, self.slot, self.beta)
        both = torch.cat([h, h_hat.to(h.dtype)]) @ self.model.lm_head.T  # one pass over the head
        base, amateur = both.float().chunk(2)
        keep = candidate_mask(base, self.top_k, self.ones, self.min_p, self.ones, rank_filters=False)
        out = contrast_candidates_(base, amateur, self.beta, keep)  # in place, as in the server (every row explores)
        self.lane.submit(x, h, self.slot_host)
        return out


def _graphed_body(model: RandomDecoder, ids: torch.Tensor, cache: list) -> Callable[[], torch.Tensor]:
    """The decoder up to the final norm, captured in a CUDA graph after a warm-up on a side stream
    (as torch's docs ask: lazy cuBLAS/SDPA initialisation must not happen during capture); the
    returned function replays it and gives its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.final_state(ids, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.final_state(ids, cache)

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


def _per_step_seconds(fn, device: torch.device, steps: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / steps


def candidate_mask_paths(device: torch.device, vocab: int, batches: tuple[int, ...], steps: int) -> dict:
    """Per batch, ms per call of the post-filter's top-k / top-p candidate mask: the sort of the
    vocabulary, the top-k selection (top_k 50, top-p 0.95) and top-p 0.95 alone by bisection
    (nucleus_mask) against its sort — which decides mix.NUCLEUS_BY_BISECTION_ON for CUDA."""
    rows = {}
    with torch.inference_mode():
        for batch in batches:
            gen = torch.Generator(device).manual_seed(batch)
            logits = torch.randn(batch, vocab, device=device, generator=gen) * 4
            ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
            top_k, top_p = torch.full((batch,), TOP_K, device=device), torch.full((batch,), TOP_P, device=device)
            unlimited = torch.full((batch,), TOP_K_ALL, device=device)
            probs = torch.softmax(logits, dim=-1)
            paths = {"top_k_sort": lambda: candidate_mask(logits, top_k, top_p, zeros, ones),
                     "top_k_selection": lambda: candidate_mask(logits, top_k, top_p, zeros, ones, max_top_k=TOP_K),
                     "top_p_sort": lambda: candidate_mask(logits, unlimited, top_p, zeros, ones),
                     "top_p_bisection": lambda: nucleus_mask(probs, top_p)}
            rows[batch] = {name: _per_step_seconds(fn, device, steps) * 1e3 for name, fn in paths.items()}
    return {"vocab": vocab, "top_k": TOP_K, "top_p": TOP_P, "ms": rows}


def measure(device: torch.device | None = None, shape: Shape | None = None, batches: tuple[int, ...] = BATCHES,
            steps: int = STEPS) -> dict:
    """Per batch: the model's decode step (graph replay on CUDA), the same step with ESamp's
    work after it, and their ratio."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or (LLAMA_7B if device.type == "cuda" else TINY)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = RandomDecoder(shape, device, dtype)
    rows = {}
    for batch in batches:
        esamp = EsampStep(model, batch, device)  # outside inference mode, as the server builds its bank
        with torch.inference_mode():
            cache = model.kv_cache(batch)
            ids = torch.randint(0, shape.vocab, (batch,), device=device)
            if device.type == "cuda":
                body = _graphed_body(model, ids, cache)
            else:
                def body() -> torch.Tensor:
                    return model.final_state(ids, cache)

            def base() -> torch.Tensor:
                return body() @ model.lm_head.T

            def exploring() -> torch.Tensor:
                return esamp.logits(ids, body())
            plain_s = _per_step_seconds(base, device, steps)
            esamp_s = _per_step_seconds(exploring, device, steps)
            esamp.lane.flush()
            rows[batch] = {"decode_step_ms": plain_s * 1e3, "with_esamp_ms": esamp_s * 1e3,
                           "overhead": esamp_s / plain_s - 1, "training_steps": esamp.bank.train_steps}
            del cache, esamp, body, base, exploring
            if device.type == "cuda":
                torch.cuda.empty_cache()
    masks = candidate_mask_paths(device, QWEN_VOCAB if device.type == "cuda" else shape.vocab, batches, steps)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape.__dict__,
            "dtype": str(dtype), "context": CONTEXT, "rows_per_group": ROWS_PER_GROUP, "steps": steps,
            "beta": BETA, "min_p": MIN_P, "batches": rows, "candidate_masks": masks}
