"""Writing a synthetic patient to disk in the layout `deepnav fusion train/register` read."""

from __future__ import annotations

import json
from pathlib import Path

from deepnav.imaging import write_volume
from deepnav.markups import write_markups
from MRUSFusionLib.phantom import Patient


def write_patient(patient: Patient, out_dir: Path, fmt: str = ".nrrd") -> dict:
    """MR, liver mask, vessel labels and landmarks; per US frame the volume, its vessel label,
    field-of-view mask and the true landmark positions. Returns an index (also `patient.json`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {
        "seed": patient.seed,
        "space": "LPS",
        "mr": write_volume(patient.mr, out_dir / f"mr{fmt}").name,
        "liver": write_volume(patient.liver, out_dir / f"mr_liver{fmt}").name,
        "mr_vessels": write_volume(patient.vessels, out_dir / f"mr_vessels{fmt}").name,
        "landmarks_mr": write_markups(out_dir / "landmarks_mr.mrk.json", patient.landmarks_lps, patient.landmark_names).name,
        "frames": [],
    }
    for t, frame in enumerate(patient.frames):
        stem = f"us_{t:02d}"
        index["frames"].append({
            "us": write_volume(frame.image, out_dir / f"{stem}{fmt}").name,
            "us_vessels": write_volume(frame.vessels, out_dir / f"{stem}_vessels{fmt}").name,
            "us_fov": write_volume(frame.fov, out_dir / f"{stem}_fov{fmt}").name,
            "landmarks_us": write_markups(out_dir / f"{stem}_landmarks.mrk.json", frame.landmarks_lps,
                                          patient.landmark_names).name,
            "breathing_amplitude_mm": frame.motion.breath_amplitude,
        })
    (out_dir / "patient.json").write_text(json.dumps(index, indent=2))
    return index
