"""Each Slicer module held against Slicer's own rules, without a Slicer application.

A module's panel loads only if `parameterNodeWrapper` can connect every widget of its `.ui` that
carries a `SlicerParameterName` (`connectGui` raises on the first one no connector accepts, and
the panel stays empty) and if every `slicer.NAME` the module touches exists. The modules cannot be
imported here (they import qt, ctk and Slicer's application-only Python modules), so they are read
with `ast`; what they use is looked up in the real `slicer-core` wheel (Slicer's MRML classes and
Slicer's own `slicer/util.py`) and in VTK.

The connector rules below are facts read from Slicer's source (github.com/Slicer/Slicer; the
files cited are the same on the 5.10 branch, 66f3d12, the 5.12 branch, 9034c71, and main in
August 2026). This file copies no code from Slicer: it states, per widget class, which Python
types Slicer's connector accepts and what it does with them. `slicer.util` here is the one
slicer-core 5.12.4 ships, Slicer's own Base/Python/slicer/util.py.

What this cannot see: Qt/CTK widget behaviour, the application-only names beyond their listing,
the running SlicerOpenIGTLink and PyTorch extensions. Those need a Slicer application (the
modules' ScriptedLoadableModuleTest classes).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import pathlib
import types
import typing
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package `slicer` also imports as `slicer`
    pytest.skip("needs the slicer-core wheel (pip install -e '.[dev]')", allow_module_level=True)
import slicer.util  # noqa: E402  Slicer's own Base/Python/slicer/util.py, as slicer-core ships it
import slicer_core  # noqa: E402  the wrapped MRML / logic classes that Slicer puts into `slicer`
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULES = ["MRUSFusion", "LiverLesionSeg", "FetalBiometry"]
# shared files that the modules' Slicer side runs (they `import slicer`)
SHARED_SLICER_FILES = ["deepnav/mrml.py", "deepnav/slicer_dependencies.py"]

GUI_CONNECTORS = "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py"
MARKUPS_CONNECTORS = "Modules/Loadable/Markups/MarkupsLib/parameterNodeWrapper/guiConnectors.py"
SERIALIZERS = "Base/Python/slicer/parameterNodeWrapper/serializers.py"
VALIDATORS = "Base/Python/slicer/parameterNodeWrapper/validators.py"


# -- Slicer's validators, as annotations (Base/Python/slicer/parameterNodeWrapper/validators.py) ---------
# Stand-ins with the same names and constructor arguments, so that a module's annotations can be
# evaluated without Slicer's Qt-dependent package; `check` says what Slicer's `validate` rejects.
@dataclasses.dataclass(frozen=True)
class WithinRange:
    minimum: float
    maximum: float

    def check(self, value) -> bool:
        return self.minimum <= value <= self.maximum


@dataclasses.dataclass(frozen=True)
class Minimum:
    minimum: float

    def check(self, value) -> bool:
        return value >= self.minimum


@dataclasses.dataclass(frozen=True)
class Maximum:
    maximum: float

    def check(self, value) -> bool:
        return value <= self.maximum


@dataclasses.dataclass(frozen=True)
class Choice:
    choices: tuple

    def __init__(self, choices):
        object.__setattr__(self, "choices", tuple(choices))

    def check(self, value) -> bool:
        return value in self.choices


@dataclasses.dataclass(frozen=True)
class Decimals:  # guiConnectors.py: sets the widget's decimals
    value: int


@dataclasses.dataclass(frozen=True)
class SingleStep:  # guiConnectors.py: sets the widget's single step
    value: float


# What `from slicer.<module> import NAME` may import. These Python modules of Slicer need qt/ctk or
# the application, so slicer-core does not ship them: each name is listed with its source file.
APPLICATION_ONLY_MODULES: dict[str, tuple[set[str], str]] = {
    "slicer.parameterNodeWrapper": (
        {"parameterNodeWrapper", "WithinRange", "Minimum", "Maximum", "Choice", "Decimals", "SingleStep"},
        "Base/Python/slicer/parameterNodeWrapper/__init__.py (wrapper.py, validators.py, guiConnectors.py); "
        "imports qt"),
    "slicer.ScriptedLoadableModule": (
        {"ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
         "ScriptedLoadableModuleTest"},
        "Base/Python/slicer/ScriptedLoadableModule.py; imports qt, ctk and the application"),
    "slicer.i18n": ({"tr", "translate"}, "Base/Python/slicer/i18n.py; uses slicer.app's translator"),
}
STAND_INS = {"WithinRange": WithinRange, "Minimum": Minimum, "Maximum": Maximum, "Choice": Choice,
             "Decimals": Decimals, "SingleStep": SingleStep}

# `slicer.NAME` that only the running application sets (none is in slicer-core), each with its
# reason, and for the checkable ones the class whose attributes `slicer.NAME.attr` must exist on.
APPLICATION_ONLY_NAMES: dict[str, tuple[str, type | None]] = {
    "app": ("the qSlicerApplication singleton, set in the embedded Python only "
            "(Base/Python/slicer/__init__.py docstring)", None),
    "mrmlScene": ("the application's scene, set in the embedded Python only (Base/Python/slicer/__init__.py); "
                  "a vtkMRMLScene", slicer_core.vtkMRMLScene),
    "modules": ("slicer.modules.<name>: the loaded modules, created by Base/Python/slicer/__init__.py and "
                "filled by the application", None),
}
# Slicer's Python modules reachable as `slicer.<name>` (imported by the application at startup).
SLICER_SUBMODULES = {"util": slicer.util}


# -- Slicer's GUI connectors (guiConnectors.py): widget class -> accepted types -> connector --------------
PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath)


def _is_node(datatype) -> bool:
    """Slicer's isNodeOrUnionOfNodes (parameterNodeWrapper/util.py): a vtkMRMLNode subclass, or a
    Union of them (with None)."""
    if isinstance(datatype, type):
        return issubclass(datatype, slicer_core.vtkMRMLNode)
    if typing.get_origin(datatype) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(datatype) if a is not type(None)]
        return bool(args) and all(isinstance(a, type) and issubclass(a, slicer_core.vtkMRMLNode) for a in args)
    return False


@dataclasses.dataclass(frozen=True)
class Connector:
    name: str  # Slicer's class name
    widgets: tuple[str, ...]  # canRepresent: `type(widget)` is exactly one of these (no subclasses)
    accepts: Callable[[object], bool]  # canRepresent: on the type without its Annotated extras
    source: str
    needs_choice: bool = False  # create() raises without a Choice annotation
    sets_range: bool = False  # __init__ sets min/max from the annotation, or to the type's limits
    must_be_bounded: tuple[str, ...] = ()  # __init__ raises for these widgets without both bounds


# In Slicer's registration order: createGuiConnector takes the first whose canRepresent is true.
CONNECTORS = [
    Connector("QCheckBoxToBoolConnector", ("QCheckBox", "ctkCheckBox"), lambda t: t is bool, GUI_CONNECTORS),
    Connector("QCheckablePushButtonToBoolConnector", ("QPushButton",), lambda t: t is bool, GUI_CONNECTORS),
    Connector("ctkCheckablePushButtonToBoolConnector", ("ctkCheckablePushButton",), lambda t: t is bool,
              GUI_CONNECTORS),
    Connector("QSliderOrSpinBoxToIntConnector", ("QSlider", "QSpinBox"), lambda t: t is int, GUI_CONNECTORS,
              sets_range=True, must_be_bounded=("QSlider",)),
    Connector("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
              ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
               "qMRMLSpinBox"), lambda t: t in (float, int), GUI_CONNECTORS,
              sets_range=True, must_be_bounded=("ctkSliderWidget", "qMRMLSliderWidget")),
    Connector("QComboBoxToStringableConnector", ("QComboBox", "ctkComboBox"), lambda t: t in (int, float, str, bool),
              GUI_CONNECTORS, needs_choice=True),
    Connector("QComboBoxToEnumConnector", ("QComboBox", "ctkComboBox"),
              lambda t: isinstance(t, type) and issubclass(t, enum.Enum), GUI_CONNECTORS),
    Connector("QLineEditToStrConnector", ("QLineEdit",), lambda t: t is str, GUI_CONNECTORS),
    Connector("QLabelToStrConnector", ("QLabel",), lambda t: t is str, GUI_CONNECTORS),
    Connector("QTextEditPlainTextToStrConnector", ("QTextEdit",), lambda t: t is str, GUI_CONNECTORS),
    Connector("ctkRangeWidgetToRangeConnector", ("ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"),
              lambda t: getattr(t, "__name__", None) == "FloatRange", GUI_CONNECTORS),  # parameterNodeWrapper.FloatRange
    Connector("ctkPathLineEditToPathConnector", ("ctkPathLineEdit",), lambda t: t in PATH_TYPES, GUI_CONNECTORS),
    Connector("ctkDirectoryButtonToPathConnector", ("ctkDirectoryButton",), lambda t: t in PATH_TYPES, GUI_CONNECTORS),
    Connector("qMRMLNodeComboBoxToNodeConnector", ("qMRMLNodeComboBox",), _is_node, GUI_CONNECTORS),
    Connector("ctkColorPickerButtonToQColorConnector", ("ctkColorPickerButton",),
              lambda t: getattr(t, "__name__", None) == "QColor", GUI_CONNECTORS),
    Connector("qSlicerSimpleMarkupsWidgetToNodeConnector", ("qSlicerSimpleMarkupsWidget",), _is_node,
              MARKUPS_CONNECTORS),
]

# Types a serializer exists for (serializers.py: NumberSerializer int/float, StringSerializer,
# PathSerializer, BoolSerializer, NodeSerializer); containers and unions are not used here.
SERIALIZABLE = {int, float, str, bool, *PATH_TYPES}

# Ranges a widget has when its .ui sets none: Qt's documented defaults (Qt 5 reference, the
# `minimum` and `maximum` properties of QSpinBox and QAbstractSlider: 0 and 99; QDoubleSpinBox:
# 0.0 and 99.99).
QT_DEFAULT_RANGE = {"QSpinBox": (0, 99), "QSlider": (0, 99), "QDoubleSpinBox": (0.0, 99.99)}


# -- reading a module -------------------------------------------------------------------------------
@dataclasses.dataclass
class Parameter:
    name: str
    type: object  # the Python type without its Annotated extras
    annotations: tuple
    default: object  # NO_DEFAULT when none is written
    line: int


NO_DEFAULT = object()


def module_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _namespace(tree: ast.Module) -> dict:
    """What a module's annotations can name: its imports (Slicer's application-only modules as
    stand-ins, `slicer` as the slicer-core wheel) and its literal module constants."""
    ns: dict = {"slicer": slicer_core}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in APPLICATION_ONLY_MODULES:
            for alias in node.names:
                if alias.name in STAND_INS:
                    ns[alias.asname or alias.name] = STAND_INS[alias.name]
        elif isinstance(node, ast.ImportFrom) and node.module in ("typing", "pathlib"):
            module = __import__(node.module)
            for alias in node.names:
                ns[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("typing", "pathlib", "enum"):
                    ns[alias.asname or alias.name] = __import__(alias.name)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ns[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return ns


def parameter_node_class(tree: ast.Module) -> ast.ClassDef:
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(classes) == 1, "one @parameterNodeWrapper class per module"
    return classes[0]


def parameters(tree: ast.Module) -> dict[str, Parameter]:
    ns = _namespace(tree)
    out = {}
    for node in parameter_node_class(tree).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        try:
            annotation = eval(compile(ast.Expression(node.annotation), "<annotation>", "eval"), ns)  # noqa: S307
        except Exception as exc:  # e.g. slicer.vtkMRMLNoSuchNode
            raise AssertionError(f"line {node.lineno}: annotation {ast.unparse(node.annotation)}: {exc!r}") from None
        if typing.get_origin(annotation) is typing.Annotated:
            datatype, *extras = typing.get_args(annotation)
        else:
            datatype, extras = annotation, []
        default = NO_DEFAULT if node.value is None else eval(  # noqa: S307
            compile(ast.Expression(node.value), "<default>", "eval"), ns)
        out[node.target.id] = Parameter(node.target.id, datatype, tuple(extras), default, node.lineno)
    return out


def _value(element: ET.Element):
    child = element[0]
    text = (child.text or "").strip()
    return {"number": int, "double": float, "bool": lambda s: s == "true"}.get(child.tag, str)(text)


def bound_widgets(ui: Path) -> list[tuple[str, str, dict]]:
    """(class, object name, properties) of each widget carrying a SlicerParameterName."""
    out = []
    for widget in ET.parse(ui).getroot().iter("widget"):
        props = {p.get("name"): _value(p) for p in widget.findall("property") if len(p)}
        if "SlicerParameterName" in props:
            out.append((widget.get("class"), widget.get("name"), props))
    return out


def _first(extras, kind):
    return next((e for e in extras if isinstance(e, kind)), None)


def annotated_range(extras) -> tuple[float | None, float | None]:
    within = _first(extras, WithinRange)
    if within is not None:
        return within.minimum, within.maximum
    low, high = _first(extras, Minimum), _first(extras, Maximum)
    return (low.minimum if low else None), (high.maximum if high else None)


def gui_problems(module: str) -> list[str]:
    """Everything Slicer's connectGui would reject (or silently change) in this module's panel."""
    tree = module_tree(REPO / module / f"{module}.py")
    params = parameters(tree)
    problems = []
    for p in params.values():
        if not (p.type in SERIALIZABLE or _is_node(p.type)):
            problems.append(f"{module}.{p.name}: no Slicer serializer for {p.type!r} ({SERIALIZERS})")
        if p.default is not NO_DEFAULT:
            for validator in p.annotations:
                if hasattr(validator, "check") and not validator.check(p.default):
                    problems.append(f"{module}.{p.name}: default {p.default!r} fails {validator} ({VALIDATORS})")
    for cls, name, props in bound_widgets(REPO / module / "Resources" / "UI" / f"{module}.ui"):
        pname = props["SlicerParameterName"]
        where = f"{module}.ui {cls} {name} -> {pname}"
        if pname not in params:
            problems.append(f"{where}: the parameter node has no parameter {pname!r}")
            continue
        p = params[pname]
        connector = next((c for c in CONNECTORS if cls in c.widgets and c.accepts(p.type)), None)
        if connector is None:
            takes = [c.name for c in CONNECTORS if cls in c.widgets]
            problems.append(f"{where}: no Slicer connector accepts {getattr(p.type, '__name__', p.type)} for a {cls} "
                            f"(connectGui raises; candidates {takes} in {GUI_CONNECTORS})")
            continue
        if connector.needs_choice and _first(p.annotations, Choice) is None:
            problems.append(f"{where}: {connector.name} needs a Choice annotation")
        if connector.sets_range:
            low, high = annotated_range(p.annotations)
            if cls in connector.must_be_bounded and (low is None or high is None):
                problems.append(f"{where}: {connector.name} raises for an unbounded {cls}")
            ui_low = props.get("minimum", QT_DEFAULT_RANGE.get(cls, (None, None))[0])
            ui_high = props.get("maximum", QT_DEFAULT_RANGE.get(cls, (None, None))[1])
            if (low, high) != (ui_low, ui_high):
                problems.append(f"{where}: the .ui's range is [{ui_low}, {ui_high}] but the annotation's is [{low}, {high}] "
                                f"({connector.name} sets the widget to the annotation's, or to the type's limits)")
    problems += truthy_path_problems(tree, {n for n, p in params.items() if p.type in PATH_TYPES}, module)
    return problems


def truthy_path_problems(tree: ast.Module, path_parameters: set[str], module: str) -> list[str]:
    """A Path parameter is never empty: Slicer's default is `Path()` and an empty ctkPathLineEdit
    reads back as `Path("")`, both `Path(".")`, which is truthy; `p.modelPath or None` never gives
    None. Such a parameter must go through `deepnav.mrml.chosen_path`."""
    problems = []
    for node in ast.walk(tree):
        operands = []
        if isinstance(node, ast.BoolOp):
            operands = node.values
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            operands = [node.operand]
        elif isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            operands = [node.test]
        for operand in operands:
            if isinstance(operand, ast.Attribute) and operand.attr in path_parameters:
                problems.append(f"{module}.py:{operand.lineno}: {ast.unparse(operand)} is a Path, always true "
                                "(Path() == Path('.')): use deepnav.mrml.chosen_path")
    return problems


@pytest.mark.parametrize("module", MODULES)
def test_every_bound_widget_has_a_slicer_connector_for_its_parameter(module):
    problems = gui_problems(module)
    assert not problems, "\n".join(problems)


# -- slicer.NAME, vtk.NAME and slicer.util calls ---------------------------------------------------------
def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _dotted_uses(tree: ast.Module, root: str) -> list[tuple[list[str], int]]:
    """The longest dotted names starting at `root` (`slicer.util.getNode`, not also `slicer.util`)."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _chain(node)
            if chain and chain[0] == root:
                uses.append((chain, node.lineno))
    return uses


def slicer_files() -> list[Path]:
    return [REPO / m / f"{m}.py" for m in MODULES] + [REPO / f for f in SHARED_SLICER_FILES]


def name_problems(tree: ast.Module, rel: str) -> list[str]:
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer."):
            for alias in node.names:
                if node.module in APPLICATION_ONLY_MODULES:
                    ok = alias.name in APPLICATION_ONLY_MODULES[node.module][0]
                elif node.module == "slicer.util":
                    ok = hasattr(slicer.util, alias.name)
                else:
                    ok = False
                if not ok:
                    problems.append(f"{rel}:{node.lineno}: from {node.module} import {alias.name}: not in Slicer")
    for chain, line in _dotted_uses(tree, "slicer"):
        first, rest = chain[1], chain[2:]
        if first in APPLICATION_ONLY_NAMES:
            owner = APPLICATION_ONLY_NAMES[first][1]
        elif first in SLICER_SUBMODULES:
            owner = SLICER_SUBMODULES[first]
        elif f"slicer.{first}" in APPLICATION_ONLY_MODULES:
            owner = None
        elif hasattr(slicer_core, first) and not first.startswith("_"):
            owner = getattr(slicer_core, first)
        else:
            problems.append(f"{rel}:{line}: slicer.{first} does not exist (not in slicer-core's classes, "
                            "not an application-only name)")
            continue
        if owner is not None and rest and not hasattr(owner, rest[0]):
            problems.append(f"{rel}:{line}: {'.'.join(chain[:3])}: {getattr(owner, '__name__', owner)} has no {rest[0]}")
    for chain, line in _dotted_uses(tree, "vtk"):
        owner = vtk
        for part in chain[1:3]:  # vtk.vtkClass and its attribute (event ids, methods)
            if not hasattr(owner, part):
                problems.append(f"{rel}:{line}: {'.'.join(chain)}: {part} is not in VTK")
                break
            owner = getattr(owner, part)
    return problems


@pytest.mark.parametrize("path", slicer_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_slicer_name_exists(path):
    problems = name_problems(module_tree(path), str(path.relative_to(REPO)))
    assert not problems, "\n".join(problems)


def util_call_problems(tree: ast.Module, rel: str) -> list[str]:
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        chain = _chain(node.func)
        if not (chain and len(chain) == 3 and chain[:2] == ["slicer", "util"]):
            continue
        function = getattr(slicer.util, chain[2], None)
        if function is None:
            problems.append(f"{rel}:{node.lineno}: slicer.util.{chain[2]} does not exist")
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue  # *args / **kwargs: the count is not known statically
        args = [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords}
        try:
            inspect.signature(function).bind(*args, **kwargs)
        except TypeError as exc:
            problems.append(f"{rel}:{node.lineno}: slicer.util.{chain[2]}{inspect.signature(function)}: {exc}")
    return problems


@pytest.mark.parametrize("path", slicer_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_slicer_util_call_binds_to_slicers_signature(path):
    problems = util_call_problems(module_tree(path), str(path.relative_to(REPO)))
    assert not problems, "\n".join(problems)


# -- SlicerOpenIGTLink's connector node (an extension: not in slicer-core) ----------------------------------
# Public members of vtkMRMLIGTLConnectorNode that MRUSFusion may call, read from the extension's
# OpenIGTLinkIF/MRML/vtkMRMLIGTLConnectorNode.h (github.com/openigtlink/SlicerOpenIGTLink, d090ca4):
# its events and states enums and the methods used; the rest comes from vtkMRMLNode (slicer-core).
IGTL_CONNECTOR_MEMBERS = {
    "ConnectedEvent", "DisconnectedEvent", "ActivatedEvent", "DeactivatedEvent", "NewDeviceEvent",
    "DeviceModifiedEvent", "RemovedDeviceEvent", "StateOff", "StateWaitConnection", "StateConnected",
    "SetTypeServer", "SetTypeClient", "Start", "Stop", "GetState", "GetNumberOfIncomingMRMLNodes",
    "GetIncomingMRMLNode",
}


def test_the_openigtlink_connector_is_used_through_its_real_members():
    """Every `connector.X` in MRUSFusion.py is a member of the extension's connector node or of
    vtkMRMLNode (the module names the node `connector` wherever it holds one)."""
    tree = module_tree(REPO / "MRUSFusion" / "MRUSFusion.py")
    used = {(n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "connector"}
    assert used, "MRUSFusion.py no longer drives an OpenIGTLink connector: update this test"
    unknown = [f"MRUSFusion.py:{line}: connector.{name}" for name, line in sorted(used)
               if name not in IGTL_CONNECTOR_MEMBERS and not hasattr(slicer_core.vtkMRMLNode, name)]
    assert not unknown, "\n".join(unknown)


# -- the checker itself catches what it is for ---------------------------------------------------------
def test_the_rules_reject_what_slicer_rejects():
    """A str behind a ctkPathLineEdit, an int spin box without its range, a combo box without
    Choice, slicer.vtkCommand: each is reported."""
    path_connector = next(c for c in CONNECTORS if "ctkPathLineEdit" in c.widgets)
    assert not path_connector.accepts(str) and path_connector.accepts(Path)
    assert not any("QSpinBox" in c.widgets and c.accepts(float) for c in CONNECTORS)
    assert annotated_range(()) == (None, None)
    assert annotated_range((Minimum(1), Maximum(9))) == (1, 9)
    tree = ast.parse("import slicer\nimport vtk\nslicer.vtkCommand.ModifiedEvent\nvtk.vtkCommand.ModifiedEvent\n"
                     "slicer.util.getNode('a', 0, None, 1)\nslicer.mrmlScene.NoSuchMethod\n")
    names, calls = name_problems(tree, "probe"), util_call_problems(tree, "probe")
    assert len(names) == 2 and "slicer.vtkCommand" in names[0] and "NoSuchMethod" in names[1], names
    assert len(calls) == 1 and "getNode" in calls[0], calls
    truthy = truthy_path_problems(ast.parse("x = p.modelPath or None\nif not p.trainingFolder:\n    pass\n"
                                            "y = p.device or 'cpu'\n"), {"modelPath", "trainingFolder"}, "m")
    assert len(truthy) == 2, truthy


def test_an_empty_path_parameter_means_nothing_chosen():
    """What Slicer stores for an untouched Path parameter (PathSerializer.default: `Path()`) and
    what an emptied ctkPathLineEdit reads back (`Path(widget.currentPath)`) both mean "not chosen"."""
    from deepnav.mrml import chosen_path

    assert chosen_path(Path()) is None and chosen_path(Path("")) is None and chosen_path(None) is None
    assert chosen_path(Path("/models/m.pt")) == Path("/models/m.pt")
    assert chosen_path("relative/m.pt") == Path("relative/m.pt")
