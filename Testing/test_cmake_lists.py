"""Every Python file of a Slicer module is listed in its CMakeLists.txt, and every listed file exists
(Slicer's build stops on a missing listed file and silently drops an unlisted one)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = [p.parent for p in ROOT.glob("*/CMakeLists.txt") if (p.parent / f"{p.parent.name}Lib").is_dir()]


def _listed(cmake: Path) -> set[str]:
    text = cmake.read_text()
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    assert block, f"{cmake} has no MODULE_PYTHON_SCRIPTS"
    names = set()
    for token in block.group(1).split():
        token = token.replace("${MODULE_NAME}", cmake.parent.name)
        if token.endswith(".py"):
            names.add(token)
    return names


def test_there_are_modules_to_check():
    assert any(m.name == "MRUSFusion" for m in MODULES)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_module_python_scripts_match_the_files(module):
    listed = _listed(module / "CMakeLists.txt")
    present = {str(p.relative_to(module)) for p in module.rglob("*.py")}
    assert present - listed == set(), "files missing from MODULE_PYTHON_SCRIPTS"
    assert listed - present == set(), "listed files that do not exist"


def test_shared_package_is_listed_for_the_extension():
    """`deepnav/` is installed by the top-level CMakeLists.txt; an unlisted file would be missing in Slicer."""
    block = re.search(r"set\(DEEPNAV_PYTHON_SCRIPTS(.*?)\)", (ROOT / "CMakeLists.txt").read_text(), re.S)
    assert block, "the top-level CMakeLists.txt does not install the deepnav package"
    listed = {t for t in block.group(1).split() if t.endswith(".py")}
    present = {str(p.relative_to(ROOT)) for p in (ROOT / "deepnav").glob("*.py")}
    assert listed == present
