"""What only a CUDA GPU can show, as plain functions (no pytest, no SGLang): run by
tests/test_gpu_paths.py under pytest and by scripts/gpu_check.sh on a bare GPU machine.

Each check would fail on a GPU if the defect it names came back:
- the side-stream lane keeps its staleness contract while the forward runs on a stream other
  than the default one (as SGLang's forward stream / schedule stream), with slot resets and
  warm-ups in between, and with the forward stream reusing freed memory at once (a job's
  inputs without ``record_stream`` would be overwritten before the side stream reads them);
- a decode step — eager form and graph form, post-filter included — makes no host sync
  (``torch.cuda.set_sync_debug_mode("error")``), with bf16 hidden states;
- the graph form captured the way SGLang captures a decode graph (ESamp's hooks around a padded
  batch, the LM head projecting [h; ĥ] in one pass over padded vocabulary rows with a softcap),
  replayed for fewer live rows than captured, with β, slots and weights changed between replays;
- the fused Triton kernel against its torch reference in fp16 and bf16 at d = 576 and 4096;
- the base distiller trained on the GPU (as well as on the CPU), and built as ``esamp-sgl serve``
  builds it: in a child that loads a model in bf16 over the GPUs and, on exit, gives back all the
  memory it took (needs transformers, tokenizers and accelerate, as the GPU machine has);
- the lane and decode-step checks again under PyTorch's CUDA sanitizer ("csan:").
The checks marked ",tp" run the step in its tensor-parallel form (groups sharded over the ranks,
distill_and_mix_sharded) as the one rank of a group of 1: one GPU cannot run a real all-reduce.

The scheduler state is built on a stand-in model that has only what ESamp reads (token
embedding, layer 0's input norm); the logits path is a stand-in for SGLang's LM head with its
padding and softcap — SGLang itself is not on the GPU machine these checks are written for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank, distiller_forward
from esamp_sgl.lane import CudaStreamLane, DeferredLane
from esamp_sgl.latent_step import distill_and_mix_torch
from esamp_sgl.mix import novelty
from esamp_sgl.transfer import to_device

D, VOCAB, VOCAB_PADDED, SOFTCAP = 64, 300, 320, 3.0
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int, seed: int, d: int = D) -> torch.Tensor:
    """Drawn on the device: a copy from pageable host memory would itself be a host sync, which
    set_sync_debug_mode("error") refuses inside the decode-step check."""
    return torch.randn(n, d, generator=torch.Generator(device=CUDA).manual_seed(seed), device=CUDA)


# --- the lane beside a forward on its own stream -----------------------------------------------

def check_lane_on_a_forward_stream(staleness: int) -> None:
    cfg = ESampConfig(init="random", rank=8, lr=0.05, staleness=staleness, warmup_steps=2)
    lane = CudaStreamLane(DistillerBank(3, D, cfg, device=CUDA), staleness)  # built on the default stream
    reference = DeferredLane(DistillerBank(3, D, cfg, device=CUDA), staleness)
    forward = torch.cuda.Stream()
    slot = torch.tensor([0, 1, 2, 0])
    probe, probe_slot = _rows(4, 99), to_device(slot, torch.int64, CUDA)
    with torch.cuda.stream(forward):
        forward.wait_stream(torch.cuda.default_stream())
        for t in range(10):
            for each in (lane, reference):
                each.begin_step()
                if t == 4:
                    each.reset_slots(to_device([1], torch.int64, CUDA))
                if t == 6:
                    each.warm_up(_rows(6, 500), _rows(6, 600), torch.tensor([2, 2, 2, 0, 0, 0]))
            seen = distiller_forward(lane.forward_params, probe, probe_slot)
            want = distiller_forward(reference.forward_params, probe, probe_slot)
            torch.testing.assert_close(seen, want, rtol=1e-4, atol=1e-4, msg=f"step {t}")
            x, h = _rows(4, t), _rows(4, 50 + t)
            lane.submit(x, h, slot)
            reference.submit(x, h, slot)
            del x, h
            for _ in range(4):  # the forward stream reuses freed blocks at once, with garbage
                torch.full((4, D), float("nan"), device=CUDA)
        lane.flush()
        reference.flush()
    torch.cuda.synchronize()
    assert lane.lag == 0
    torch.testing.assert_close(distiller_forward(lane.forward_params, probe, probe_slot),
                               distiller_forward(reference.forward_params, probe, probe_slot), rtol=1e-4, atol=1e-4)


# --- a decode step through ESamp's scheduler state -------------------------------------------

class _StandInModel(torch.nn.Module):
    """What ESamp reads of a Llama-family model: model.embed_tokens, model.layers[0].input_layernorm."""

    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.Module()
        layer.input_layernorm = torch.nn.RMSNorm(D)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(VOCAB_PADDED, D)
        self.model.layers = torch.nn.ModuleList([layer])


def _state(filter_mode: str, decode_path: str = "auto", sharded: bool = False):
    """``sharded``: the step in its tensor-parallel form (distill_and_mix_sharded) on one GPU, as
    the one rank of a TP group of 1 whose all-reduce returns its input: every row is held."""
    from runtime_patch.scheduler_state import SchedulerState

    cfg = ESampConfig(init="random", rank=8, init_std=0.3, lr=0.05, filter_mode=filter_mode, decode_path=decode_path)
    return SchedulerState(cfg, _StandInModel().to(CUDA), CUDA, "unused",
                          all_reduce=(lambda t: t) if sharded else None)


def _head(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in for SGLang's LM-head path: padded vocabulary rows cut off, then a softcap."""
    return lambda h: SOFTCAP * torch.tanh((h.float() @ weight.T.float())[:, :VOCAB] / SOFTCAP)


def _step_rows(beta: list[float], slot: list[int]):
    from runtime_patch.scheduler_state import StepRows

    n = len(beta)
    return StepRows(beta=to_device(beta, torch.float32, CUDA), beta_host=beta, slot=slot, bank_slot=slot,
                    warm_slot=[-1] * n,
                    debug=[False] * n, group=[f"g{s}" if s >= 0 else None for s in slot], seed=[None] * n,
                    top_k=[20] * n, owner=[(f"r{i}", 0) if s >= 0 else None for i, s in enumerate(slot)])


def _sampling(n: int, top_k: int = 20) -> SimpleNamespace:
    """The fields of SGLang's SamplingBatchInfo that the post-filter reads."""
    return SimpleNamespace(top_ks=torch.full((n,), top_k, device=CUDA), top_ps=torch.ones(n, device=CUDA),
                           min_ps=torch.zeros(n, device=CUDA), temperatures=torch.ones(n, 1, device=CUDA),
                           need_top_k_sampling=True, need_top_p_sampling=False, need_min_p_sampling=False)


def _lm_head(state, head, hidden: torch.Tensor, logits_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head as ESamp's hook wraps it (one pass over [h; ĥ] where the post-filter armed ĥ).
    Its logits land in ``logits_buffer`` where that has their shape, else in a fresh tensor, as
    in SGLang 0.5.23's LogitsProcessor._copy_logits_to_buffer (a decode graph's buffer)."""
    from runtime_patch import hooks

    def get_logits(_processor, h: torch.Tensor, _head, metadata) -> torch.Tensor:
        logits, buffer = head(h), metadata.next_token_logits_buffer
        if buffer is None or buffer.shape != logits.shape:
            return logits
        buffer.copy_(logits)
        return buffer

    hooks._state = state
    return hooks.lm_head_with_amateur(get_logits, None, hidden, None, SimpleNamespace(next_token_logits_buffer=logits_buffer))


def check_decode_step_makes_no_host_sync(form: str, sharded: bool = False) -> None:
    state = _state("post", decode_path="graph" if form == "graph" else "auto", sharded=sharded)
    head = _head(torch.randn(VOCAB_PADDED, D, device=CUDA) * 0.3)
    beta, slot = [1.0, 0.0, 0.5, 2.0, 1.0], [0, -1, 1, 0, 2]
    n = len(beta)
    ids = torch.randint(0, VOCAB, (n,), device=CUDA)

    def step(seed: int) -> None:
        hidden = _rows(n, seed).to(torch.bfloat16)
        state.current = _step_rows(beta, slot)
        if form == "eager":
            mixed, h_hat, _ = state.mix(ids, hidden, None, torch.arange(n, device=CUDA))
            state.arm_amateur(h_hat)
            logits = _lm_head(state, head, hidden)
            state.post_filter(logits, state.take_amateur(), _sampling(n))
        else:
            state.before_replay(n)
            mixed = state.graph_step(ids, hidden, None)
            output = SimpleNamespace(next_token_logits=_lm_head(state, head, mixed), customized_info=None)
            state.after_replay(output, _sampling(n), state.take_amateur(), second_pass=None)
        state.current = None

    step(0)  # compiles the Triton kernel, warms the allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in range(1, 4):
            step(seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # under TP a rank's error is contained (counted, its rows served plain): count it as a failure
    assert state.counters.hook_errors == 0
    assert state.counters.steps == 4 and state.bank.train_steps >= 2


def check_captured_decode_step_replays_padded(filter_mode: str, sharded: bool = False) -> None:
    """Captured for 8 and 4 rows as SGLang's capture hooks bracket it (largest first, inputs and
    logits buffer shared), replayed for 3 and 5 live rows. No graph keeps logits of its own: as
    SGLang's graphs share one logits buffer, ESamp's share one for [h; ĥ] (post-filter)."""
    from esamp_sgl.mix import candidate_mask, post_filter_logits

    max_rows, sizes, state = 8, (8, 4), _state(filter_mode, sharded=sharded)
    weight = torch.randn(VOCAB_PADDED, D, device=CUDA) * 0.3
    head = _head(weight)
    static_ids = torch.zeros(max_rows, dtype=torch.int64, device=CUDA)
    static_h = torch.zeros(max_rows, D, dtype=torch.bfloat16, device=CUDA)
    shared_logits = torch.zeros(max_rows, VOCAB, device=CUDA)  # SGLang's logits buffer for its graphs

    def forward(rows: int) -> SimpleNamespace:
        mixed = state.graph_step(static_ids[:rows], static_h[:rows], None)
        logits = _lm_head(state, head, mixed, shared_logits[:rows])
        output = SimpleNamespace(next_token_logits=logits, customized_info=None)
        state.captured_output(output)
        return output

    graphs, captured = {}, {}
    for rows in sizes:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # SGLang's warm-up runs before the capture
            state.begin_capture(max_rows)
            forward(rows)
            state.end_capture()
        torch.cuda.current_stream().wait_stream(side)
        graphs[rows] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[rows]):
            state.begin_capture(max_rows)
            captured[rows] = forward(rows)
            state.end_capture()
    home = state.graph_rows.paired_logits(2 * max_rows, shared_logits) if filter_mode == "post" else shared_logits
    assert all(c.next_token_logits.untyped_storage().data_ptr() == home.untyped_storage().data_ptr()
               for c in captured.values()), "a captured graph keeps logits of its own"

    for seed, (beta, slot) in enumerate([([1.0, 0.0, 0.5], [2, -1, 0]), ([2.0, 1.0, 1.0, 0.5, 1.0], [0, 1, 2, 3, 0])]):
        n = len(beta)
        rows = min(r for r in sizes if r >= n)  # the graph SGLang replays, padded
        ids, h = torch.randint(0, VOCAB, (max_rows,), device=CUDA), _rows(max_rows, 100 + seed).to(torch.bfloat16)
        state.current = _step_rows(beta, slot)
        state.before_replay(n)
        params_now = tuple(p.clone() for p in state.lane.forward_params)  # what this replay must read
        static_ids.copy_(ids)
        static_h.copy_(h)
        graphs[rows].replay()
        output = SimpleNamespace(next_token_logits=captured[rows].next_token_logits[:n], customized_info=None)
        amateur = state.graph_rows.captured_amateur(rows) if filter_mode == "post" else None
        assert filter_mode == "pre" or amateur is not None, "the captured L(ĥ) was not found after the replay"
        result = state.after_replay(output, _sampling(n), amateur, second_pass=None)

        x = state.shallow_state(ids, None)[:n]
        b = to_device(beta, torch.float32, CUDA)
        s = to_device([max(v, 0) for v in slot], torch.int64, CUDA)
        want_mix, want_hat, _ = distill_and_mix_torch(params_now, x, h[:n], s, b)
        if filter_mode == "pre":
            want = head(want_mix)
        else:
            base = head(h[:n])
            keep = candidate_mask(base, _sampling(n).top_ks, torch.ones(n, device=CUDA), torch.zeros(n, device=CUDA),
                                  torch.ones(n, device=CUDA))
            want = post_filter_logits(base, head(want_hat), b, keep)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(result.next_token_logits))
        torch.testing.assert_close(result.next_token_logits[finite], want[finite], rtol=2e-2, atol=2e-2)
        state.current = None
        state.lane.flush()  # the step's training lands: the next replay must read the new weights
    assert state.counters.graph_steps == 2 and state.counters.hook_errors == 0


# --- the base distiller's build: trained on the GPU, in a child that gives the GPU back ----------

def learnable_states(d: int, rows: int = 2000):
    """(shallow, deep) rows whose map a distiller can learn, the first tenth held out."""
    from esamp_sgl.base_distiller import States

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen)
    h = torch.nn.functional.layer_norm(x + torch.tanh(x @ (torch.randn(d, d, generator=gen) / d**0.5)) * 2, (d,))
    return States(x, h, torch.arange(rows) < rows // 10, 0.0)


def check_base_training_on_the_gpu() -> None:
    """The base distiller trains where the GPU is (not for minutes on one CPU thread), and fits as
    well as the same seed's training on the CPU."""
    from esamp_sgl import base_distiller

    d, steps = 256, base_distiller.TRAIN_STEPS
    states, cfg = learnable_states(d), ESampConfig(init="base", rank=32)
    base_distiller.TRAIN_STEPS = 150
    try:
        on_gpu, gpu_error = base_distiller.train_base(states, cfg, device=CUDA)
        _, cpu_error = base_distiller.train_base(states, cfg, device=torch.device("cpu"))
    finally:
        base_distiller.TRAIN_STEPS = steps
    held_out = states.held_out  # against ĥ = LayerNorm(x), where the distiller starts
    untrained = float(novelty(states.h[held_out], torch.nn.functional.layer_norm(states.x[held_out], (d,))).mean())
    assert all(w.device.type == "cpu" for w in on_gpu.values())  # saved from the host
    assert gpu_error < 0.75 * untrained and abs(gpu_error - cpu_error) < 0.05, (gpu_error, cpu_error, untrained)


BUILD_IN_A_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "scripts"))
import bare_packages
bare_packages.register(Path(sys.argv[1]))
import torch
from esamp_sgl import base_distiller
from esamp_sgl.config import ESampConfig
from esamp_sgl.models import write_tiny_model
base_distiller.TRAIN_STEPS = 100
model = write_tiny_model(Path(sys.argv[2]) / "tiny-llama", layers=2)
stats = base_distiller.ensure_base(model, ESampConfig(init="base"), dtype=sys.argv[3])
used = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"rows": stats.rows, "error": stats.held_out_relative_error, "gpu_bytes": used}))
"""


def check_base_build_in_a_child_gives_the_gpu_back() -> None:
    """As ``esamp-sgl serve`` builds it before SGLang starts: a child loads the model in the
    serving dtype (bf16) with accelerate's placement over the visible GPUs, collects the states,
    trains, writes the cache and exits; the GPU's free memory is then what it was before."""
    with tempfile.TemporaryDirectory() as folder:
        on_gpu = CUDA.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize()
            free_before = torch.cuda.mem_get_info()[0]
        env = {**os.environ, "ESAMP_SGL_CACHE": folder}
        run = subprocess.run([sys.executable, "-c", BUILD_IN_A_CHILD, str(ROOT), folder, "bfloat16"], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        built = json.loads(run.stdout.strip().splitlines()[-1])
        assert built["rows"] > 0 and 0 <= built["error"] < 2, built
        assert list(Path(folder, "base-distillers").glob("*/esamp-base-embed-r32.safetensors"))
        if on_gpu:
            assert built["gpu_bytes"] > 0, "the build did not run on the GPU"
            deadline = time.monotonic() + 10  # the driver may finish the child's teardown a moment later
            while abs(torch.cuda.mem_get_info()[0] - free_before) >= 64 << 20 and time.monotonic() < deadline:
                time.sleep(0.2)
            free_after = torch.cuda.mem_get_info()[0]
            assert abs(free_after - free_before) < 64 << 20, (free_before, free_after)


# --- the fused kernel, compiled for real ---------------------------------------------------------

def check_triton_kernel(dtype: torch.dtype, d: int) -> None:
    from esamp_sgl.kernels.distill_mix import distill_mix_triton

    bank = DistillerBank(3, d, ESampConfig(init="random", rank=32, init_std=0.05), device=CUDA)
    n = 7  # odd
    x, h = _rows(n, 1, d), _rows(n, 2, d).to(dtype)
    slot = torch.tensor([0, 1, 2, -1, 0, 1, -1], device=CUDA)
    beta = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 0.25, 0.0], device=CUDA)
    out, h_hat, nov = distill_mix_triton(bank.params, x, h, slot, beta)
    ref_out, ref_hat, ref_nov = distill_and_mix_torch(bank.params, x, h, slot, beta)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(h_hat, ref_hat, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(nov, ref_nov, rtol=1e-3, atol=1e-4)
    assert torch.equal(out[beta == 0], h[beta == 0])


def under_cuda_sanitizer(check: Callable[[], None]) -> Callable[[], None]:
    """``check`` again under PyTorch's CUDA sanitizer (CSAN): it follows every torch op's reads and
    writes on the GPU's real streams, events and synchronizations and raises on an access they
    leave unordered — on the hardware, what tests/stream_sim.py models on CPU. It does not see
    inside Triton kernels, and does not check frees (the model does)."""
    def run() -> None:
        # Importing it switches on PyTorch's GPU trace callbacks for the rest of the process (its
        # module builds the sanitizer): time nothing after these checks. Its dispatch mode is
        # entered for this check only.
        from torch.cuda._sanitizer import cuda_sanitizer

        with cuda_sanitizer.dispatch:
            check()

    return run


CHECKS: dict[str, Callable[[], None]] = {
    **{f"lane_on_a_forward_stream[staleness={k}]": (lambda k=k: check_lane_on_a_forward_stream(k)) for k in (0, 1, 3)},
    **{f"decode_step_makes_no_host_sync[{form}{',tp' if tp else ''}]":
       (lambda form=form, tp=tp: check_decode_step_makes_no_host_sync(form, tp))
       for form in ("eager", "graph") for tp in (False, True)},
    **{f"captured_decode_step_replays_padded[{mode}{',tp' if tp else ''}]":
       (lambda mode=mode, tp=tp: check_captured_decode_step_replays_padded(mode, tp))
       for mode in ("pre", "post") for tp in (False, True)},
    "base_training_on_the_gpu": check_base_training_on_the_gpu,
    "base_build_in_a_child_gives_the_gpu_back": check_base_build_in_a_child_gives_the_gpu_back,
    **{f"triton_kernel[{str(dt).split('.')[-1]},d={d}]": (lambda dt=dt, d=d: check_triton_kernel(dt, d))
       for dt in (torch.float16, torch.bfloat16) for d in (576, 4096)},
}
CHECKS |= {f"csan:{name}": under_cuda_sanitizer(check) for name, check in list(CHECKS.items())
           if name.startswith(("lane_on_a_forward_stream", "decode_step_makes_no_host_sync"))}
