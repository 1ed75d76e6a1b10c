"""Run points of the quality benchmark through a real server and save them, resumably.

A point is (task, method); its record holds, per problem, every sample's final answer,
correctness, token count and ESamp novelty. Points already in the results file are skipped,
so an interrupted run continues where it stopped. Points are grouped by the server recipe
they need, and a recipe's server is started once and kept into the next stage while that stage
wants the same recipe — or, with ``--url``, every point runs on the server already there
(RecipeServers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
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
                       max_tokens or problem.task.max_tokens, chat.stop)
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


class RecipeServers:
    """The server for each recipe, one alive at a time: started on first use and kept until a
    different recipe is asked for, so stages that run the same recipe share one startup. With
    ``url``, the server the user runs stands for the recipe it serves (recipes.SERVED_MIN_P)."""

    def __init__(self, model: str, log_dir: Path, url: str | None = None) -> None:
        self.model, self.log_dir, self.url = model, log_dir, url
        self.recipe: str | None = None
        self._server: LaunchedServer | None = None

    def url_for(self, recipe: str) -> tuple[str, float]:
        """(URL, seconds spent starting it now: 0 when it was already up)."""
        if self.url is not None:
            if recipe not in SERVED_MIN_P:
                raise ValueError(f"recipe {recipe!r} needs a server started for it; --url serves {sorted(SERVED_MIN_P)}")
            return self.url, 0.0
        if recipe != self.recipe:
            self.close()
            started = time.perf_counter()
            self._server = LaunchedServer(self.model, RECIPES[recipe], log_path=self.log_dir / f"server-{recipe}.log",
                                          startup_timeout=1800)
            self.recipe = recipe
            return self._server.url, time.perf_counter() - started
        return self._server.url, 0.0

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server, self.recipe = None, None

    def __enter__(self) -> "RecipeServers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_points(points: Iterable[Point], results: ResultsFile, *, servers: RecipeServers, chat: ChatPrompts,
               size: Size) -> None:
    """Run the points not yet in ``results``, grouped by recipe: the recipe already served first."""
    todo = [p for p in points if not results.has("points", p.key)]
    by_recipe: dict[str, list[Point]] = {}
    for p in sorted(todo, key=lambda p: p.method.recipe != servers.recipe):  # stable: otherwise in order
        by_recipe.setdefault(p.method.recipe, []).append(p)
    for recipe, recipe_points in by_recipe.items():
        server_url, startup = servers.url_for(recipe)
        print(f"recipe {recipe}: server ready in {startup:.0f} s", flush=True)
        for p in recipe_points:
            record = run_point(server_url, chat, p.task.problems(size.problems), p.method, size.n, p.key,
                               size.max_tokens)
            record["server_startup_seconds"] = startup
            results.put("points", p.key, record)
            print(f"  {p.key}: {record['seconds']:.0f} s", flush=True)
