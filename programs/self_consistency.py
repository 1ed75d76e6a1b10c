"""Self-consistency: k forks answer the same question, the majority answer wins.

With ``explore``, the k forks share one distiller and are pushed apart.
"""

from __future__ import annotations

import sglang as sgl

from .common import Problem, arithmetic_main, last_number, majority, raise_errors, sampling_kwargs


@sgl.function
def self_consistency(s, question, k, beta, max_tokens, temperature):
    s += sgl.user(question)
    forks = s.fork(k)
    forks += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=temperature,
                                   **sampling_kwargs(beta)))
    s["answers"] = [f["answer"] for f in forks]
    s["meta"] = [f.get_meta_info("answer") for f in forks]


def solve(problems: list[Problem], k: int = 8, explore: float | None = None, max_tokens: int = 64,
          temperature: float = 0.8, num_threads: int = 4, progress: bool = True) -> list[dict]:
    """One record per problem: the k answers, the vote, whether it is right, the forks' meta."""
    states = self_consistency.run_batch(
        [{"question": p.question, "k": k, "beta": explore, "max_tokens": max_tokens, "temperature": temperature}
         for p in problems], num_threads=num_threads, progress_bar=progress)
    records = []
    for problem, state in zip(problems, raise_errors(states)):
        finals = [last_number(a) for a in state["answers"]]
        vote = majority(finals)
        records.append({"question": problem.question, "expected": problem.answer, "answers": finals,
                        "vote": vote, "correct": vote == problem.answer,
                        "any_correct": problem.answer in finals, "meta": state["meta"]})
    return records


def main(argv: list[str] | None = None) -> None:
    arithmetic_main(argv, "self-consistency", __doc__, solve, ("k", 8), 10,
                    lambda r: f"vote={r['vote']} answers={r['answers']}")
