"""The ``stdit`` command. Each subcommand lives in its own module, imported only when it runs.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("stdit.train", "train a model from a YAML config (also: torchrun -m stdit.train)"),
    "sample": ("stdit.sample", "sample videos from a trained model"),
    "encode": ("stdit.data.encode", "encode a video folder to VAE latents + text features (safetensors shards)"),
    "convert": ("stdit.convert", "convert a Wan checkpoint (diffusers layout) to stdit, or back"),
    "push": ("stdit.hub", "push a saved model directory to the Hugging Face Hub"),
    "bench": ("stdit.bench", "run a benchmark script from benchmarks/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdit", description="Spatiotemporal Diffusion Transformers for video.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"stdit {args.command}: not available in this install ({args._module} is missing).", file=sys.stderr)
        return 2
    code = importlib.import_module(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
