"""Problem sets for the quality benchmark, generated offline by reasoning-gym with fixed seeds.

Each task is scored by reasoning-gym's own scorer on the last number of a completion (all
tasks here have integer answers). Prompts use the model's chat template, tokenized on the
client so that FIRE's second request can continue from exact token ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from esamp_sgl.models import chat_text

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
INSTRUCTION = "Answer with the final number at the end."


@dataclass(frozen=True)
class Task:
    """A reasoning-gym dataset configuration plus the answer budget used for it."""

    name: str
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 64
    seed: int = 42

    def problems(self, count: int) -> list["Problem"]:
        import reasoning_gym

        data = reasoning_gym.create_dataset(self.dataset, size=count, seed=self.seed, **self.config)
        return [Problem(self, i, entry, data) for i, entry in enumerate(data)]


@dataclass(frozen=True)
class Problem:
    task: Task
    index: int
    entry: dict[str, Any]
    dataset: Any = field(repr=False, compare=False)

    @property
    def question(self) -> str:
        return f"{self.entry['question']} {INSTRUCTION}"

    def final_answer(self, completion: str) -> str | None:
        numbers = NUMBER.findall(completion)
        return numbers[-1].replace(",", "").rstrip(".") if numbers else None

    def correct(self, answer: str | None) -> bool:
        return answer is not None and self.dataset.score_answer(answer, self.entry) >= 1.0


# Chosen so that SmolLM2-135M-Instruct's plain pass@1 sits roughly between 5% and 60%
# (measured: benchmarks/results/quality_*.json, plain rows).
TASKS: dict[str, Task] = {
    "chain_sum": Task("chain_sum", "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "products": Task("products", "products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
}


class ChatPrompts:
    """Chat-templated prompt token ids for one model (the server's own tokenizer files)."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    def ids(self, user_text: str) -> list[int]:
        return self.tokenizer(chat_text(self.tokenizer, user_text), add_special_tokens=False)["input_ids"]
