"""Pieces the programs share: chat-formatted questions, answer extraction, problem sets."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

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
