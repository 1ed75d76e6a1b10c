"""Run points of the quality benchmark through a real server and save them, resumably.

A point is (task, method); its record holds, per problem, every sample's final answer,
correctness, token count and ESamp novelty. Points already in the results file are skipped,
so an interrupted run continues where it stopped. Points are grouped by the server recipe
they need, and each recipe's server is started once — or, with ``--url``, every point runs on
the server already there (recipe_server).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from esamp_sgl.launcher import LaunchedServer

from .methods import Method, draw
from .recipes import RECIPES, SERVED_MIN_P
from .tasks import ChatPrompts, Problem, Task


@dataclass(frozen=True)
class Point:
    task: Task
    method: Method

    @property
    def key(self) -> str:
        return f"{self.task.name}/{self.method.recipe}/{self.method.key}"


@dataclass(frozen=True)
class Size:
    problems: int
    n: int
    max_tokens: int | None = None  # None: each task's own answer budget


class ResultsFile:
    """The JSON file of one benchmark mode: settings plus finished points, saved after each point."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {}
        if data and data.get("settings") != settings:
            raise ValueError(f"{path} was made with settings {data.get('settings')}, not {settings}; "
                             "move it away or use the same settings")
        self.data = {"settings": settings, "points": {}, "writing": {}, **data}

    def has(self, section: str, key: str) -> bool:
        return key in self.data[section]

    def set_run(self, run: dict) -> None:
        self.data["run"] = run
        self._save()

    def put(self, section: str, key: str, record: dict) -> None:
        self.data[section][key] = record
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def sample_seeds(problem: Problem, n: int) -> list[int]:
    """The same seeds for a problem in every method: samples pair across methods."""
    return [problem.index * 1000 + j for j in range(n)]


def run_point(url: str, chat: ChatPrompts, problems: list[Problem], method: Method, n: int, label: str,
              max_tokens: int | None = None) -> dict:
    """Every problem's n samples under ``method``, all problems in flight at once."""
    start = time.perf_counter()
    records: list[dict | None] = [None] * len(problems)

    def one(problem: Problem) -> dict:
        samples = draw(url, chat.ids(problem.question), method, sample_seeds(problem, n),
                       max_tokens or problem.task.max_tokens)
        answers = [problem.final_answer(s.text) for s in samples]
        novelty = [s.novelty for s in samples if s.novelty is not None]
        return {"index": problem.index, "answers": answers, "correct": [problem.correct(a) for a in answers],
                "tokens": [s.tokens for s in samples], "novelty": sum(novelty) / len(novelty) if novelty else None,
                "example": samples[0].text}

    with ThreadPoolExecutor(len(problems)) as pool:
        futures = {pool.submit(one, p): i for i, p in enumerate(problems)}
        for future in tqdm(as_completed(futures), total=len(problems), desc=label, leave=False):
            records[futures[future]] = future.result()
    return {"method": asdict(method), "seconds": time.perf_counter() - start, "problems": records}


@contextmanager
def recipe_server(recipe: str, model: str, log_dir: Path, url: str | None = None) -> Iterator[str]:
    """The URL of a server for ``recipe``: one started here for the run, or ``url`` (the
    server the user runs; its recipe is what it serves, named by recipes.SERVED_MIN_P)."""
    if url is not None:
        if recipe not in SERVED_MIN_P:
            raise ValueError(f"recipe {recipe!r} needs a server started for it; --url serves {sorted(SERVED_MIN_P)}")
        yield url
        return
    with LaunchedServer(model, RECIPES[recipe], log_path=log_dir / f"server-{recipe}.log",
                        startup_timeout=1800) as server:
        yield server.url


def run_points(points: Iterable[Point], results: ResultsFile, *, model: str, chat: ChatPrompts, size: Size,
               log_dir: Path, url: str | None = None) -> None:
    """Run the points not yet in ``results``, one server per recipe (or all on ``url``)."""
    todo = [p for p in points if not results.has("points", p.key)]
    by_recipe: dict[str, list[Point]] = {}
    for p in todo:
        by_recipe.setdefault(p.method.recipe, []).append(p)
    for recipe, recipe_points in by_recipe.items():
        started = time.perf_counter()
        with recipe_server(recipe, model, log_dir, url) as server_url:
            startup = time.perf_counter() - started
            print(f"recipe {recipe}: server ready in {startup:.0f} s", flush=True)
            for p in recipe_points:
                record = run_point(server_url, chat, p.task.problems(size.problems), p.method, size.n, p.key,
                                   size.max_tokens)
                record["server_startup_seconds"] = startup
                results.put("points", p.key, record)
                print(f"  {p.key}: {record['seconds']:.0f} s", flush=True)
