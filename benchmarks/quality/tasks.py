"""Problem sets for the quality benchmark, generated offline by reasoning-gym with fixed seeds.

Each task is scored by reasoning-gym's own scorer on a completion's final answer: its last
number where the dataset's answers are numbers (the built-in tasks), else its last non-empty
line. ``--tasks`` takes the built-in names or any reasoning-gym dataset with an optional JSON
config (``parse_task``). Prompts use the model's chat template, tokenized on the client so that
FIRE's second request can continue from exact token ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from esamp_sgl.models import adds_special_tokens, chat_text, turn_stops

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
WHOLE_NUMBER = re.compile(NUMBER.pattern + r"\.?")  # an answer that is one number
NUMBER_INSTRUCTION = "Answer with the final number at the end."
LINE_INSTRUCTION = "Give the final answer alone on the last line."


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
    def numeric(self) -> bool:
        return WHOLE_NUMBER.fullmatch(str(self.entry["answer"]).strip()) is not None

    @property
    def question(self) -> str:
        return f"{self.entry['question']} {NUMBER_INSTRUCTION if self.numeric else LINE_INSTRUCTION}"

    def final_answer(self, completion: str) -> str | None:
        if not self.numeric:
            lines = [line.strip() for line in completion.splitlines() if line.strip()]
            return lines[-1] if lines else None
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


def parse_task(spec: str) -> Task:
    """A ``--tasks`` entry: a built-in name (TASKS), or a reasoning-gym dataset name with an
    optional JSON config, ``chain_sum:{"min_terms": 3, "max_terms": 3}``. A configured task is
    named after its dataset and a hash of its config, so its results and plots stay apart."""
    name, _, config_text = spec.partition(":")
    if not config_text and name in TASKS:
        return TASKS[name]
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"--tasks: {name!r} is neither a built-in task ({', '.join(TASKS)}) nor a reasoning-gym "
                         f"dataset (e.g. {', '.join(sorted(DATASETS)[:5])}, ...)")
    try:
        config = json.loads(config_text) if config_text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--tasks: the config of {name!r} is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"--tasks: the config of {name!r} must be a JSON object, got {config_text!r}")
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:6]
    return Task(f"{name}-{digest}" if config else name, name, config)


class ChatPrompts:
    """Chat-templated prompt token ids for one model (its tokenizer files: a directory or a hub id)."""

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    @cached_property
    def stop(self) -> list[str]:
        """Where an answer ends short of EOS (models.turn_stops)."""
        return turn_stops(self.tokenizer)

    def ids(self, user_text: str) -> list[int]:
        """A chat model's user turn, or a base model's question (models.chat_text)."""
        text = chat_text(self.tokenizer, user_text)
        return self.tokenizer(text, add_special_tokens=adds_special_tokens(self.tokenizer))["input_ids"]
