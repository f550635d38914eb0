"""The `gapfix` command.

Each subcommand lives in its own module, which exposes `configure(parser)` and
`run(args) -> int`. Building the parser imports every command module, so those
modules keep transformers, vLLM, Triton and datasets out of their top level and
load them inside `run` (tests/test_cli.py checks it): `gapfix env` or
`gapfix --help` never loads them (torch, yes: the flags come from TrainConfig).

A problem with the command line, a data file, a model folder or the disk (ValueError,
OSError, a missing optional package) is printed as one line naming it, with exit
status 2; a traceback is printed for anything else (a bug), and for everything with
--debug (or GAPFIX_DEBUG=1).
"""
import argparse
import importlib
import os
import sys

# command -> (module, one-line help)
COMMANDS = {
    "train": ("gapfix.train_cli", "train a causal LM with SFT, BASH or RAC on JSONL data"),
    "eval": ("gapfix.eval_cli", "accuracy and exposure-bias diagnostics of a model on JSONL data"),
    "compare": ("gapfix.compare", "SFT vs BASH vs RAC from one base: equal extra steps, 95% intervals"),
    "demo": ("gapfix.demo", "SFT, then equal-compute SFT/BASH/RAC on the bundled math task (CPU, minutes)"),
    "generate": ("gapfix.generate_cli",
                 "generate answers for a JSONL file of prompts (vLLM or transformers), resumable"),
    "bench": ("gapfix.bench_cli", "run the benchmark suite (a source checkout's bench/) on this machine"),
    "env": ("gapfix.env", "report versions, devices and whether the native extension loaded"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gapfix", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        # argparse %-formats help strings (for %(default)s): a literal % is written %%
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print tracebacks for every error")
        module.configure(command)
        command.set_defaults(_module=module)
    return parser


# commands whose --out is a folder: claimed for the command's duration (gapfix.outdir.claim)
OUT_FOLDER_COMMANDS = ("train", "eval", "compare", "demo")

# what a user can fix (arguments, files, disk, installation): one line, not a traceback
USER_ERRORS = (ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("GAPFIX_DEBUG", "") not in ("", "0")
    try:
        if args.command in OUT_FOLDER_COMMANDS and isinstance(getattr(args, "out", None), str):
            from gapfix.outdir import claim

            with claim(args.out):
                return args._module.run(args) or 0
        return args._module.run(args) or 0
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"gapfix {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"gapfix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
