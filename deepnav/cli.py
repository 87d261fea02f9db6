"""`deepnav`: one command line for the extension's modules (`deepnav fusion ...`).

Each module's Lib contributes its subcommands through `add_commands(subparsers)`. Bad input
ends with a one-line message and exit status 2, a cancelled run with 130; no tracebacks for
things the user can fix.
"""

from __future__ import annotations

import argparse
import sys

from deepnav import __version__
from deepnav.errors import InputError
from deepnav.progress import Cancelled


def _module_path() -> None:
    """Make the modules' Lib packages importable from a source checkout (as Slicer does)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for module in ("MRUSFusion", "FetalBiometry", "LiverLesionSeg"):
        path = str(root / module)
        if (root / module).is_dir() and path not in sys.path:
            sys.path.insert(0, path)


def build_parser() -> argparse.ArgumentParser:
    _module_path()
    from FetalBiometryLib import cli as fetal_cli
    from LiverLesionSegLib import cli as liver_cli

    from MRUSFusionLib import cli as fusion_cli

    parser = argparse.ArgumentParser(prog="deepnav", description="DeepNav: image-guided intervention tools.")
    parser.add_argument("--version", action="version", version=f"deepnav {__version__}")
    modules = parser.add_subparsers(dest="module", required=True)
    fusion_cli.add_commands(modules.add_parser("fusion", help="MR / 3D-ultrasound fusion (MRUSFusion)"))
    fetal_cli.add_commands(modules.add_parser("fetal", help="fetal head biometry from 2D ultrasound (FetalBiometry)"))
    liver_cli.add_commands(modules.add_parser("liver", help="multi-phase CT liver lesion segmentation (LiverLesionSeg)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"deepnav: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("deepnav: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("deepnav: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
