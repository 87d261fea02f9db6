"""`deepnav`: one command line for the extension's modules (`deepnav fusion ...`).

Each module's Lib contributes its subcommands (`command_modules`: COMMAND, HELP and
`add_commands(parser)` in its `cli`), found at run time; the core imports no module. Bad input
ends with a one-line message and exit status 2, a cancelled run with 130; no tracebacks for
things the user can fix.
"""

from __future__ import annotations

import argparse
import os
import sys

from deepnav import __version__
from deepnav.command_line import Parser, add_common_options, commands, examples
from deepnav.errors import InputError, PeerLost
from deepnav.progress import Cancelled

ENTRY_POINT_GROUP = "deepnav.commands"


def command_modules() -> list:
    """The modules that contribute a subcommand: each has COMMAND (its name), HELP and
    add_commands(parser). The shared core names none of them. They are found through the
    "deepnav.commands" entry points (a pip-installed DeepNav, pyproject.toml) and, where DeepNav is
    not installed (inside Slicer, which puts each scripted module's folder on sys.path), as the
    `cli` of any importable package whose name ends in "Lib". Sorted by command."""
    import importlib
    import importlib.metadata
    import pkgutil

    found = {}

    def add(module) -> None:
        if hasattr(module, "COMMAND") and hasattr(module, "add_commands"):
            found.setdefault(module.COMMAND, module)

    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        add(entry.load())
    if not found:  # not installed: Slicer's layout, each module's folder on sys.path
        for package in pkgutil.iter_modules():
            if package.ispkg and package.name.endswith("Lib"):
                try:
                    add(importlib.import_module(f"{package.name}.cli"))
                except ModuleNotFoundError as exc:  # a Lib without a command line
                    if exc.name != f"{package.name}.cli":
                        raise
    return [found[name] for name in sorted(found)]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="deepnav", description="DeepNav: image-guided intervention tools.",
                    epilog=examples("deepnav fusion register --help", "deepnav liver segment --help",
                                    "deepnav fetal measure --help"))
    parser.add_argument("--version", action="version", version=f"deepnav {__version__}")
    modules = parser.add_subparsers(dest="module", required=True)
    for module in command_modules():
        module.add_commands(modules.add_parser(module.COMMAND, help=module.HELP, description=module.HELP))
    for _, command in commands(parser):  # what every command takes, spelt once (deepnav.command_line)
        add_common_options(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # every command's --device, checked before any work; 'auto' and 'cpu' cannot fail, and
        # checking them would import torch (seconds) before the command has said what it does
        if (getattr(args, "device", None) or "auto").strip().lower() not in ("auto", "cpu"):
            from deepnav.torch_runtime import pick_device

            pick_device(args.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of several processes started by torchrun
            if not getattr(args, "distributed", False):
                raise InputError(f"`deepnav {args.module} {getattr(args, 'command', '')}` runs as one process: "
                                 "start it without torchrun (under torchrun: the train commands, fetal measure, "
                                 "liver segment --studies)")
            from deepnav import distributed

            with distributed.session(getattr(args, "device", None) or "auto") as world:
                if not world.is_main:  # rank 0 reports; the others say only warnings and errors (--quiet)
                    args.quiet = True
                return int(args.run(args) or 0)
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"deepnav: error: {exc}", file=sys.stderr)
        return 2
    except PeerLost as exc:
        print(f"deepnav: error: {exc}", file=sys.stderr)
        return 1
    except Cancelled:
        print("deepnav: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("deepnav: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
