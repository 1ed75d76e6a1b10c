"""The hook functions the plugin registers on SGLang 0.5.23 (see plugin.py for the targets).

Main-process hooks validate and complete ``custom_params["esamp"]`` and turn per-token
results into ``meta_info["esamp"]``; scheduler-process hooks own a SchedulerState and run
the mix between the final norm and the LM head.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from esamp_sgl import params as esamp_params
from esamp_sgl.config import ESampConfig
from runtime_patch.scheduler_state import TOKEN_KEY, SchedulerState, attach_token_info, filters_candidates

_cfg: ESampConfig | None = None
_state: SchedulerState | None = None


def configure(cfg: ESampConfig) -> None:
    global _cfg
    _cfg = cfg


# --- main process: requests and responses -----------------------------------------------------

def validate_request(result: None, sampling_params: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER SamplingParams.verify (SGLang 0.5.23). A ValueError here becomes HTTP 400."""
    esamp_params.parse(sampling_params.custom_params, _cfg.max_beta)


def assign_default_group(tokenized: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER TokenizerManager._create_tokenized_object (SGLang 0.5.23), once per prompt.

    Assumes the n samples of an n > 1 request and its prefix warm-up are shallow copies of this
    object (tokenizer_manager._handle_batch_request), so one group id set here reaches them all.
    """
    sp = getattr(tokenized, "sampling_params", None)
    custom = getattr(sp, "custom_params", None) or {}
    explore = custom.get(esamp_params.KEY)
    if isinstance(explore, dict) and explore.get("beta", 0) and not explore.get("group"):
        sp.custom_params = {**custom, esamp_params.KEY: {**explore, "group": "req-" + uuid.uuid4().hex}}


def summarize_meta_info(result: None, manager: Any, meta_info: dict, *args: Any, **kwargs: Any) -> None:
    """AFTER TokenizerManager.update_request_meta_info (SGLang 0.5.23).

    Per-token entries (accumulated by SGLang across stream chunks) become one summary:
    meta_info["esamp"] = {group, beta, tokens_mixed, mean_novelty}; debug entries stay per token
    in meta_info["esamp_debug"] (h, ĥ, novelty and the β that token was mixed with).
    """
    tokens = meta_info.pop(TOKEN_KEY, None)
    entries = [t for t in tokens or [] if t]  # dicts: TokenInfo.copy() ran in the scheduler
    if not entries:
        return
    meta_info["esamp"] = {
        "group": entries[-1]["group"],
        "beta": entries[0]["beta"],  # the request's β (a β schedule starts from it)
        "tokens_mixed": len(entries),
        "mean_novelty": sum(e["novelty"] for e in entries) / len(entries),
    }
    if "h" in entries[0]:
        meta_info["esamp_debug"] = [{k: e[k] for k in ("h", "h_hat", "novelty", "beta")} for e in entries]


# --- scheduler process: the decode path ---------------------------------------------------------

def attach_to_worker(result: None, worker: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER TpModelWorker.__init__ (SGLang 0.5.23): build the state for the target model, and
    join SGLang's decode-graph capture (the model runner's ``capture_head_hooks`` /
    ``capture_tail_hooks``).

    SGLang captures CUDA graphs after the worker is built (Scheduler.init_all_cuda_graphs), so a
    captured layer (source "layer:N") and the graph-form step are in every graph. Raises (and so
    fails server startup) for models ESamp cannot read its shallow state from.
    """
    global _state
    if kwargs.get("is_draft_worker") or _state is not None:
        return
    runner = worker.model_runner
    _state = SchedulerState(_cfg, runner.model, torch.device(runner.device), runner.model_config.model_path)
    runner.capture_head_hooks.append(begin_decode_capture)
    runner.capture_tail_hooks.append(end_decode_capture)


def begin_decode_capture(graph_runner: Any, forward_batch: Any) -> None:
    """SGLang 0.5.23 capture head hook: first inside each decode graph's warm-up and capture run."""
    _state.begin_capture(graph_runner.max_bs)


def end_decode_capture(graph_runner: Any, output: Any, forward_batch: Any, num_tokens: int) -> None:
    """SGLang 0.5.23 capture tail hook: last inside each decode graph's warm-up and capture run."""
    _state.end_capture()


def around_decode_replay(original: Any, graph_runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND DecodeCudaGraphRunner.execute (SGLang 0.5.23): load β and slot into the graph's
    buffers, replay, then (eagerly, before the sampler) train, post-filter and report.

    Assumes ``execute`` replays the whole model forward, logits processor included, and returns
    the LogitsProcessorOutput sliced to the live rows, in ``batch.reqs`` order.
    """
    if _state is None or not _state.graph_captured:
        return original(graph_runner, forward_batch, *args, **kwargs)
    with _state.timed():
        _state.before_replay(forward_batch.batch_size)
    output = original(graph_runner, forward_batch, *args, **kwargs)
    with _state.timed():
        return _state.after_replay(output, forward_batch.sampling_info)


def around_forward_batch(original: Any, worker: Any, batch: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AROUND TpModelWorker.forward_batch_generation (SGLang 0.5.23).

    Makes ``batch.reqs`` (row order of the forward) visible to the logits hook for this call;
    assumes ``batch`` is the ScheduleBatch, whose ``chunked_req`` is a request this forward
    computes only a non-final prefill chunk of.
    """
    if _state is None or batch is None:
        return original(worker, batch, *args, **kwargs)
    start = time.perf_counter()
    with _state.timed():
        _state.begin_batch(batch.reqs, getattr(batch, "chunked_req", None))
    try:
        return original(worker, batch, *args, **kwargs)
    finally:
        with _state.timed():
            _state.end_batch()
        _state.counters.forward_seconds += time.perf_counter() - start


def mix_before_lm_head(original: Any, processor: Any, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                       lm_head: Any, logits_metadata: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND LogitsProcessor.forward (SGLang 0.5.23).

    Assumes ``hidden_states`` is the final normalized state (rows: tokens of the batch, in
    ``batch.reqs`` order; in extend, every token of each request's extension) and
    ``logits_metadata`` the ForwardBatch. In extend, groups first warm up on the prompt states
    (``--esamp-warmup-steps``). Pre-filter mode: the
    sampled row of each request — every row in decode, the last token of each request in
    extend — is replaced by h_mix. Post-filter mode: the base logits are computed unmixed and
    reweighted on the base's own top-k/top-p/min-p candidates (the sampler's filters then apply
    again to the reweighted candidates); a batch without any of those filters has every token as
    a candidate, where post equals pre, so it takes the pre-filter path. Either way penalties,
    grammar masks, logit_bias and temperature then apply to the mixed logits. Returned logprobs
    describe the mixed logits.

    Decode in graph form (inside a decode-graph capture, or every decode step with
    ``--esamp-decode-path graph``): ``graph_step`` on every row, bracketed by ``before_replay`` /
    ``after_replay`` as around_decode_replay brackets a replay; post-filter mode reweights every
    row's candidates then, filters or not.
    """
    if _state is None:
        return original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
    mode = logits_metadata.forward_mode
    aux_hidden_states = args[0] if args else kwargs.get("aux_hidden_states")
    if _state.capturing:  # recorded into a decode CUDA graph; replays run around_decode_replay
        mixed = _state.graph_step(input_ids, hidden_states, aux_hidden_states)
        return original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
    if _state.current is None:
        return original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
    if mode.is_decode() and _cfg.decode_path == "graph":  # the replayed sequence, run eagerly
        with _state.timed():
            _state.before_replay(hidden_states.shape[0])
            mixed = _state.graph_step(input_ids, hidden_states, aux_hidden_states)
        output = original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
        with _state.timed():
            return _state.after_replay(output, logits_metadata.sampling_info)
    if _state.current.warming and mode.is_extend() and logits_metadata.extend_seq_lens_cpu is not None:
        with _state.timed():
            _state.warm_up(input_ids, hidden_states, aux_hidden_states, logits_metadata.extend_seq_lens_cpu)
    if not _state.current.mixing:
        return original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
    if mode.is_decode():
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    elif mode.is_extend() and logits_metadata.extend_seq_lens_cpu is not None:
        ends = torch.tensor(logits_metadata.extend_seq_lens_cpu).cumsum(0) - 1
        rows = ends.to(hidden_states.device)
    else:
        return original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
    with _state.timed():
        mixed, h_hat, token_info = _state.mix(input_ids, hidden_states, aux_hidden_states, rows)
    if _cfg.filter_mode == "pre" or not filters_candidates(logits_metadata.sampling_info):
        output = original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
    else:
        output = original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
        with _state.timed():
            output.next_token_logits = _state.post_filter(output.next_token_logits, h_hat,
                                                          logits_metadata.sampling_info)
    attach_token_info(output, token_info)
    return output


def seeded_resample(original: Any, sampler: Any, probs: torch.Tensor, sampling_info: Any, positions: torch.Tensor,
                    *args: Any, **kwargs: Any) -> Any:
    """AROUND Sampler._sample_from_probs (SGLang 0.5.23): rows with esamp.seed are drawn again
    by ESamp's seeded sampler from the same (temperature-scaled) probabilities and the same
    filters; logprobs SGLang computes afterwards refer to the returned ids.

    Assumes one probability row per request, in ``batch.reqs`` order, and a return value of
    (token ids, sampling-mask capture).
    """
    ids, capture = original(sampler, probs, sampling_info, positions, *args, **kwargs)
    if _state is not None and _state.current is not None:
        with _state.timed():
            _state.resample_seeded(ids, probs, sampling_info, positions)
    return ids, capture


def release_request(result: None, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER mem_cache.common.release_kv_cache (SGLang 0.5.23): finished or aborted requests."""
    if _state is not None:
        _state.release(req.rid)


def report_state(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER SchedulerInternalStateController.get_internal_state (SGLang 0.5.23): /server_info."""
    from runtime_patch.plugin import scheduler_hooks_applied

    applied, missing = scheduler_hooks_applied()
    entry: dict[str, Any] = {"active": _state is not None and applied, "hooks_missing": missing}
    if _state is not None:
        entry.update(_state.report())
    result.internal_state["esamp"] = entry
