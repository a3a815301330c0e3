"""The ``stdit`` command. Each subcommand lives in its own module, imported only when that subcommand is chosen:
``stdit --help`` is built from :data:`COMMANDS` and imports neither torch nor diffusers.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``; it raises on a user error
(``ValueError`` and its subclasses such as ``CheckpointError``, ``OSError`` such as a missing file or a Hub
refusal, ``ImportError`` for a missing optional package) and :func:`run_command` turns that into one
``error: ...`` line and exit status 2. ``STDIT_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("stdit.train", "train a model from a YAML config (also: torchrun -m stdit.train)"),
    "sample": ("stdit.sample", "sample videos from a trained model"),
    "encode": ("stdit.data.encode", "encode a video folder to VAE latents + text features (safetensors shards)"),
    "convert": ("stdit.convert", "convert a Wan checkpoint (diffusers or original layout) to stdit, or back"),
    "push": ("stdit.hub", "push a saved model directory to the Hugging Face Hub"),
    "merge-lora": ("stdit.lora", "merge a LoRA adapter into its base model and write the full model"),
    "bench": ("stdit.bench", "run a benchmark script from benchmarks/"),
}



def format_size(n_bytes: int) -> str:
    """Bytes for a command's summary line: GB from 0.1 GB on, MB below."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``stdit`` parser. The top level (``stdit --help``) comes from :data:`COMMANDS` alone; only ``command``'s
    module is imported, for its arguments, so ``stdit --help`` imports neither torch nor diffusers."""
    parser = argparse.ArgumentParser(prog="stdit", description="Spatiotemporal Diffusion Transformers for video.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand in ``argv``: its first word, since the top level takes no options but ``-h``."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"stdit {args.command}: not available in this install ({args._module} is missing).", file=sys.stderr)
        return 2
    return run_command(importlib.import_module(args._module).run, args)


def error_line(e: BaseException) -> str:
    """An exception as one line (multi-line messages, e.g. from diffusers, are joined)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def run_command(run, args: argparse.Namespace) -> int:
    """``run(args)``; a user error becomes one ``error:`` line on stderr and exit status 2, never a traceback."""
    try:
        return int(run(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("STDIT_TRACEBACK"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
