"""What every `deepnav` command shares, in one place: help that says each option's default and
choices, an example per command, `--quiet`, and `--json -` for standard output.

Light on purpose (standard library only): the command lines import it when they start.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import textwrap
from pathlib import Path

from deepnav.outputs import require_writable_folder
from deepnav.progress import console

STDOUT = "-"  # `--json -`: the JSON goes to standard output, and nothing else goes there


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it (in words:
    "default: the shipped model") or there is none to say (a flag, a required option); choices
    hidden behind a metavar are listed. Descriptions and epilogs are wrapped paragraph by
    paragraph, except indented lines (examples), kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.choices is not None and action.metavar is not None:
            text += f" (one of: {', '.join(map(str, action.choices))})"
        default = action.default
        if getattr(action, "config_default", None):  # `config_option`: the value is the configuration's
            default = config_value(*action.config_default)
        says_default = re.search(r"\bdefault\b", text, re.IGNORECASE)
        if (not says_default and action.option_strings and action.nargs != 0 and not action.required
                and default not in (None, argparse.SUPPRESS)):
            shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
            text += f" (default: {shown.replace('%', '%%')})"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if all(line.startswith(" ") for line in lines[1:]) and lines[0].rstrip().endswith(":"):
                paragraphs.append("\n".join(indent + line for line in lines))  # a heading and its examples
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


class Parser(argparse.ArgumentParser):
    """deepnav's parser: its subcommands' parsers are of this class too (argparse's
    add_subparsers makes them of the parent's class), so every command gets the formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def config_value(config: str, field: str):
    """The default of `field` in the dataclass `config` ("package.module:Class")."""
    import importlib

    module, _, name = config.partition(":")
    return getattr(getattr(importlib.import_module(module), name), field)


def config_option(parser: argparse.ArgumentParser, flag: str, config: str, field: str | None = None, **kwargs):
    """An option that overrides a field of a configuration dataclass ("module:Class"): its value is
    None unless given, so that the configuration decides (and a resumed run keeps its own); its
    help shows the configuration's default, read only when help is printed (the training modules
    import torch, seconds that `deepnav --help` must not cost)."""
    action = parser.add_argument(flag, **kwargs)
    action.config_default = (config, field or action.dest)
    return action


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where torch computes: auto (a GPU when there is one, else the CPU), cpu, cuda, "
                             "cuda:N (gpu means cuda)")
    # the names are deepnav.torch_runtime.PRECISIONS (not imported: torch's import costs seconds)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the networks' arithmetic: fp32, or bf16 automatic mixed precision (meant for GPUs "
                             "with bf16 tensor cores; on the CPU measured it was no faster: see the README); "
                             "geometry stays fp32")


def examples(*lines: str, before: str = "") -> str:
    """An epilog: `before` (e.g. the exit statuses), then "examples:" and the command lines."""
    block = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return f"{before}\n\n{block}" if before else block


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command under `parser`: those that run something (no subcommands)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from commands(sub, path + (name,))


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """What every command takes (deepnav.cli adds it to each): --quiet, and around its `run`, the
    console told about it, stdout kept for the JSON with `--json -`, the progress bar ended."""
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print warnings and errors only (no progress, no summary)")
    run = parser.get_default("run")
    if run is not None:
        parser.set_defaults(run=functools.partial(_run_command, run))


def _run_command(run, args: argparse.Namespace):
    quiet, console.quiet = console.quiet, args.quiet
    try:
        with stdout_for_data(str(getattr(args, "json", "")) == STDOUT):
            return run(args)
    finally:
        console.close()
        console.quiet = quiet  # a command run in-process (tests, a notebook) leaves the console as it was


def add_json_option(parser: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """`--json FILE`, or `--json -` for standard output (then nothing else is printed there)."""
    parser.add_argument("--json", type=Path, required=required, metavar="FILE",
                        help=f"{what}; '-' writes it to standard output (and nothing else goes there)")


def require_json_target(path: Path | None) -> None:
    """Check before any work that the --json file can be written (standard output always can)."""
    if path is not None and str(path) != STDOUT:
        require_writable_folder(path.parent, "folder of --json")


_data_stdout = None  # the real standard output while `stdout_for_data` holds it


@contextlib.contextmanager
def stdout_for_data(reserve: bool):
    """While a command runs with `--json -`, everything printed to stdout goes to stderr; only
    `write_json` writes to the real stdout. A no-op unless `reserve`."""
    global _data_stdout
    if not reserve:
        yield
        return
    _data_stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _data_stdout = None


def write_json(data, path: Path) -> None:
    """`data` as indented JSON to `path`, atomically, or to standard output for "-"."""
    text = json.dumps(data, indent=2, default=float)
    if str(path) == STDOUT:
        stream = _data_stdout or sys.stdout
        stream.write(text + "\n")
        stream.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".partial-" + path.name)
    tmp.write_text(text)
    tmp.replace(path)


def wrote(path: Path, what: str = "wrote") -> None:
    """Say where a file went (unless it went to standard output, or --quiet)."""
    if str(path) != STDOUT:
        console.say(f"{what} {path}")
