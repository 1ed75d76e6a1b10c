"""Does a model serve right, plain and with ESamp? Greedy parity of SGLang against transformers,
then ESamp on the same model: β = 0 equals the plain server token for token, and exploring
mixes every token.

For each prompt (raw text with the tokenizer's own special tokens: base models have no chat
template), transformers' greedy continuation is compared with a `--no-esamp` server's; where
they part, the server's top-two logprobs at that step say whether it was a float tie. Then an
ESamp server (the default recipe: its base distiller is pre-trained first, timed) serves the
same prompts at β = 0 and explores them at β = 1. Run:
  .venv/bin/python benchmarks/model_check.py --model gemma3-270m [--max-tokens 24]
Writes benchmarks/results/model_check_MODEL.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import requests
import torch

from esamp_sgl.benchmarks.parity import first_divergence, top_two_gap
from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import resolve

PROMPTS = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The three primary colors are"]
TIE = 1e-3  # top-two logprobs closer than this: SGLang's CPU kernels and transformers may order them apart


def transformers_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
            outs.append(out[0, len(ids):].tolist())
    return outs


def generate(url: str, ids: list[int], max_tokens: int, esamp: dict | None = None, **sampling) -> dict:
    params = {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True, **sampling}
    if esamp is not None:
        params["custom_params"] = {"esamp": esamp}
    body = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 2, "sampling_params": params}
    response = requests.post(url + "/generate", json=body, timeout=1800)
    response.raise_for_status()
    return response.json()


def parity(reference: list[int], out: dict) -> dict:
    """Where the server's greedy tokens part from ``reference``, and whether that step was a tie."""
    diverged = first_divergence(reference, out["output_ids"])
    if diverged is None:
        return {"equal": True}
    gap = top_two_gap(out, diverged)
    return {"equal": False, "diverged_at": diverged, "top_two_gap": gap, "float_tie": gap < TIE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    started = time.perf_counter()
    reference = transformers_greedy(path, prompts, args.max_tokens)
    result: dict = {"model": args.model, "max_tokens": args.max_tokens, "prompts": PROMPTS,
                    "transformers_seconds": time.perf_counter() - started,
                    "transformers_text": [tokenizer.decode(r) for r in reference]}
    logs = Path(tempfile.mkdtemp(prefix="model-check-"))
    with LaunchedServer(str(path), ["--no-esamp"], log_path=logs / "plain.log", startup_timeout=1800) as plain:
        plain_outs = [generate(plain.url, ids, args.max_tokens) for ids in prompts]
    result["sglang_vs_transformers"] = [parity(r, o) for r, o in zip(reference, plain_outs)]
    started = time.perf_counter()
    with LaunchedServer(str(path), [], log_path=logs / "esamp.log", startup_timeout=3600) as esamp:
        result["esamp_server_startup_seconds"] = time.perf_counter() - started  # the base distiller's build included
        beta0 = [generate(esamp.url, ids, args.max_tokens, {"beta": 0.0}) for ids in prompts]
        explored = [generate(esamp.url, ids, args.max_tokens, {"beta": 1.0, "seed": 1}, temperature=0.8)
                    for ids in prompts]
    result["beta_zero_equals_plain"] = [b["output_ids"] == p["output_ids"] for b, p in zip(beta0, plain_outs)]
    result["explored"] = [{"tokens_mixed": e["meta_info"]["esamp"]["tokens_mixed"],
                           "mean_novelty": e["meta_info"]["esamp"]["mean_novelty"], "text": e["text"]}
                          for e in explored]
    for key in ("sglang_vs_transformers", "beta_zero_equals_plain"):
        print(key, result[key])
    save_result(f"model_check_{args.model}", result)


if __name__ == "__main__":
    main()
