"""Point lists as Slicer markups JSON (`.mrk.json`), stored in LPS as Slicer writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepnav.errors import InputError

SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"


def write_markups(path: Path, points_lps: np.ndarray, names: list[str]) -> Path:
    """A fiducial list Slicer opens directly (File > Add Data)."""
    control_points = [{"id": str(i + 1), "label": name, "position": [float(c) for c in p]}
                      for i, (p, name) in enumerate(zip(np.asarray(points_lps), names, strict=True))]
    doc = {"@schema": SCHEMA, "markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                                           "coordinateUnits": "mm", "controlPoints": control_points}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def read_markups(path: Path) -> tuple[np.ndarray, list[str]]:
    """Points in LPS mm and their labels; RAS files are converted."""
    try:
        markup = json.loads(Path(path).read_text())["markups"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise InputError(f"{path} is not a Slicer markups JSON file: {exc}") from exc
    points = np.array([cp["position"] for cp in markup.get("controlPoints", [])], dtype=np.float64).reshape(-1, 3)
    if markup.get("coordinateSystem", "LPS") == "RAS":
        points[:, :2] *= -1
    return points, [cp.get("label", "") for cp in markup.get("controlPoints", [])]
