"""``esamp-sgl bench quality``: screen recipes, draw frontiers, measure writing diversity, report.

Stages write JSON under the results directory (``quality_<stage>[_quick].json``); each point is
saved as it finishes and skipped when the command is run again, so a stopped run resumes.

``--url URL`` measures an ``esamp-sgl serve`` already running anywhere (your model, your GPUs):
the frontier and writing stages run on it with the recipe it serves, and the report goes to the
results directory's README.md. Recipe stages (screen, tune, learned) start servers of their own.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path


from esamp_sgl.models import resolve
from esamp_sgl.server_check import check_esamp_active, esamp_states_in

from ..results_io import RESULTS_DIR, run_metadata
from . import plans
from .recipes import LEARNED_RECIPES, RECIPES, SCREEN_RECIPES, TUNE_RECIPES
from .run import RecipeServers, ResultsFile, run_points
from .tasks import TASKS, ChatPrompts, parse_task

STAGES = ("screen", "tune", "learned", "frontier", "writing", "report")
URL_STAGES = ("frontier", "writing", "report")
# Where results go when the package runs from an installed wheel, or with --url: the working
# directory, not the package (benchmarks/results is this repository's own record).
USER_RESULTS_DIR = Path("esamp-bench-results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esamp-sgl bench quality", description=__doc__)
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"of {', '.join(STAGES)} (default: all, in order)")
    parser.add_argument("--quick", action="store_true", help="a few problems and samples: minutes, not an hour")
    parser.add_argument("--model", default="smollm2-135m", help="the model of the servers started here")
    parser.add_argument("--url", help="an esamp-sgl serve already running: frontier and writing run on it")
    parser.add_argument("--tokenizer", help="tokenizer and chat template (default: the server's tokenizer_path)")
    parser.add_argument("--tasks", default="chain_sum,products",
                        help=f"comma-separated: built-in {sorted(TASKS)}, or any reasoning-gym dataset with an "
                             "optional JSON config, e.g. 'gsm_symbolic' or 'chain_sum:{\"min_terms\":3}' "
                             "(separate entries with ';' when a config holds commas)")
    parser.add_argument("--problems", type=int, help="problems per task (default: the stage's size)")
    parser.add_argument("--n", type=int, help="samples per problem or writing prompt (default: the stage's size)")
    parser.add_argument("--max-tokens", type=int, help="answer budget per sample (default: each task's own)")
    parser.add_argument("--recipes", default=",".join(SCREEN_RECIPES), help="recipes to screen")
    parser.add_argument("--tune-recipes", default=",".join(TUNE_RECIPES),
                        help="the default recipe, then its one-knob variants (stage tune)")
    parser.add_argument("--learned-recipes", default=",".join(LEARNED_RECIPES),
                        help=f"learned-mix recipes, each at β {plans.LEARNED_BETAS} (stage learned)")
    parser.add_argument("--finalists", default=",".join(plans.DEFAULT_FINALISTS), help="recipes on the frontier")
    parser.add_argument("--results-dir", type=Path,
                        help=f"default: benchmarks/results in this repository, else ./{USER_RESULTS_DIR}")
    return parser


def split_tasks(text: str) -> list[str]:
    """``--tasks`` entries: ';'-separated if any ';' is present, else ','-separated."""
    return [t.strip() for t in text.split(";" if ";" in text else ",") if t.strip()]


def served(url: str) -> tuple[str, str, str]:
    """(model path, tokenizer path, recipe name) of the esamp-sgl server at ``url``."""
    info = check_esamp_active(url)
    filter_mode = esamp_states_in(info)[0]["config"]["filter_mode"]
    return info["model_path"], info.get("tokenizer_path") or info["model_path"], f"served-{filter_mode}"


def default_results_dir(url: str | None) -> Path:
    in_checkout = "site-packages" not in RESULTS_DIR.parts and (RESULTS_DIR.parent.parent / "pyproject.toml").is_file()
    return RESULTS_DIR if in_checkout and url is None else USER_RESULTS_DIR


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
    if args.url and set(args.stages) - set(URL_STAGES):
        parser.error(f"--url runs {', '.join(URL_STAGES)}: the recipe stages start servers of their own")
    try:
        tasks = [parse_task(t) for t in split_tasks(args.tasks)]
    except ValueError as e:
        parser.error(str(e))
    recipes = {"screen": _names(args.recipes, RECIPES, "recipe"), "tune": _names(args.tune_recipes, RECIPES, "recipe"),
               "learned": _names(args.learned_recipes, RECIPES, "recipe")}
    if args.url:
        args.url = args.url.rstrip("/")
        model, tokenizer, recipe = served(args.url)
        finalists = [recipe]
    else:
        model, finalists = args.model, _names(args.finalists, RECIPES, "recipe")
        tokenizer = str(resolve(args.model))
    chat = ChatPrompts(args.tokenizer or tokenizer)
    results_dir = args.results_dir or default_results_dir(args.url)
    suffix = "_quick" if args.quick else ""
    overrides = {k: v for k, v in (("problems", args.problems), ("n", args.n), ("max_tokens", args.max_tokens)) if v}
    with RecipeServers(model, results_dir / "logs", args.url) as servers:
        for stage in args.stages or (URL_STAGES if args.url else STAGES):
            path = results_dir / f"quality_{stage}{suffix}.json"
            if stage in ("screen", "tune", "learned", "frontier"):
                size = replace(plans.SIZES[(stage, args.quick)], **overrides)
                betas = plans.LEARNED_BETAS if stage == "learned" else (1.0,)
                points = (plans.frontier_points(tasks, finalists, args.quick) if stage == "frontier"
                          else plans.screen_points(recipes[stage], args.quick, min_p_control=stage == "tune", betas=betas))
                settings = {"model": model, **asdict(size)} | ({"url": args.url} if args.url else {})
                results = ResultsFile(path, settings)
                results.set_run(run_metadata())
                run_points(points, results, servers=servers, chat=chat, size=size)
            elif stage == "writing":
                from .writing import run_writing

                run_writing(model, finalists[0], path, quick=args.quick, servers=servers, chat=chat, n=args.n)
            else:
                from .report import write_report

                readme = results_dir.parent / "README.md" if results_dir == RESULTS_DIR else results_dir / "README.md"
                if not readme.is_file():
                    readme.parent.mkdir(parents=True, exist_ok=True)
                    readme.write_text(f"# ESamp quality: {model}\n")
                write_report(results_dir, suffix, readme=readme)
    return 0
