"""Best-of-n with a verifier: n exploring candidates, the model judges each, the first judged
correct wins (ties: the majority answer among candidates)."""

from __future__ import annotations

import sglang as sgl

from .common import Problem, arithmetic_main, last_number, majority, raise_errors, sampling_kwargs


@sgl.function
def best_of_n(s, question, n, beta, max_tokens, temperature):
    s += sgl.user(question)
    candidates = s.fork(n)
    candidates += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=temperature,
                                        **sampling_kwargs(beta)))
    candidates += sgl.user("Is your answer above correct? Reply yes or no.")
    candidates += sgl.assistant(sgl.gen("verdict", choices=["yes", "no"]))
    s["answers"] = [c["answer"] for c in candidates]
    s["verdicts"] = [c["verdict"] for c in candidates]


def solve(problems: list[Problem], n: int = 4, explore: float | None = None, max_tokens: int = 64,
          temperature: float = 0.8, num_threads: int = 4, progress: bool = True) -> list[dict]:
    states = best_of_n.run_batch(
        [{"question": p.question, "n": n, "beta": explore, "max_tokens": max_tokens, "temperature": temperature}
         for p in problems], num_threads=num_threads, progress_bar=progress)
    records = []
    for problem, state in zip(problems, raise_errors(states)):
        finals = [last_number(a) for a in state["answers"]]
        accepted = [f for f, v in zip(finals, state["verdicts"]) if v == "yes" and f is not None]
        chosen = accepted[0] if accepted else majority(finals)
        records.append({"question": problem.question, "expected": problem.answer, "answers": finals,
                        "verdicts": state["verdicts"], "chosen": chosen, "correct": chosen == problem.answer})
    return records


def main(argv: list[str] | None = None) -> None:
    arithmetic_main(argv, "best-of-n", __doc__, solve, ("n", 4), 10,
                    lambda r: f"chosen={r['chosen']} answers={r['answers']} verdicts={r['verdicts']}")
