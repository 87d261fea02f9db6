"""The install-on-first-use step (deepnav.slicer_dependencies) held to what the code imports.

Inside Slicer only what Slicer bundles is there before the step runs: numpy, scipy, SimpleITK, VTK
and packaging (Slicer 5.10 / 5.12: SuperBuild/External_python-numpy.cmake,
External_python-scipy.cmake, External_SimpleITK.cmake, External_python-pythonqt-requirements.cmake).
So each module's requirement list must name every other package its Lib imports (with the deepnav
code it imports), with pyproject.toml's pins, and no Lib code may be imported by a module before
its `ensure_dependencies()` has run. Read with `ast`; nothing here imports the Libs' dependencies.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package `slicer` also imports as `slicer`
    pytest.skip("needs the slicer-core wheel (pip install -e '.[dev]')", allow_module_level=True)
from deepnav import slicer_dependencies  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULES = ["MRUSFusion", "LiverLesionSeg", "FetalBiometry"]
FIRST_PARTY = {"deepnav", *(f"{m}Lib" for m in MODULES)}
BUNDLED = {"numpy", "scipy", "SimpleITK", "vtk", "packaging"}
# provided by the application or its extensions, never pip-installed by us
FROM_SLICER = {"slicer", "qt", "ctk", "PyTorchUtils"}


def _file_of(module: str) -> Path | None:
    """deepnav.x -> deepnav/x.py, XLib.y -> X/XLib/y.py (a package -> its __init__.py)."""
    parts = module.split(".")
    if parts[0] == "deepnav":
        base = REPO / "deepnav"
    elif parts[0] in FIRST_PARTY:
        base = REPO / parts[0].removesuffix("Lib") / parts[0]
    else:
        return None
    path = base.joinpath(*parts[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported_modules(nodes) -> set[str]:
    """Absolute module names imported by these statements (`from deepnav import mrml` gives both
    `deepnav` and `deepnav.mrml`)."""
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def third_party(start: set[str]) -> set[str]:
    """Top-level names of the non-first-party packages imported, anywhere in the file (also inside
    functions), by these modules and by the first-party modules they import, transitively."""
    seen, todo, found = set(), list(start), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        top = module.split(".")[0]
        if top not in FIRST_PARTY:
            if top not in sys.stdlib_module_names:
                found.add(top)
            continue
        path = _file_of(module)
        if path is None or not path.is_file():
            continue  # `from deepnav.mrml import chosen_path`: a name, not a module
        todo += _imported_modules(ast.walk(ast.parse(path.read_text())))
    return found


def lib_modules(module: str) -> set[str]:
    lib = REPO / module / f"{module}Lib"
    return {f"{module}Lib.{p.stem}" if p.stem != "__init__" else f"{module}Lib" for p in lib.glob("*.py")}


def _import_name(requirement: str) -> str:
    name = Requirement(requirement).name
    return slicer_dependencies.IMPORT_NAMES.get(name, name)


@pytest.mark.parametrize("module", MODULES)
def test_requirement_list_is_what_the_lib_imports(module):
    """Beyond what Slicer bundles: torch (from the PyTorch extension) and exactly the listed packages."""
    needed = third_party(lib_modules(module)) - BUNDLED - FROM_SLICER
    listed = {_import_name(r) for r in slicer_dependencies.REQUIREMENTS[module]}
    assert "torch" in needed
    assert needed - {"torch"} == listed


def test_requirements_carry_pyprojects_pins():
    pins = {Requirement(r).name.lower(): Requirement(r).specifier
            for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert set(slicer_dependencies.REQUIREMENTS) == set(MODULES)
    for requirements in slicer_dependencies.REQUIREMENTS.values():
        for text in requirements:
            requirement = Requirement(text)
            assert requirement.name.lower() in pins, f"{text} is not a dependency in pyproject.toml"
            assert requirement.specifier == pins[requirement.name.lower()], (text, str(pins[requirement.name.lower()]))
    torch_pin = next(iter(pins["torch"])).version  # torch==X in pyproject: what the models were made with
    assert Requirement(f"torch{slicer_dependencies.TORCH_REQUIREMENT}").specifier.contains(torch_pin)


def test_the_step_itself_needs_only_what_slicer_has():
    assert third_party({"deepnav.slicer_dependencies"}) <= BUNDLED | FROM_SLICER


def test_missing_reads_the_installed_distributions():
    assert slicer_dependencies.missing(["numpy>=2", "numpy<1", "deepnav-no-such-distribution==1"]) == [
        "numpy<1", "deepnav-no-such-distribution==1"]


def _needs_dependencies(nodes) -> list[ast.AST]:
    """The import statements among `nodes` whose code needs more than Slicer bundles."""
    out = []
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if third_party(_imported_modules([node])) - BUNDLED - FROM_SLICER:
                out.append(node)
    return out


def _calls_ensure(function: ast.FunctionDef) -> list[int]:
    return [n.lineno for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == "ensure_dependencies"]


@pytest.mark.parametrize("module", MODULES)
def test_no_lib_code_is_imported_before_the_dependency_step(module):
    """Module level: only what Slicer has. In a function: `ensure_dependencies()` first (a test
    case's setUp counts for its tests). And the step is asked for this module's list."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not _needs_dependencies(top_level), [ast.unparse(n) for n in _needs_dependencies(top_level)]
    problems = []
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        set_up = bool("setUp" in methods and _calls_ensure(methods["setUp"]))
        for function in methods.values():
            imports = _needs_dependencies(ast.walk(function))
            if not imports or set_up:
                continue
            first = min(n.lineno for n in imports)
            if not any(line < first for line in _calls_ensure(function)):
                problems.append(f"{module}.py:{first}: {cls.name}.{function.name} imports "
                                f"{ast.unparse(min(imports, key=lambda n: n.lineno))} before ensure_dependencies()")
    assert not problems, "\n".join(problems)
    step = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "ensure_dependencies"]
    assert len(step) == 1 and isinstance(step[0].args[0], ast.Constant) and step[0].args[0].value == module
