"""Every Python file of a Slicer module is listed in its CMakeLists.txt, and every listed file exists
(Slicer's build stops on a missing listed file and silently drops an unlisted one); each module's
self-test is registered with CTest."""

import ast
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


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_module_self_test_is_registered_with_ctest(module):
    """As Slicer's scripted-module template (Utilities/Templates/Modules/Scripted/CMakeLists.txt):
    `slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)` under BUILD_TESTING. The macro
    (CMake/SlicerMacroPythonTesting.cmake) runs `slicer.testing.runUnitTest(..., "<module>")`, which
    loads every unittest.TestCase of the module file: there must be one, `<module>Test`, with a test."""
    text = (module / "CMakeLists.txt").read_text()
    block = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, re.S)
    assert block, "no if(BUILD_TESTING) block"
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", block.group(1))
    tree = ast.parse((module / f"{module.name}.py").read_text())
    tests = [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == f"{module.name}Test"
             and any(isinstance(b, ast.Name) and b.id == "ScriptedLoadableModuleTest" for b in c.bases)]
    assert tests, f"{module.name}.py has no {module.name}Test(ScriptedLoadableModuleTest)"
    assert any(isinstance(f, ast.FunctionDef) and f.name.startswith("test_") for f in tests[0].body)
