"""The hook functions the plugin registers on SGLang 0.5.23 (see plugin.py for the targets).

Main-process hooks validate and complete ``custom_params["esamp"]`` and turn per-token
results into ``meta_info["esamp"]``; scheduler-process hooks own a SchedulerState and run
the mix between the final norm and the LM head.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from typing import Any

import torch

from esamp_sgl import params as esamp_params
from esamp_sgl.config import ESampConfig
from esamp_sgl.shard import GroupShard
from esamp_sgl.transfer import to_device
from runtime_patch.scheduler_state import (TOKEN_KEY, SchedulerState, attach_seeds, attach_token_info,
                                           filters_candidates)

logger = logging.getLogger(__name__)

_cfg: ESampConfig | None = None
_state: SchedulerState | None = None


def configure(cfg: ESampConfig) -> None:
    global _cfg
    _cfg = cfg


# --- main process: requests and responses -----------------------------------------------------

def validate_request(result: None, sampling_params: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER SamplingParams.verify (SGLang 0.5.23). A ValueError here becomes HTTP 400.

    On HTTP the body hooks below have refused a bad entry already, so this check repeats theirs
    (a dict lookup and a few comparisons); it stays as the backstop for what reaches the
    tokenizer without those endpoints (the Engine API, SGLang's other HTTP routes)."""
    esamp_params.parse(sampling_params.custom_params, _cfg.max_beta)


def refuse_bad_explore_in_body(result: str | None, body: Any, *args: Any, **kwargs: Any) -> str | None:
    """AFTER api_contract.generate_contract_error (SGLang 0.5.23): /generate's check of the raw
    body, made before a streaming response starts. A bad ``esamp`` entry is thus an HTTP 400 on
    streaming requests too; SamplingParams.verify runs inside the stream, where an error can only
    be a chunk of a 200. Single and batch bodies (sampling_params an object or a list)."""
    if result is not None or not isinstance(body, dict):
        return None
    sampling = body.get("sampling_params")
    for sp in sampling if isinstance(sampling, list) else [sampling]:
        if isinstance(sp, dict) and "custom_params" in sp:
            if (error := _explore_error(sp["custom_params"])) is not None:
                return error
    return None


def refuse_bad_explore_openai(result: str | None, serving: Any, request: Any, *args: Any, **kwargs: Any) -> str | None:
    """AFTER OpenAIServingCompletion/OpenAIServingChat._validate_request (SGLang 0.5.23): the
    same check on the OpenAI endpoints, before a streaming response starts (an HTTP 400)."""
    return _explore_error(getattr(request, "custom_params", None)) if result is None else None


def _explore_error(custom_params: Any) -> str | None:
    try:
        esamp_params.parse(custom_params, _cfg.max_beta)
    except ValueError as e:
        return str(e)
    return None


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
    meta_info["esamp"] = {group, beta, tokens_mixed, mean_novelty, dp_rank}; debug entries stay per token
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
        "dp_rank": entries[-1]["dp_rank"],
    }
    if "h" in entries[0]:
        meta_info["esamp_debug"] = [{k: e[k] for k in ("x", "h", "h_hat", "novelty", "beta")} for e in entries]


def esamp_in_openai_response(result: Any, serving: Any, request: Any, ret: list, *args: Any, **kwargs: Any) -> None:
    """AFTER OpenAIServingCompletion._build_completion_response and
    OpenAIServingChat._build_chat_response (SGLang 0.5.23): the response's ``metadata["esamp"]``
    lists each choice's meta_info["esamp"] summary (None for a choice that sampled plain), so
    OpenAI clients — and SGLang programs exploring through the router — see what /generate shows.
    Non-streaming responses only; a response without an exploring choice is left as it is."""
    metadata = getattr(result, "metadata", None)
    summaries = [item.get("meta_info", {}).get("esamp") for item in ret]
    if isinstance(metadata, dict) and any(summaries):
        metadata["esamp"] = summaries


def route_group_to_dp_rank(original: Any, controller: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND DataParallelController.dispatching_with_trace (SGLang 0.5.23), in the data-parallel
    controller's process: every request of an exploring group goes to the DP rank a stable hash
    of the group picks, so the group has one distiller. A request that pins ``routed_dp_rank``
    itself keeps it, and its group lives on that rank too: pin every request of a group alike,
    or none. The n samples of an n > 1 request share one group id (assign_default_group), so
    they stay together."""
    try:
        group = exploring_group(req) if getattr(req, "routed_dp_rank", None) is None else None
        if group is not None:
            req.routed_dp_rank = group_dp_rank(group, len(controller.workers))
    except Exception:  # never take the controller down: the request is dispatched as SGLang would
        logger.exception("ESamp: could not route request %s by its group", getattr(req, "rid", None))
    return original(controller, req, *args, **kwargs)


def exploring_group(req: Any) -> str | None:
    """The group of a tokenized request that explores (β > 0), else None."""
    custom = getattr(getattr(req, "sampling_params", None), "custom_params", None) or {}
    explore = custom.get(esamp_params.KEY)
    if isinstance(explore, dict) and explore.get("beta") and isinstance(explore.get("group"), str):
        return explore["group"]
    return None


def group_dp_rank(group: str, ranks: int) -> int:
    """A group's data-parallel rank: the same in every process and run (unlike hash())."""
    return zlib.crc32(group.encode("utf-8", "surrogatepass")) % ranks


# --- scheduler process: the decode path ---------------------------------------------------------

def attach_to_worker(result: None, worker: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER TpModelWorker.__init__ (SGLang 0.5.23): build the state for the target model, and
    join SGLang's decode-graph capture (the model runner's ``capture_head_hooks`` /
    ``capture_tail_hooks``).

    SGLang captures CUDA graphs after the worker is built (Scheduler.init_all_cuda_graphs), so a
    captured layer (source "layer:N") and the graph-form step are in every graph. Raises (and so
    fails server startup) for models ESamp cannot read its shallow state from.

    Under tensor parallelism the rank holds its share of the groups (esamp_sgl/shard.py) and sums
    the ranks' predictions with the TP group's all-reduce, the one the model's own layers use
    (CUDA-graph safe; without DP attention, which ESamp refuses, it spans the scheduler's ranks).
    """
    global _state
    if kwargs.get("is_draft_worker") or _state is not None:
        return
    from sglang.srt.distributed.parallel_state import get_tp_group
    from sglang.srt.runtime_context import get_parallel

    runner, tp = worker.model_runner, get_tp_group()
    _state = SchedulerState(_cfg, runner.model, torch.device(runner.device), runner.model_config.model_path,
                            dp_rank=get_parallel().dp_rank or 0, shard=GroupShard(tp.rank_in_group, tp.world_size),
                            all_reduce=tp.all_reduce if tp.world_size > 1 else None,
                            agreed_clock=(lambda: tp.broadcast_object(time.monotonic(), src=0))
                            if tp.world_size > 1 else None)
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
    the LogitsProcessorOutput sliced to the live rows, in ``batch.reqs`` order, and that
    ``graph_runner.bs`` is then the replayed graph's padded batch size (``replay_prepare`` sets
    it), which finds the graph's L(ĥ) rows; without it L(ĥ) takes a second pass.
    """
    if _state is None or not _state.graph_captured:
        return original(graph_runner, forward_batch, *args, **kwargs)
    with _state.timed(), _state.contained("before_replay"):
        _state.before_replay(forward_batch.batch_size)
    if _state.current is None:
        _state.graph_rows.clear()  # a failed load must not leave an earlier step's β in the buffers
    output = original(graph_runner, forward_batch, *args, **kwargs)
    result = output
    with _state.timed(), _state.contained("after_replay"):
        amateur = _state.graph_rows.captured_amateur(getattr(graph_runner, "bs", -1))
        result = _state.after_replay(output, forward_batch.sampling_info, amateur,
                                     lambda h_hat: second_pass_amateur(h_hat, forward_batch))
    return result


def around_forward_batch(original: Any, worker: Any, batch: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AROUND TpModelWorker.forward_batch_generation (SGLang 0.5.23).

    Makes ``batch.reqs`` (row order of the forward) visible to the logits hook for this call;
    assumes ``batch`` is the ScheduleBatch, whose ``chunked_req`` is a request this forward
    computes only a non-final prefill chunk of, and whose ``sampling_info`` is the object the
    sampler receives (also when SGLang samples later, after this call returned: grammar
    batches under the overlap scheduler) — the rows' seeds travel on it.
    """
    if _state is None or batch is None:
        return original(worker, batch, *args, **kwargs)
    start = time.perf_counter()
    with _state.timed("rows"), _state.contained("begin_batch"):
        _state.begin_batch(batch.reqs, getattr(batch, "chunked_req", None))
    attach_seeds(getattr(batch, "sampling_info", None), _state.current)
    try:
        return original(worker, batch, *args, **kwargs)
    finally:
        with _state.timed("rows"), _state.contained("end_batch"):
            _state.end_batch()
        _state.counters.forward_seconds += time.perf_counter() - start


# With --enable-torch-compile SGLang compiles the model's forward, logits processor included; ESamp's
# step reads and writes Python state (rows, slots, counters) that dynamo would guard on and
# recompile for, step after step. The logits processor runs eagerly instead (still captured into
# the decode graphs); the decoder layers stay compiled.
@torch.compiler.disable
def mix_before_lm_head(original: Any, processor: Any, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                       lm_head: Any, logits_metadata: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND LogitsProcessor.forward (SGLang 0.5.23).

    Assumes ``hidden_states`` is the final normalized state (rows: tokens of the batch, in
    ``batch.reqs`` order; in extend, every token of each request's extension) and
    ``logits_metadata`` the ForwardBatch. In extend, groups first warm up on the prompt states
    (``--esamp-warmup-steps``). Pre-filter mode: the
    sampled row of each request — every row in decode, the last token of each request in
    extend — is replaced by h_mix. Post-filter mode: the base logits are computed unmixed, the
    LM head projects the rows' ĥ in the same pass (lm_head_with_amateur), and the base's own
    top-k/top-p/min-p candidates are reweighted (the sampler's filters then apply again to the
    reweighted candidates); a batch without any of those filters has every token as a
    candidate, where post equals pre, so it takes the pre-filter path. Either way penalties,
    grammar masks, logit_bias and temperature then apply to the mixed logits. Returned logprobs
    describe the mixed logits.

    Decode in graph form (inside a decode-graph capture, or every decode step with
    ``--esamp-decode-path graph`` that fits the captured buffers): ``graph_step`` on every row,
    bracketed by ``before_replay`` / ``after_replay`` as around_decode_replay brackets a replay;
    post-filter mode reweights every row's candidates then, filters or not.

    An error in ESamp's part is contained (SchedulerState.contained): the step runs plain.
    """
    def plain() -> Any:
        return original(processor, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)

    if _state is None:
        return plain()
    mode = logits_metadata.forward_mode
    aux_hidden_states = args[0] if args else kwargs.get("aux_hidden_states")
    if _state.capturing:  # recorded into a decode CUDA graph; replays run around_decode_replay
        _state.head = (processor, lm_head)
        mixed = _state.graph_step(input_ids, hidden_states, aux_hidden_states)
        output = original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
        _state.captured_output(output)
        return output
    if _state.current is None:
        return plain()
    if mode.is_decode() and _cfg.decode_path == "graph" and _state.graph_fits(hidden_states.shape[0]):
        return graph_form_step(original, processor, input_ids, hidden_states, lm_head, logits_metadata,
                               aux_hidden_states, *args, **kwargs)
    if _state.current.warming and mode.is_extend() and logits_metadata.extend_seq_lens_cpu is not None:
        with _state.timed("warm_up"), _state.contained("warm_up"):
            _state.warm_up(input_ids, hidden_states, aux_hidden_states, logits_metadata.extend_seq_lens_cpu)
    if _state.current is None or not _state.current.mixing:
        return plain()
    if mode.is_decode():
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    elif mode.is_extend() and logits_metadata.extend_seq_lens_cpu is not None:
        ends = torch.tensor(logits_metadata.extend_seq_lens_cpu).cumsum(0) - 1
        rows = to_device(ends, torch.int64, hidden_states.device)
    else:
        return plain()
    mixed = None
    with _state.timed(), _state.contained("mix"):
        mixed, h_hat, token_info = _state.mix(input_ids, hidden_states, aux_hidden_states, rows)
    if mixed is None:
        return plain()
    if _cfg.filter_mode == "pre" or not filters_candidates(logits_metadata.sampling_info):
        output = original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
    else:
        if projects_only_sampled_rows(logits_metadata):  # then h and ĥ share one LM-head pass
            _state.arm_amateur(h_hat)
        output = plain()
        amateur = _state.take_amateur()
        with _state.timed(), _state.contained("post_filter"):
            if amateur is None:
                _state.counters.amateur_second_pass += 1
                with _state.timed("amateur_second_pass"):
                    amateur = second_pass_amateur(h_hat, logits_metadata, processor, lm_head)
            output.next_token_logits = _state.post_filter(output.next_token_logits, amateur,
                                                          logits_metadata.sampling_info)
        if _state.current is None:
            return output  # contained: the base logits, unmixed
    attach_token_info(output, token_info)
    return output


def graph_form_step(original: Any, processor: Any, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                    lm_head: Any, logits_metadata: Any, aux_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """An eager decode step in the form a replayed decode graph takes (``--esamp-decode-path graph``)."""
    mixed = hidden_states
    with _state.timed(), _state.contained("graph_step"):
        _state.before_replay(hidden_states.shape[0])
        mixed = _state.graph_step(input_ids, hidden_states, aux_hidden_states)
    output = original(processor, input_ids, mixed, lm_head, logits_metadata, *args, **kwargs)
    amateur = _state.take_amateur()
    result = output
    with _state.timed(), _state.contained("after_replay"):
        result = _state.after_replay(output, logits_metadata.sampling_info, amateur,
                                     lambda h_hat: second_pass_amateur(h_hat, logits_metadata, processor, lm_head))
    return result


def lm_head_with_amateur(original: Any, processor: Any, hidden_states: torch.Tensor, lm_head: Any,
                         logits_metadata: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """AROUND LogitsProcessor._get_logits (SGLang 0.5.23): where the post-filter armed ĥ for
    this call, the LM head projects [h; ĥ] in one pass over its weights — decode is
    memory-bound, so the extra rows cost almost nothing — through SGLang's own head transform:
    the padded vocabulary cut to ``vocab_size``, ``logit_scale``, final-logit softcapping and
    the tensor-parallel all-gather all apply to L(ĥ) exactly as to L(h).

    Assumes ``_get_logits`` maps rows to rows (true without DP attention, which ESamp refuses),
    and writes its fp32 logits into ``logits_metadata.next_token_logits_buffer`` where that buffer
    has their shape, else into a fresh tensor (``_compute_lm_head`` / ``_copy_logits_to_buffer``).
    A decode graph's buffer has n rows; while one is captured the pass gets 2n rows of ESamp's
    own shared buffer instead (GraphRows.paired_logits), so that no graph keeps a fresh output.
    """
    h_hat = _state.lm_head_rows(hidden_states.shape[0]) if _state is not None else None
    if h_hat is None:
        return original(processor, hidden_states, lm_head, logits_metadata, *args, **kwargs)
    n = hidden_states.shape[0]
    both_rows = torch.cat([hidden_states, h_hat.to(hidden_states.dtype)])
    shared = getattr(logits_metadata, "next_token_logits_buffer", None)
    paired = _state.graph_rows.paired_logits(2 * n, shared) if _state.capturing and shared is not None else None
    if paired is None:
        both = original(processor, both_rows, lm_head, logits_metadata, *args, **kwargs)
    else:
        logits_metadata.next_token_logits_buffer = paired
        try:
            both = original(processor, both_rows, lm_head, logits_metadata, *args, **kwargs)
        finally:
            logits_metadata.next_token_logits_buffer = shared
    _state.keep_amateur(both[n:])
    return both[:n]


def projects_only_sampled_rows(forward_batch: Any) -> bool:
    """Whether the LM head projects just the sampled rows in this forward — decode, or extend
    without input logprobs — decided as LogitsMetadata.from_forward_batch does (SGLang 0.5.23)."""
    if not forward_batch.forward_mode.is_extend() or not forward_batch.return_logprob:
        return True
    return all(n <= start for n, start in zip(forward_batch.extend_seq_lens_cpu,
                                               forward_batch.extend_logprob_start_lens_cpu))


def second_pass_amateur(h_hat: torch.Tensor, logits_metadata: Any, processor: Any = None, lm_head: Any = None
                        ) -> torch.Tensor:
    """L(ĥ) through SGLang's own LM-head path in a call of its own — a second pass over the
    head's weights, for the cases the one-pass form cannot serve (extend with input logprobs;
    a replayed graph whose L(ĥ) buffer is unknown). ``logits_metadata`` may be the ForwardBatch."""
    from sglang.srt.layers.logits_processor import LogitsMetadata

    if processor is None:
        processor, lm_head = _state.head
    if not isinstance(logits_metadata, LogitsMetadata):
        logits_metadata = LogitsMetadata.from_forward_batch(logits_metadata)
    dtype = lm_head.weight.dtype if hasattr(lm_head, "weight") else h_hat.dtype
    return processor._get_logits(h_hat.to(dtype), lm_head, logits_metadata, use_logits_buffer=False)


def seeded_resample(original: Any, sampler: Any, probs: torch.Tensor, sampling_info: Any, positions: torch.Tensor,
                    *args: Any, **kwargs: Any) -> Any:
    """AROUND Sampler._sample_from_probs (SGLang 0.5.23): rows with esamp.seed are drawn again
    by ESamp's seeded sampler from the same (temperature-scaled) probabilities and the same
    filters; logprobs SGLang computes afterwards refer to the returned ids.

    Assumes one probability row per request, in ``batch.reqs`` order, and a return value of
    (token ids, sampling-mask capture).
    """
    ids, capture = original(sampler, probs, sampling_info, positions, *args, **kwargs)
    if _state is not None:
        with _state.timed("seeded"), _state.contained("resample_seeded"):
            _state.resample_seeded(ids, probs, sampling_info, positions)
    return ids, capture


def release_request(result: None, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER mem_cache.common.release_kv_cache (SGLang 0.5.23): finished or aborted requests.

    SGLang also frees a request's KV cache when it retracts the request under memory pressure;
    such a request is not finished (``req.finished()``) and comes back to the waiting queue, so
    ESamp keeps its state (its group pin and its β schedule) for when it resumes.
    """
    if _state is not None and req.finished():
        with _state.contained("release"):
            _state.release(req.rid, len(req.output_ids))


def report_state(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER SchedulerInternalStateController.get_internal_state (SGLang 0.5.23): /server_info.

    Every tensor-parallel rank of the scheduler runs this for the same request (SGLang
    broadcasts requests from TP rank 0), so per-rank figures are gathered here, entry i being
    TP rank i's: ``distiller_checksums`` (of the groups the rank holds), ``training_steps_per_rank``
    and ``hook_errors_per_rank`` (an error in one rank's share of a step is counted there alone);
    and ``slot_tables_agree``, whether every rank's slot table made the same choices."""
    from sglang.srt.distributed.parallel_state import get_tp_group
    from runtime_patch.plugin import scheduler_hooks_applied

    applied, missing = scheduler_hooks_applied()
    entry: dict[str, Any] = {"active": _state is not None and applied, "hooks_missing": missing}
    if _state is not None:
        _state.agree_on_time()  # every TP rank is here for this request: the TTLs run out alike
        entry.update(_state.report())
        entry["dp_rank"] = _state.dp_rank
        tp = get_tp_group()
        mine = (_state.bank.checksum(), _state.bank.train_steps, _state.counters.hook_errors, _state.slots.digest())
        ranks = tp.all_gather_object(mine) if tp.world_size > 1 else [mine]  # one collective for all four
        checksums, training_steps, hook_errors, slot_tables = zip(*ranks)
        entry["distiller_checksums"] = list(checksums)
        entry["training_steps_per_rank"] = list(training_steps)
        entry["hook_errors_per_rank"] = list(hook_errors)
        entry["slot_tables_agree"] = len(set(slot_tables)) == 1  # sharded groups need it
    result.internal_state["esamp"] = entry
