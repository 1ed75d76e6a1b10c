"""A small tree of thought: ``breadth`` first steps, each expanded into ``breadth`` answers; the
majority over the leaves wins. Each level is a fork, so each level explores as its own group."""

from __future__ import annotations

import argparse

import sglang as sgl

from programs.common import Problem, addition_problems, last_number, majority, sampling_kwargs


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
    for problem, state in zip(problems, states):
        if state.error() is not None:
            raise state.error()
        finals = [last_number(a) for a in state["leaves"]]
        vote = majority(finals)
        records.append({"question": problem.question, "expected": problem.answer, "leaves": finals,
                        "vote": vote, "correct": vote == problem.answer})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="esamp-sgl run tree-of-thought", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--problems", type=int, default=5)
    parser.add_argument("--breadth", type=int, default=2)
    parser.add_argument("--explore", type=float, default=None)
    args = parser.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    records = solve(addition_problems(args.problems), breadth=args.breadth, explore=args.explore)
    for r in records:
        print(f"{'✓' if r['correct'] else '✗'} vote={r['vote']} expected={r['expected']} leaves={r['leaves']}")
    print(f"accuracy {sum(r['correct'] for r in records) / len(records):.2f}")
