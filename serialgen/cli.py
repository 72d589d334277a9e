"""`serialgen` command line: one entry point that dispatches to the four parts.

Each part registers its own commands (``register(sub, groups)`` in ``<part>/cli*.py``) so the parts
stay separate; heavy imports (bpy, torch, ray) happen inside the command handlers, never here, so
``serialgen --help`` is instant. A handler returns an exit code; a ``SerialgenError`` becomes one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from serialgen import __version__
from serialgen.errors import SerialgenError

__all__ = ["build_parser", "main"]

# (module, attribute) of every part's registration function, in help order.
_REGISTRARS = [
    ("serialgen.render.cli_assets", "register"),
    ("serialgen.assets_manifest.cli", "register"),
    ("serialgen.render.cli", "register"),
    ("serialgen.dataset.cli_shards", "register"),
    ("serialgen.dataset.cli", "register"),
    ("serialgen.dataset.cli_estimate", "register"),
    ("serialgen.dataset.report.cli", "register"),
    ("serialgen.training.stage1.cli", "register"),
    ("serialgen.training.stage2.cli_pairs", "register"),
    ("serialgen.training.stage2.cli", "register"),
]

# Command groups shared by several parts: `serialgen <group> <command>`.
_GROUPS = {
    "assets": "build and inspect input manifests (characters, motions, poses, backgrounds)",
    "shards": "check and look at rendered shard sets",
    "data": "the training loader: preview and benchmark",
    "pairs": "Stage II pair sets: build them from real pictures, or the paper's one-stage baseline pairs",
    "train": "train the Stage I / Stage II models",
    "eval": "the paper's metrics",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where to look), exit 2.

    Stock argparse prints the whole usage block first, 16 lines for ``serialgen render``, which buries
    the one line that matters. Subparsers inherit the class, so every command behaves the same.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="serialgen",
        description="SerialGen toolkit: characters -> rendered pairs -> shards -> training.",
    )
    parser.add_argument("--version", action="version", version=f"serialgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for name, help_text in _GROUPS.items():
        group_parser = sub.add_parser(name, help=help_text, description=help_text)
        groups[name] = group_parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
        group_parser.set_defaults(_group_parser=group_parser)
    for module_name, attr in _REGISTRARS:
        # A missing module is a broken install: let the ImportError say so, never drop a command.
        getattr(importlib.import_module(module_name), attr)(sub, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except SerialgenError as exc:
        print(f"serialgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("serialgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
