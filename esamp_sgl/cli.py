"""The ``esamp-sgl`` command line: serve, models, demo, run, bench."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from esamp_sgl import models

# `esamp-sgl run NAME`: the module of esamp_sgl.programs (the repo's programs/) whose main() runs.
# Names only, so that building the parser imports no program (they import SGLang).
PROGRAMS = {
    "self-consistency": "self_consistency",
    "best-of-n": "best_of_n",
    "tree-of-thought": "tree_of_thought",
    "creative-fanout": "creative_fanout",
}


def _cmd_serve(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from esamp_sgl.serve import serve

    return serve(args.model, sglang_args)


def _cmd_models(args: argparse.Namespace, _: list[str]) -> int:
    if args.action == "list":
        for name, about in models.known_models().items():
            path = models.cache_root() / "models" / name
            state = str(path) if (path / models.MARKER).is_file() else "not fetched"
            print(f"{name}\t{about}\t{state}")
    elif args.action == "fetch":
        print(models.resolve(args.name))
    elif args.action == "tiny":
        print(models.write_tiny_model(Path(args.path), arch=args.arch, layers=args.layers, hidden=args.hidden,
                                      vocab=args.vocab, seed=args.seed))
    return 0


def _cmd_demo(args: argparse.Namespace, _: list[str]) -> int:
    from esamp_sgl.programs.demo import run_demo

    return run_demo(args.model, problems=args.problems, k=args.k, beta=args.beta)


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    importlib.import_module(f"esamp_sgl.programs.{PROGRAMS[args.program]}").main(rest)
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from esamp_sgl.benchmarks.quality.cli import main as quality_main

    return quality_main(rest)


def _cmd_base(args: argparse.Namespace, rest: list[str]) -> int:
    from esamp_sgl.serve import build_launch, prepare

    prepare(build_launch(args.model, ["--esamp-init", "base", *rest]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esamp-sgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from esamp_sgl.serve import esamp_flag_help

    serve = sub.add_parser("serve", help="launch SGLang's server with ESamp; every SGLang flag passes through",
                           description="Launch SGLang's HTTP server with ESamp (unless --no-esamp). Unknown flags "
                                       "go to SGLang unchanged; without a GPU, CPU defaults are added for flags not "
                                       "given. ESamp flags: " + esamp_flag_help())
    serve.add_argument("--model", help="known model name (see `esamp-sgl models list`) or checkpoint dir")
    serve.set_defaults(func=_cmd_serve, passthrough=True)

    mdl = sub.add_parser("models", help="offline models: list, fetch, tiny")
    msub = mdl.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    fetch = msub.add_parser("fetch", help="fetch and convert a known model into the cache")
    fetch.add_argument("name", choices=sorted(models.known_models()))
    tiny = msub.add_parser("tiny", help="write a tiny random model (for mechanics tests)")
    tiny.add_argument("path")
    tiny.add_argument("--arch", choices=models.TINY_ARCHS, default="llama")
    tiny.add_argument("--vocab", type=int, default=520)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--hidden", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    mdl.set_defaults(func=_cmd_models)

    demo = sub.add_parser("demo", help="self-consistency with and without explore on a local server")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--problems", type=int, default=6)
    demo.add_argument("--k", type=int, default=4)
    demo.add_argument("--beta", type=float, default=0.5)
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", add_help=False,  # --help goes to the program
                         help="run an SGLang program against a server: " + ", ".join(PROGRAMS))
    run.add_argument("program", choices=sorted(PROGRAMS))
    run.set_defaults(func=_cmd_run, passthrough=True)
    bench = sub.add_parser("bench", add_help=False, help="benchmarks: quality (see `esamp-sgl bench quality -h`)")
    bench.add_argument("suite", choices=["quality"])
    bench.set_defaults(func=_cmd_bench, passthrough=True)

    base = sub.add_parser("base-distiller", help="pre-train and cache a model's base distiller (--esamp-source, "
                                                 "--esamp-rank select it)")
    base.add_argument("--model", default="smollm2-135m")
    base.set_defaults(func=_cmd_base, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except (models.ModelError, ValueError) as e:
        print(f"esamp-sgl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
