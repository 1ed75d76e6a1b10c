"""Creative-writing fan-out: n continuations of one prompt, exploring together; each with its
text and mean novelty, so a caller can rank or filter them."""

from __future__ import annotations

import argparse

import sglang as sgl

from .common import raise_errors, sampling_kwargs


@sgl.function
def creative_fanout(s, prompt, n, beta, max_tokens, temperature):
    s += sgl.user(prompt)
    drafts = s.fork(n)
    drafts += sgl.assistant(sgl.gen("draft", max_tokens=max_tokens, temperature=temperature, **sampling_kwargs(beta)))
    s["drafts"] = [d["draft"] for d in drafts]
    s["novelty"] = [(d.get_meta_info("draft").get("esamp") or {}).get("mean_novelty") for d in drafts]


def fan_out(prompt: str, n: int = 4, explore: float | None = None, max_tokens: int = 64,
            temperature: float = 0.9) -> list[dict]:
    (state,) = raise_errors([creative_fanout.run(prompt, n, explore, max_tokens, temperature)])
    return [{"text": t, "novelty": v} for t, v in zip(state["drafts"], state["novelty"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="esamp-sgl run creative-fanout", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--prompt", default="Write the opening line of a story about a lighthouse.")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--explore", type=float, default=None)
    args = parser.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    for i, draft in enumerate(fan_out(args.prompt, n=args.n, explore=args.explore)):
        print(f"[{i}] novelty={draft['novelty']}\n{draft['text'].strip()}\n")
