"""Pieces the programs share: answer extraction, problem sets, state checks, the arithmetic CLI."""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sglang as sgl

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def last_number(text: str) -> str | None:
    """The final answer of an arithmetic reply: its last number."""
    numbers = NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def majority(answers: list[str | None]) -> str | None:
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def addition_problems(count: int, seed: int = 0) -> list[Problem]:
    """Two-term additions of ≤ 2-digit numbers, generated offline from a fixed seed."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        problems.append(Problem(f"What is {a} + {b}? Give the final answer as a number.", str(a + b)))
    return problems


def sampling_kwargs(explore: float | None) -> dict:
    return {} if explore is None else {"explore": explore}


def raise_errors(states: list) -> list:
    """SGLang keeps a program's error in its state; a program that failed must not look empty."""
    for state in states:
        if state.error() is not None:
            raise state.error()
    return states


def arithmetic_main(argv: list[str] | None, name: str, doc: str | None, solve: Callable[..., list[dict]],
                    width: tuple[str, int], problems: int, describe: Callable[[dict], str]) -> None:
    """The CLI of a program that solves addition problems: ``--url --problems --explore`` plus the
    program's width flag (``width`` = (name, default)), one line per problem, then the accuracy."""
    parser = argparse.ArgumentParser(prog=f"esamp-sgl run {name}", description=doc)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--problems", type=int, default=problems)
    parser.add_argument(f"--{width[0]}", type=int, default=width[1])
    parser.add_argument("--explore", type=float, default=None)
    args = parser.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    kwargs: dict[str, Any] = {width[0]: getattr(args, width[0]), "explore": args.explore}
    records = solve(addition_problems(args.problems), **kwargs)
    for r in records:
        print(f"{'✓' if r['correct'] else '✗'} expected={r['expected']} {describe(r)}")
    print(f"accuracy {sum(r['correct'] for r in records) / len(records):.2f}")
