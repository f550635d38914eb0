"""The `gapfix` command.

Each subcommand lives in its own module, which exposes `configure(parser)` and
`run(args) -> int`; the module is imported only when its command runs, so
`gapfix env` never loads transformers or vLLM.
"""
import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "train": ("gapfix.train_cli", "train a causal LM with SFT, BASH or RAC on JSONL data"),
    "eval": ("gapfix.eval_cli", "accuracy and exposure-bias diagnostics of a model on JSONL data"),
    "compare": ("gapfix.compare", "SFT vs BASH vs RAC from one base: equal extra steps, 95% intervals"),
    "demo": ("gapfix.demo", "SFT, then equal-compute SFT/BASH/RAC on the bundled math task (CPU, minutes)"),
    "generate": ("gapfix.generate_cli", "generate answers for a JSONL file of prompts (vLLM or transformers), resumable"),
    "bench": ("gapfix.bench_cli", "run the benchmark suite (a source checkout's bench/) on this machine"),
    "env": ("gapfix.env", "report versions, devices and whether the native extension loaded"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="gapfix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command)
        command.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args._module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
