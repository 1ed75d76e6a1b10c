"""SGLang plugin entry point (entry-point group ``sglang.srt.plugins``): the whole coupling
between esamp-sgl and SGLang's server, on one screen.

SGLang calls ``register()`` in every process it starts (main, scheduler, detokenizer). ESamp
is switched on only where ``esamp-sgl serve`` set ESAMP_SGL_CONFIG; a plain
``python -m sglang.launch_server`` in the same environment registers nothing. Targets were read
from SGLang 0.5.23; SGLang only logs a hook that fails to apply, so the scheduler reports which
of its hooks are in place (``/server_info`` → internal_states[i].esamp) and ``esamp-sgl serve``
refuses to call a server ready unless all are.
"""

from __future__ import annotations

import pkgutil

from esamp_sgl.config import ESampConfig
from runtime_patch import hooks

MAIN_PROCESS_HOOKS = (
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", hooks.validate_request, "AFTER"),
    ("sglang.srt.entrypoints.api_contract.generate_contract_error", hooks.refuse_bad_explore_in_body, "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._validate_request",
     hooks.refuse_bad_explore_openai, "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request",
     hooks.refuse_bad_explore_openai, "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_completion_response",
     hooks.esamp_in_openai_response, "AFTER"),
    ("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response",
     hooks.esamp_in_openai_response, "AFTER"),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object",
     hooks.assign_default_group, "AFTER"),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
     hooks.summarize_meta_info, "AFTER"),
    ("sglang.srt.managers.data_parallel_controller.DataParallelController.dispatching_with_trace",
     hooks.route_group_to_dp_rank, "AROUND"),
)
SCHEDULER_HOOKS = (
    ("sglang.srt.managers.tp_worker.TpModelWorker.__init__", hooks.attach_to_worker, "AFTER"),
    ("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation", hooks.around_forward_batch, "AROUND"),
    ("sglang.srt.layers.logits_processor.LogitsProcessor.forward", hooks.mix_before_lm_head, "AROUND"),
    ("sglang.srt.layers.logits_processor.LogitsProcessor._get_logits", hooks.lm_head_with_amateur, "AROUND"),
    ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.execute",
     hooks.around_decode_replay, "AROUND"),
    ("sglang.srt.layers.sampler.Sampler._sample_from_probs", hooks.seeded_resample, "AROUND"),
    ("sglang.srt.mem_cache.common.release_kv_cache", hooks.release_request, "AFTER"),
    ("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
     hooks.report_state, "AFTER"),
)


def register() -> None:
    cfg = ESampConfig.from_env()
    if cfg is None:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks.configure(cfg)
    for target, fn, kind in MAIN_PROCESS_HOOKS + SCHEDULER_HOOKS:
        HookRegistry.register(target, fn, HookType[kind])


def scheduler_hooks_applied() -> tuple[bool, list[str]]:
    """Whether every scheduler-side target is wrapped in this process (SGLang sets __wrapped__)."""
    missing = [t for t, _, _ in SCHEDULER_HOOKS if not hasattr(pkgutil.resolve_name(t), "__wrapped__")]
    return not missing, missing
