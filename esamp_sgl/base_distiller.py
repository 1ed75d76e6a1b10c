"""A per-model base distiller: pre-trained once on the model's own states, cached beside it.

A distiller that starts from random weights never fits within one answer (its relative error
stays ≈ 0.5–0.9), so its mix mostly rescales logits. The base distiller is trained offline
on (shallow, deep) state pairs from the model's own samples over BASE_PROMPTS, and every new
group starts as a copy of it (``--esamp-init base``). It is built in the launching process
with transformers, before the server starts, and loaded by each scheduler.

The states match the server's exactly: source "embed" is layer 0's input norm of the token
embedding; "layer:N" the residual after decoder layer N (what SGLang's layer capture hands
over); the target is the final norm's output, which the LM head consumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from esamp_sgl.base_prompts import BASE_PROMPTS
from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import PARAM_NAMES, DistillerBank
from esamp_sgl.mix import novelty
from esamp_sgl.models import chat_text

SAMPLES_PER_PROMPT = 2
MAX_NEW_TOKENS = 64
TRAIN_STEPS = 2000
BATCH_ROWS = 512
TRAIN_LR = 1e-3
HELD_OUT = 0.1  # fraction of prompts whose states only measure the error


@dataclass(frozen=True)
class BaseStats:
    rows: int
    held_out_relative_error: float
    generation_seconds: float
    training_seconds: float


def base_path(model_path: str | Path, cfg: ESampConfig) -> Path:
    """Where the base distiller for this model, source and rank lives (beside the model; for a
    hub id, in the local snapshot SGLang loads)."""
    source = cfg.source.replace(":", "")
    return local_model_dir(model_path) / f"esamp-base-{source}-r{cfg.rank}.safetensors"


def local_model_dir(model_path: str | Path) -> Path:
    """The model's local directory (a hub id resolves to its snapshot: resolve once, then pass the
    directory on, since each resolution asks the hub)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_path)))


def load_base(model_path: str | Path, cfg: ESampConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = base_path(model_path, cfg)
    if not path.is_file():
        raise RuntimeError(f"ESamp init 'base' needs {path}; `esamp-sgl serve` builds it before the server "
                           "starts (or run `esamp-sgl base-distiller --model MODEL`)")
    return load_file(str(path))


def base_stats(model_path: str | Path, cfg: ESampConfig) -> BaseStats | None:
    meta = base_path(model_path, cfg).with_suffix(".json")
    return BaseStats(**json.loads(meta.read_text())) if meta.is_file() else None


def ensure_base(model_path: str | Path, cfg: ESampConfig, *, seed: int = 0) -> BaseStats:
    """Build the base distiller unless it is cached; return its statistics."""
    cached = base_stats(model_path, cfg)
    if cached is not None and base_path(model_path, cfg).is_file():
        return cached
    states = collect_states(model_path, cfg, seed=seed)
    start = time.perf_counter()
    weights, error = train_base(states, cfg, seed=seed)
    stats = BaseStats(rows=len(states.x), held_out_relative_error=error, generation_seconds=states.seconds,
                      training_seconds=time.perf_counter() - start)
    _save(model_path, cfg, weights, stats)
    return stats


@dataclass(frozen=True)
class States:
    x: torch.Tensor  # shallow [R, d]
    h: torch.Tensor  # deep [R, d]
    held_out: torch.Tensor  # [R] bool: rows of the held-out prompts
    seconds: float  # generation and capture time


@torch.no_grad()
def collect_states(model_path: str | Path, cfg: ESampConfig, *, seed: int = 0) -> States:
    """Every non-padding position of the model's own samples over BASE_PROMPTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"  # before the server owns the GPU
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(device).eval()
    texts = [chat_text(tokenizer, p) for p in BASE_PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(seed)
    out = model.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=MAX_NEW_TOKENS,
                         num_return_sequences=SAMPLES_PER_PROMPT, pad_token_id=tokenizer.pad_token_id)
    mask = out != tokenizer.pad_token_id
    mask[:, : batch["input_ids"].shape[1]] = batch["attention_mask"].repeat_interleave(SAMPLES_PER_PROMPT, 0).bool()
    shallow, deep = _states(model, out, mask, cfg)
    prompt_of_row = torch.arange(len(BASE_PROMPTS), device=device).repeat_interleave(SAMPLES_PER_PROMPT)
    held = (prompt_of_row < max(1, int(len(BASE_PROMPTS) * HELD_OUT))).unsqueeze(1).expand_as(mask)[mask]
    return States(shallow.cpu(), deep.cpu(), held.cpu(), time.perf_counter() - start)


def _states(model, ids: torch.Tensor, mask: torch.Tensor, cfg: ESampConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inner = model.model
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [inner.norm.register_forward_hook(keep("deep"))]
    if cfg.source_layer is not None:
        handles.append(inner.layers[cfg.source_layer].register_forward_hook(keep("shallow")))
    try:
        model(input_ids=ids, attention_mask=mask.long())
    finally:
        for handle in handles:
            handle.remove()
    if cfg.source_layer is None:
        captured["shallow"] = inner.layers[0].input_layernorm(inner.embed_tokens(ids))
    return captured["shallow"][mask].float(), captured["deep"][mask].float()


def train_base(states: States, cfg: ESampConfig, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """AdamW on the training rows from the reference random init; returns the weights and
    the held-out relative error ‖h − ĥ‖²/‖h‖²."""
    train_cfg = ESampConfig(rank=cfg.rank, init="random", optimizer="adamw", lr=TRAIN_LR)
    x, h, held_out = states.x, states.h, states.held_out
    bank = DistillerBank(1, x.shape[1], train_cfg, seed=seed)
    xs, hs = x[~held_out], h[~held_out]
    gen = torch.Generator().manual_seed(seed)
    slot = [0] * BATCH_ROWS
    threads = torch.get_num_threads()
    # One thread: the distiller's ops are small, and with a second thread a busy core (another
    # server's scheduler busy-polls one) stalls every op at its barrier — 411 vs 6 ms a step, seen here.
    torch.set_num_threads(1)
    try:
        for _ in range(TRAIN_STEPS):
            idx = torch.randint(0, len(xs), (BATCH_ROWS,), generator=gen)
            bank.train_step(xs[idx], hs[idx], slot)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        h_val = h[held_out]
        h_hat = bank.predict(x[held_out], torch.zeros(len(h_val), dtype=torch.int64))
        error = float(novelty(h_val, h_hat).mean())
    return {name: p[0].clone() for name, p in zip(PARAM_NAMES, bank.params)}, error


def _save(model_path: str | Path, cfg: ESampConfig, weights: dict[str, torch.Tensor], stats: BaseStats) -> None:
    from safetensors.torch import save_file

    path = base_path(model_path, cfg)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(stats.__dict__, indent=1))
