"""``esamp-sgl bench quality --quick`` end to end on the tiny model: real servers (a
base-distiller recipe with a β schedule, which the tune stage reuses from the screen, and the
learned mix, whose server the frontier and writing stages reuse), saved points, resumption, the
report and its plots."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esamp_sgl.base_distiller import base_path, base_stats
from esamp_sgl.config import ESampConfig
from tests.conftest import child_env, launch_side_by_side

BENCH = [sys.executable, "-m", "esamp_sgl.cli", "bench", "quality"]


def _bench(tiny_model_path: Path, results: Path, *stages: str) -> subprocess.CompletedProcess:
    env = child_env()
    args = [*stages, "--quick", "--model", str(tiny_model_path), "--tasks", "products", "--recipes", "base-post-halflife16",
            "--tune-recipes", "base-post-halflife16", "--learned-recipes", "base-learned-lr5e-2", "--finalists", "base-learned-lr5e-2",
            "--results-dir", str(results)]
    return subprocess.run(BENCH + args, env=env, capture_output=True, text=True, timeout=900)


def test_quick_benchmark_runs_every_stage_and_resumes(tiny_model_path: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "README.md").parent.mkdir(parents=True)
    (results / "README.md").write_text("# benchmarks\n")
    run = _bench(tiny_model_path, results)
    assert run.returncode == 0, run.stderr[-4000:]
    started = re.findall(r"recipe (\S+): server ready in (\d+) s", run.stdout)
    assert [r for r, s in started if s != "0"] == ["base-post-halflife16", "base-learned-lr5e-2"]
    # the tune stage kept the screen's server, the frontier stage the learned stage's
    assert ("base-post-halflife16", "0") in started and ("base-learned-lr5e-2", "0") in started

    screen = json.loads((results / "quality_screen_quick.json").read_text())
    assert set(screen["points"]) == {"chain_sum/base-post-halflife16/plain-T0.8",
                                     "chain_sum/base-post-halflife16/base-post-halflife16-T0.8-b1-minp0.05"}
    for key, point in screen["points"].items():
        assert len(point["problems"]) == 3 and all(len(p["answers"]) == 4 for p in point["problems"])
        explores = "b1" in key
        assert all((p["novelty"] is not None) == explores for p in point["problems"])
    tune = json.loads((results / "quality_tune_quick.json").read_text())
    assert set(tune["points"]) == {"chain_sum/base-post-halflife16/plain-T0.8",
                                   "chain_sum/base-post-halflife16/base-post-halflife16-T0.8-b1-minp0.05",
                                   "chain_sum/base-post-halflife16/min_p-T0.8-minp0.05"}
    learned = json.loads((results / "quality_learned_quick.json").read_text())
    assert set(learned["points"]) == {"chain_sum/base-learned-lr5e-2/plain-T0.8",
                                      "chain_sum/base-learned-lr5e-2/base-learned-lr5e-2-T0.8-b1"}
    frontier = json.loads((results / "quality_frontier_quick.json").read_text())
    assert {p["method"]["family"] for p in frontier["points"].values()} == {"plain", "fire", "base-learned-lr5e-2"}
    assert "bench quality" in frontier["run"]["command"]
    writing = json.loads((results / "quality_writing_quick.json").read_text())
    for point in writing["points"].values():
        assert all(0 < p["vendi"] <= 4 + 1e-6 and p["log_ppl"] > 0 for p in point["prompts"])

    stats = base_stats(tiny_model_path, ESampConfig(init="base"))
    assert base_path(tiny_model_path, ESampConfig(init="base")).is_file() and stats is not None
    assert 0 < stats.held_out_relative_error < 1.0  # better than the untrained distiller's ≈ 1+

    readme = (results / "README.md").read_text()
    assert "| ESamp point | vs plain |" in readme and "Vendi" in readme and "Screening" in readme and "Tuning" in readme
    assert "The learned mix" in readme
    assert (results / "quality_frontier_products_quick.png").stat().st_size > 0
    assert (results / "quality_writing_quick.png").stat().st_size > 0

    again = _bench(tiny_model_path, results, "screen", "frontier")  # every point saved: no server starts
    assert again.returncode == 0 and "server ready" not in again.stdout


def test_url_runs_frontier_and_writing_on_a_server_it_did_not_start(tiny_model_path: Path, tmp_path: Path) -> None:
    """What a user runs against their own GPU server: any reasoning-gym dataset, with a config."""
    results = tmp_path / "mine"
    tasks = 'chain_sum:{"min_terms": 3, "max_terms": 3, "max_digits": 1};gsm_symbolic'
    with launch_side_by_side((tiny_model_path, "esamp-tiny-bench-url", "--esamp-filter-mode", "post")) as (server,):
        env = child_env()
        run = subprocess.run(BENCH + ["--url", server.url, "--quick", "--tasks", tasks, "--problems", "2", "--n", "2",
                                      "--max-tokens", "8", "--results-dir", str(results)],
                             env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        assert "server ready in 0 s" in run.stdout  # nothing started
        refused = subprocess.run(BENCH + ["screen", "--url", server.url], env=env, capture_output=True, text=True)
        assert refused.returncode != 0 and "--url runs frontier, writing, report" in refused.stderr
    frontier = json.loads((results / "quality_frontier_quick.json").read_text())
    assert frontier["settings"] == {"model": str(tiny_model_path), "problems": 2, "n": 2, "max_tokens": 8,
                                    "url": server.url}
    tasks_run = {key.split("/")[0] for key in frontier["points"]}
    assert len(tasks_run) == 2 and "gsm_symbolic" in tasks_run and any(t.startswith("chain_sum-") for t in tasks_run)
    for key, point in frontier["points"].items():
        assert key.split("/")[1] == "served-post"
        assert len(point["problems"]) == 2 and all(len(p["answers"]) == 2 for p in point["problems"])
        assert all(t <= 8 for p in point["problems"] for t in p["tokens"])
    esamp = [p for p in frontier["points"].values() if p["method"]["beta"] > 0]
    assert esamp and all(p["method"]["min_p"] == 0.05 for p in esamp)  # the post-filter's candidate cut
    writing = json.loads((results / "quality_writing_quick.json").read_text())
    assert writing["settings"]["n"] == 2 and writing["points"]
    assert "| ESamp point | vs plain |" in (results / "README.md").read_text()


def test_tasks_take_any_reasoning_gym_dataset_and_refuse_unknown_ones() -> None:
    from esamp_sgl.benchmarks.quality.tasks import TASKS, parse_task

    assert parse_task("products") is TASKS["products"]
    configured = parse_task('chain_sum:{"min_terms": 3}')
    assert configured.dataset == "chain_sum" and configured.config == {"min_terms": 3}
    assert configured.name != "chain_sum" and configured.name == parse_task('chain_sum:{"min_terms":3}').name
    spelled = parse_task("spell_backward").problems(1)[0]
    assert not spelled.numeric and spelled.final_answer("thinking...\n" + spelled.entry["answer"] + "\n") == \
        spelled.entry["answer"] and spelled.correct(spelled.entry["answer"])
    for bad, match in (("no_such_dataset", "neither a built-in task"), ("chain_sum:{x", "not JSON"),
                       ("chain_sum:[1]", "must be a JSON object")):
        with pytest.raises(ValueError, match=match):
            parse_task(bad)
