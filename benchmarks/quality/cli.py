"""``esamp-sgl bench quality``: screen recipes, draw frontiers, measure writing diversity, report.

Stages write JSON under the results directory (``quality_<stage>[_quick].json``); each point is
saved as it finishes and skipped when the command is run again, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..results_io import RESULTS_DIR, run_metadata
from . import plans
from .recipes import LEARNED_RECIPES, RECIPES, SCREEN_RECIPES, TUNE_RECIPES
from .run import ResultsFile, run_points
from .tasks import TASKS

STAGES = ("screen", "tune", "learned", "frontier", "writing", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esamp-sgl bench quality", description=__doc__)
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"of {', '.join(STAGES)} (default: all, in order)")
    parser.add_argument("--quick", action="store_true", help="a few problems and samples: minutes, not an hour")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="chain_sum,products", help=f"comma-separated, of {sorted(TASKS)}")
    parser.add_argument("--recipes", default=",".join(SCREEN_RECIPES), help="recipes to screen")
    parser.add_argument("--tune-recipes", default=",".join(TUNE_RECIPES),
                        help="the default recipe, then its one-knob variants (stage tune)")
    parser.add_argument("--learned-recipes", default=",".join(LEARNED_RECIPES),
                        help=f"learned-mix recipes, each at β {plans.LEARNED_BETAS} (stage learned)")
    parser.add_argument("--finalists", default=",".join(plans.DEFAULT_FINALISTS), help="recipes on the frontier")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    tasks = _names(args.tasks, TASKS, "task")
    recipes = {"screen": _names(args.recipes, RECIPES, "recipe"), "tune": _names(args.tune_recipes, RECIPES, "recipe"),
               "learned": _names(args.learned_recipes, RECIPES, "recipe")}
    finalists = _names(args.finalists, RECIPES, "recipe")
    suffix = "_quick" if args.quick else ""
    log_dir = args.results_dir / "logs"
    for stage in args.stages or STAGES:
        path = args.results_dir / f"quality_{stage}{suffix}.json"
        if stage in ("screen", "tune", "learned", "frontier"):
            size = plans.SIZES[(stage, args.quick)]
            betas = plans.LEARNED_BETAS if stage == "learned" else (1.0,)
            points = (plans.frontier_points(tasks, finalists, args.quick) if stage == "frontier"
                      else plans.screen_points(recipes[stage], args.quick, min_p_control=stage == "tune", betas=betas))
            results = ResultsFile(path, {"model": args.model, **asdict(size)})
            results.set_run(run_metadata())
            run_points(points, results, model=args.model, size=size, log_dir=log_dir)
        elif stage == "writing":
            from .writing import run_writing

            run_writing(args.model, finalists[0], path, quick=args.quick, log_dir=log_dir)
        else:
            from .report import write_report

            write_report(args.results_dir, suffix, readme=args.results_dir.parent / "README.md")
    return 0
