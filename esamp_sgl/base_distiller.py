"""A per-model base distiller: pre-trained once on the model's own states, cached beside it.

A distiller that starts from random weights never fits within one answer (its relative error
stays ≈ 0.5–0.9), so its mix mostly rescales logits. The base distiller is trained offline
on (shallow, deep) state pairs from the model's own samples over BASE_PROMPTS, and every new
group starts as a copy of it (``--esamp-init base``). ``esamp-sgl serve`` builds it before the
server starts, with transformers, in a child process (``build_in_child``) that loads the model in
the serving dtype (over the GPUs the server will run on), trains on a GPU if there is one, and exits before
SGLang starts: whatever memory the build took (a full-size model on the GPUs) is returned, and
the server's KV pool is sized as without ESamp. Each scheduler loads the result.

It is cached under the project's cache (``esamp_sgl.models.cache_root``), keyed by the model's
identity, never inside the model directory: SGLang loads every ``*.safetensors`` there as a
weight shard, and a hub snapshot or a read-only mount is not ours to write.

The states match the server's exactly: source "embed" is layer 0's input norm of the token
embedding; "layer:N" the residual after decoder layer N (what SGLang's layer capture hands
over); the target is the final norm's output, which the LM head consumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from esamp_sgl.base_prompts import BASE_PROMPTS
from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import PARAM_NAMES, DistillerBank
from esamp_sgl.mix import novelty
from esamp_sgl.models import adds_special_tokens, cache_root, chat_text

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
    """Where the base distiller for this model, source and rank is cached."""
    source = cfg.source.replace(":", "")
    return (cache_root() / "base-distillers" / model_identity(local_model_dir(model_path))
            / f"esamp-base-{source}-r{cfg.rank}.safetensors")


def model_identity(model_dir: Path) -> str:
    """A key for one model: its resolved path, its config and its weight files (name, size,
    modification time) — a changed checkpoint at the same path gets a new base distiller."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{model_dir.name}-{digest.hexdigest()[:16]}"


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


def cached_stats(model_path: str | Path, cfg: ESampConfig) -> BaseStats | None:
    """The statistics of a complete cached base distiller (weights and JSON), else None."""
    stats = base_stats(model_path, cfg)
    return stats if stats is not None and base_path(model_path, cfg).is_file() else None


def base_stats(model_path: str | Path, cfg: ESampConfig) -> BaseStats | None:
    meta = base_path(model_path, cfg).with_suffix(".json")
    return BaseStats(**json.loads(meta.read_text())) if meta.is_file() else None


def ensure_base(model_path: str | Path, cfg: ESampConfig, *, seed: int = 0, dtype: str = "float32") -> BaseStats:
    """Build the base distiller unless it is cached; return its statistics. ``dtype``: the
    dtype the model runs in while its states are collected (the server's)."""
    cached = cached_stats(model_path, cfg)
    if cached is not None:
        return cached
    states = collect_states(model_path, cfg, seed=seed, dtype=dtype)
    start = time.perf_counter()
    weights, error = train_base(states, cfg, seed=seed)
    stats = BaseStats(rows=len(states.x), held_out_relative_error=error, generation_seconds=states.seconds,
                      training_seconds=time.perf_counter() - start)
    _save(model_path, cfg, weights, stats)
    return stats


def build_in_child(model_path: str | Path, cfg: ESampConfig, dtype: str, gpus: list[int] | None = None) -> BaseStats:
    """ensure_base in a child process (see the module doc), which must succeed. ``gpus``: the
    GPU ordinals the server will run on, the only ones the child may use (others may be another
    server's, with their memory taken)."""
    cached = cached_stats(model_path, cfg)
    if cached is not None:
        return cached
    subprocess.run([sys.executable, "-m", "esamp_sgl.base_distiller", str(model_path), cfg.to_env(), dtype],
                   check=True, env=child_env_on(gpus))
    stats = base_stats(model_path, cfg)
    if stats is None:
        raise RuntimeError(f"building the base distiller for {model_path} left no {base_path(model_path, cfg)}")
    return stats


def child_env_on(gpus: list[int] | None) -> dict[str, str]:
    """This process's environment with CUDA_VISIBLE_DEVICES narrowed to ``gpus`` (ordinals among
    the GPUs visible now, as SGLang's --base-gpu-id counts them); unchanged for None."""
    env = dict(os.environ)
    if gpus is not None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(max(gpus) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] for g in gpus if g < len(ids))
    return env


def serving_dtype(model_path: Path, dtype_flag: str | None, on_gpu: bool | None = None) -> str:
    """The torch dtype name SGLang serves the model in, from its ``--dtype`` flag (``auto``: the
    checkpoint's own dtype, float32 if it names none; on GPU float32 is served as float16, or as
    bfloat16 for Gemma models, as SGLang 0.5.23's _get_and_verify_dtype does). ``on_gpu``: by
    default, whether CUDA is available."""
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype_flag not in (None, "auto"):
        return aliases.get(dtype_flag, dtype_flag)
    config = json.loads((model_path / "config.json").read_text()) if (model_path / "config.json").is_file() else {}
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    if name != "float32" or not (torch.cuda.is_available() if on_gpu is None else on_gpu):
        return name
    return "bfloat16" if str(config.get("model_type", "")).startswith("gemma") else "float16"


@dataclass(frozen=True)
class States:
    x: torch.Tensor  # shallow [R, d]
    h: torch.Tensor  # deep [R, d]
    held_out: torch.Tensor  # [R] bool: rows of the held-out prompts
    seconds: float  # generation and capture time


@torch.no_grad()
def collect_states(model_path: str | Path, cfg: ESampConfig, *, seed: int = 0, dtype: str = "float32") -> States:
    """Every non-padding position of the model's own samples over BASE_PROMPTS, with the model
    in ``dtype``; the states are returned in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Before the server owns the GPUs, and spread over every visible one: a model that TP serves
    # may not fit on one (accelerate places its layers; the inputs go where its embedding sits).
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype),
                                                 device_map="auto" if torch.cuda.is_available() else "cpu").eval()
    device = model.device
    texts = [chat_text(tokenizer, p) for p in BASE_PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True,
                      add_special_tokens=adds_special_tokens(tokenizer)).to(device)
    torch.manual_seed(seed)
    out = model.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=MAX_NEW_TOKENS,
                         num_return_sequences=SAMPLES_PER_PROMPT, pad_token_id=tokenizer.pad_token_id)
    mask = out != tokenizer.pad_token_id
    mask[:, : batch["input_ids"].shape[1]] = batch["attention_mask"].repeat_interleave(SAMPLES_PER_PROMPT, 0).bool()
    shallow, deep = shallow_and_deep_states(model, out, mask, cfg)
    prompt_of_row = torch.arange(len(BASE_PROMPTS), device=device).repeat_interleave(SAMPLES_PER_PROMPT)
    held = (prompt_of_row < max(1, int(len(BASE_PROMPTS) * HELD_OUT))).unsqueeze(1).expand_as(mask)[mask]
    return States(shallow.cpu(), deep.cpu(), held.cpu(), time.perf_counter() - start)


def shallow_and_deep_states(model, ids: torch.Tensor, mask: torch.Tensor, cfg: ESampConfig
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distiller's input x and target h at the unmasked positions of ``ids``, from a transformers
    model: what the server computes at the same positions (tests/test_families.py holds them equal)."""
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
        model(input_ids=ids, attention_mask=mask.long(), logits_to_keep=1)  # the states, not B × T × V logits
    finally:
        for handle in handles:
            handle.remove()
    if cfg.source_layer is None:
        captured["shallow"] = inner.layers[0].input_layernorm(inner.embed_tokens(ids))
    # a model spread over GPUs leaves each state on its layer's device
    x, h = captured["shallow"], captured["deep"]
    return x[mask.to(x.device)].float(), h[mask.to(h.device)].float()


def train_base(states: States, cfg: ESampConfig, *, seed: int = 0, device: torch.device | None = None
               ) -> tuple[dict[str, torch.Tensor], float]:
    """AdamW on the training rows from the reference random init; returns the weights (on the
    CPU) and the held-out relative error ‖h − ĥ‖²/‖h‖². ``device``: where to train, by default a
    GPU if there is one (at d = 4096 the 2000 steps took ≈ 4 minutes on one CPU thread here);
    the rows are drawn on the host either way, so a seed draws the same rows."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_cfg = ESampConfig(rank=cfg.rank, init="random", optimizer="adamw", lr=TRAIN_LR)
    x, h, held_out = states.x.to(device), states.h.to(device), states.held_out.to(device)
    bank = DistillerBank(1, x.shape[1], train_cfg, seed=seed, device=device)
    xs, hs = x[~held_out], h[~held_out]
    gen = torch.Generator().manual_seed(seed)
    slot = [0] * BATCH_ROWS
    threads = torch.get_num_threads()
    # One thread on CPU: the distiller's ops are small, and with a second thread a busy core (another
    # server's scheduler busy-polls one) stalls every op at its barrier — 411 vs 6 ms a step, seen here.
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    try:
        for _ in range(TRAIN_STEPS):
            idx = torch.randint(0, len(xs), (BATCH_ROWS,), generator=gen).to(device)
            bank.train_step(xs[idx], hs[idx], slot)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        h_val = h[held_out]
        h_hat = bank.predict(x[held_out], torch.zeros(len(h_val), dtype=torch.int64, device=device))
        error = float(novelty(h_val, h_hat).mean())
    return {name: p[0].cpu().clone() for name, p in zip(PARAM_NAMES, bank.params)}, error


def _save(model_path: str | Path, cfg: ESampConfig, weights: dict[str, torch.Tensor], stats: BaseStats) -> None:
    from safetensors.torch import save_file

    path = base_path(model_path, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    meta = path.with_suffix(".json")
    meta.with_suffix(".json.tmp").write_text(json.dumps(stats.__dict__, indent=1))
    tmp.replace(path)
    meta.with_suffix(".json.tmp").replace(meta)


def main(argv: list[str] | None = None) -> int:
    """The child process of build_in_child: MODEL_DIR CONFIG_JSON DTYPE."""
    parser = argparse.ArgumentParser(prog="python -m esamp_sgl.base_distiller")
    parser.add_argument("model_dir")
    parser.add_argument("config_json")
    parser.add_argument("dtype")
    args = parser.parse_args(argv)
    ensure_base(args.model_dir, ESampConfig(**json.loads(args.config_json)), dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
