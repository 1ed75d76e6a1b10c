"""A small tree of thought: ``breadth`` first steps, each expanded into ``breadth`` answers; the
majority over the leaves wins. Each level is a fork, so each level explores as its own group."""

from __future__ import annotations

import sglang as sgl

from .common import Problem, arithmetic_main, last_number, majority, raise_errors, sampling_kwargs


@sgl.function
def tree_of_thought(s, question, breadth, beta, max_tokens, temperature):
    s += sgl.user(question + " First write one step of your reasoning.")
    steps = s.fork(breadth)
    steps += sgl.assistant(sgl.gen("step", max_tokens=max_tokens, temperature=temperature, **sampling_kwargs(beta)))
    leaves = []
    for step in steps:
        step += sgl.user("Now give the final answer.")
        answers = step.fork(breadth)
        answers += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=temperature,
                                         **sampling_kwargs(beta)))
        leaves += [a["answer"] for a in answers]
    s["leaves"] = leaves


def solve(problems: list[Problem], breadth: int = 2, explore: float | None = None, max_tokens: int = 48,
          temperature: float = 0.8, num_threads: int = 4, progress: bool = True) -> list[dict]:
    states = tree_of_thought.run_batch(
        [{"question": p.question, "breadth": breadth, "beta": explore, "max_tokens": max_tokens,
          "temperature": temperature} for p in problems], num_threads=num_threads, progress_bar=progress)
    records = []
    for problem, state in zip(problems, raise_errors(states)):
        finals = [last_number(a) for a in state["leaves"]]
        vote = majority(finals)
        records.append({"question": problem.question, "expected": problem.answer, "leaves": finals,
                        "vote": vote, "correct": vote == problem.answer})
    return records


def main(argv: list[str] | None = None) -> None:
    arithmetic_main(argv, "tree-of-thought", __doc__, solve, ("breadth", 2), 5,
                    lambda r: f"vote={r['vote']} leaves={r['leaves']}")
