"""``llada-edge``: one subcommand per public function.

* ``synth``     -> :func:`llada_edge.synthetic.synthesize`
* ``inspect``   -> :func:`llada_edge.summary.summarize_checkpoint`
* ``reference`` -> :func:`llada_edge.reference.run_reference`

Bad input (a broken folder, a wrong size...) exits with code 2 and a one-line reason on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from llada_edge.errors import LladaEdgeError

EXIT_USAGE = 2


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from llada_edge.synthetic import synthesize

    synthesize(args.out, args.preset, layers=args.layers, seed=args.seed, expert_dtype=args.experts_dtype,
               components=args.components, force=args.force, progress=_progress)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from llada_edge.summary import summarize_checkpoint

    summary = summarize_checkpoint(args.folder)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from llada_edge.reference import run_reference

    results = run_reference(args.model, args.height, args.width, args.seed, progress=_progress)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.name:<26} {r.seconds * 1000:>9.1f} ms  {r.output}")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from llada_edge.synthetic import COMPONENTS, PRESETS

    parser = argparse.ArgumentParser(
        prog="llada-edge",
        description="Export toolchain and lean runtime for LLaDA2.0-Uni. Each subcommand has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a deterministic synthetic checkpoint in the upstream layout",
                       description="Write a synthetic LLaDA2.0-Uni checkpoint folder (same files, keys, shapes, "
                       "dtypes, sharding and special-token ids as upstream, seeded random values). The folder "
                       "is written under a temporary name and renamed when complete.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny: every structural feature at test size; uni: the real dimensions")
    p.add_argument("--layers", type=int, default=None,
                   help="backbone layers (also caps the ViT and DiT depth); default: tiny 3, uni 2")
    p.add_argument("--seed", type=int, default=0, help="seed of every tensor (default 0)")
    p.add_argument("--experts-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="store routed experts as bf16 or float8_e4m3fn (the upstream -FP8 variant)")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="NAME",
                   help=f"which weights to write (configs and tokenizer always): {' '.join(COMPONENTS)}")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--out", required=True, help="the checkpoint folder to create")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="validate a checkpoint folder and summarise it",
                       description="Validate every config, tensor key, shape and dtype of a checkpoint folder "
                       "(headers only) and print components, parameter counts, dtypes and shards. Exit code 2 "
                       "and a message naming the file and key when something is wrong.")
    p.add_argument("folder", help="checkpoint folder in the upstream layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("reference", help="run each PyTorch reference component once (smoke check)",
                       description="Load each component of a checkpoint folder with the PyTorch reference "
                       "modules and run it once on deterministic inputs; prints outputs and timings.")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--height", type=int, default=256, help="test image height (multiple of 32)")
    p.add_argument("--width", type=int, default=256, help="test image width (multiple of 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LladaEdgeError as exc:
        print(f"llada-edge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"llada-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
