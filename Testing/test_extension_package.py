"""The extension as the Extensions Manager builds it: the Extensions Index entry is valid against
Slicer's published schema and agrees with the top-level CMakeLists.txt; the icon and screenshot
that CMakeLists.txt points to are in the repository."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import ROOT

SCHEMA = ROOT.parent / "shared" / "spec" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
ENTRY = ROOT / "Resources" / "ExtensionsIndex" / "DeepNav.json"
CMAKE = (ROOT / "CMakeLists.txt").read_text()


def cmake_value(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', CMAKE)
    assert match, f"{name} is not set in CMakeLists.txt"
    return match.group(1)


def test_index_entry_is_valid_against_the_published_schema():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the Extensions Index schema is missing: {SCHEMA}")
        pytest.skip(f"no schema copy at {SCHEMA}")
    jsonschema.validate(json.loads(ENTRY.read_text()), json.loads(SCHEMA.read_text()))


def test_index_entry_agrees_with_cmake():
    entry = json.loads(ENTRY.read_text())
    assert entry["build_dependencies"] == cmake_value("EXTENSION_DEPENDS").split()
    assert entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert cmake_value("EXTENSION_HOMEPAGE").startswith(entry["scm_url"].removesuffix(".git"))
    assert re.search(r"project\(DeepNav\)", CMAKE)


@pytest.mark.parametrize("variable", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_pictures_named_in_cmake_are_in_the_repository(variable):
    for url in cmake_value(variable).split():
        path = ROOT / url.split("/main/", 1)[1]
        assert path.is_file() and path.stat().st_size > 1000, f"{url} -> {path}"


def test_every_module_is_built():
    modules = {p.parent.name for p in ROOT.glob("*/CMakeLists.txt")}
    assert modules == set(re.findall(r"add_subdirectory\((\w+)\)", CMAKE))
