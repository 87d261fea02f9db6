"""`deepnav fusion demo`: the live fusion, end to end, on one machine.

The fusion service starts on the built-in synthetic patient (or a given MR), a simulated
scanner streams the patient's US breathing sequence (or real volumes from files) to it over a
real loopback OpenIGTLink connection at a set rate, and everything that comes back is used as a
Slicer user would get it: overlay pictures from the received warped US, landmark errors from the
received displacement field (synthetic patient: the truth is known), latency from send to
result, dropped frames, and a check that each volume's geometry arrived intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepnav.imaging import Volume, read_volume, resample_to_grid
from deepnav.progress import ProgressCallback, print_progress
from deepnav.torch_runtime import machine_description
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.fields import displacement_transform, transform_points
from MRUSFusionLib.igtl_messages import DEVICE_FIELD, DEVICE_WARPED
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.overlay import overlay_panel, write_png
from MRUSFusionLib.phantom import make_patient
from MRUSFusionLib.preprocess import prepare_pair
from MRUSFusionLib.scanner import latency_summary, stream
from MRUSFusionLib.service import FusionProcessor, FusionService

DEMO_PATIENT_SEED = 42
BREATHING_FRAMES = 8  # half a breathing cycle; the scanner plays it forth and back


def run_demo(model: LoadedModel, out_dir: Path, *, frames: int = 24, rate_hz: float = 2.0,
             seed: int = DEMO_PATIENT_SEED, us_files: list[Path] | None = None, mr_file: Path | None = None,
             liver_file: Path | None = None, pictures: int = 3, correct: bool = False,
             progress: ProgressCallback = print_progress) -> dict:
    source = _load_source(seed, us_files, mr_file, liver_file, progress)
    volumes = source["volumes"]
    order = _ping_pong(len(volumes))
    keep = set(np.linspace(0, frames - 1, min(pictures, frames)).round().astype(int).tolist())

    processor = FusionProcessor(model, source["mr"], source["liver"], correct=correct)
    progress(0.0, f"warming up the model on {model.device}")
    processor.warm_up()
    with FusionService(processor, port=0) as service:
        progress(0.0, f"streaming {frames} frames at {rate_hz:g} Hz to the service on port {service.port}")
        run = stream("127.0.0.1", service.port, [volumes[i] for i in order], count=frames, rate_hz=rate_hz,
                     keep=lambda i: i in keep,
                     progress=lambda f: progress((f.index + 1) / frames, f"frame {f.index}: end to end "
                                                                         f"{f.end_to_end_s * 1000:.0f} ms"))
    rows, pictures_written = [], []
    for frame in run.completed:
        volume = volumes[order[frame.source]]
        row = {"frame": frame.index, "volume": order[frame.source], "end_to_end_s": frame.end_to_end_s,
               "timings_s": frame.report["timings_s"], "folding_percent": frame.report.get("folding_percent"),
               "geometry_error": _geometry_error(frame.report["input"], volume),
               "corrected_end_to_end_s": frame.corrected_end_to_end_s, "result_shown": frame.messages_stage}
        if source["truth"] is not None and DEVICE_FIELD in frame.messages:
            row.update(_landmark_errors(source, order[frame.source], frame.messages[DEVICE_FIELD]))
        if DEVICE_WARPED in frame.messages:
            picture = out_dir / f"overlay_frame{frame.index:03d}.png"
            _write_overlay(processor, volume, frame.messages[DEVICE_WARPED], picture, row, frame.messages_stage)
            row["overlay"] = picture.name
            pictures_written.append(picture)
        rows.append(row)
    summary = latency_summary(run)
    geometry = [r["geometry_error"] for r in rows]
    report = {**summary, "rate_hz": rate_hz, "source": source["description"], "model": str(model.path),
              "device": str(model.device), "geometry_intact": all(g["intact"] for g in geometry),
              "max_origin_error_mm": max((g["origin_mm"] for g in geometry), default=None),
              "errors_reported": run.errors[:20], "per_frame": rows, "machine": machine_description()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report))
    return report


def _load_source(seed: int, us_files, mr_file, liver_file, progress) -> dict:
    if us_files:
        volumes = [read_volume(p, what="US volume") for p in us_files]
        mr = read_volume(mr_file, what="MR") if mr_file else volumes[0]
        liver = read_volume(liver_file, what="liver mask") if liver_file else None
        description = (f"US files {[Path(p).name for p in us_files]} against "
                       + (Path(mr_file).name if mr_file else "the first US volume (no MR given)"))
        return {"volumes": volumes, "mr": mr, "liver": liver, "truth": None, "description": description}
    progress(0.0, f"generating synthetic patient {seed} with {BREATHING_FRAMES} US frames")
    patient = make_patient(seed, frames=BREATHING_FRAMES)
    return {"volumes": [f.image for f in patient.frames], "mr": patient.mr, "liver": patient.liver,
            "truth": patient, "description": f"synthetic patient {seed}, {BREATHING_FRAMES}-frame breathing sequence"}


def _ping_pong(n: int) -> list[int]:
    """0, 1, ..., n-1, n-2, ..., 1: breathing in and out."""
    return list(range(n)) + list(range(n - 2, 0, -1)) if n > 2 else list(range(n))


def _geometry_error(received: dict, sent: Volume) -> dict:
    origin = float(np.abs(np.array(received["origin_lps"]) - sent.origin).max())
    spacing = float(np.abs(np.array(received["spacing"]) - sent.spacing).max())
    direction = float(np.abs(np.array(received["direction_lps"]) - sent.direction.ravel()).max())
    same_voxels = received["size_ijk"] == list(sent.size_ijk) and received["dtype"] == str(sent.array.dtype) \
        and np.isclose(received["sum"], float(np.sum(sent.array, dtype=np.float64)), rtol=1e-12)
    # OpenIGTLink carries geometry as float32: 1e-3 mm is far above its rounding, far below a voxel
    intact = bool(same_voxels and origin < 1e-3 and spacing < 1e-5 and direction < 1e-5)
    return {"intact": intact, "origin_mm": origin, "spacing_mm": spacing, "direction": direction}


def _write_overlay(processor: FusionProcessor, us: Volume, warped_message, path: Path, row: dict, stage: str) -> None:
    """Before and after (the newest warped US received: the network's or the corrected one),
    captioned with the landmark errors when the truth is known."""
    pair = prepare_pair(processor.mr, us, grid=processor.grid, fixed=processor.fixed)  # the MR is prepared once
    warped = msgs.image_to_volume(warped_message, "warped US")
    if not warped.same_grid(pair.grid):  # the service sends it on the registration grid; be safe
        warped = resample_to_grid(warped.with_array(warped.array.astype(np.float32)), pair.grid)
    after = warped.array.astype(np.float32) / 255.0

    def caption(stage: str, key: str) -> str:
        error = f": median landmark error {row[key]:.1f} mm" if key in row else ""
        return f"frame {row['frame']}, {stage}{error}"

    rows = [(caption("before registration", "tre_before_mm"), pair.moving, pair.fov),
            (caption(stage, "tre_after_mm"), after, (after > 0).astype(np.float32))]
    write_png(overlay_panel(pair.fixed, rows), path)


def _landmark_errors(source: dict, volume_index: int, field_message) -> dict:
    """Median landmark error before and after, mapping the MR landmarks through the field as
    received (RAS on the wire, back to LPS): the geometry check of the whole chain."""
    patient = source["truth"]
    truth = patient.frames[volume_index].landmarks_lps
    mapped = transform_points(displacement_transform(msgs.image_to_field(field_message)), patient.landmarks_lps)
    return {"tre_before_mm": float(np.median(np.linalg.norm(patient.landmarks_lps - truth, axis=1))),
            "tre_after_mm": float(np.median(np.linalg.norm(mapped - truth, axis=1)))}


def _markdown(report: dict) -> str:
    e2e = report["end_to_end_s"]
    lines = ["# DeepNav live MR-US fusion demo", "",
             f"{report['source']}; model `{Path(report['model']).name}` on {report['device']}; "
             f"{report['frames']} frames sent at {report['rate_hz']:g} Hz over loopback OpenIGTLink.", "",
             f"- end to end (send to result received): p50 {_ms(e2e['p50'])}, p95 {_ms(e2e['p95'])}",
             f"- frames completed {report['frames_completed']}, dropped (replaced by a newer frame) "
             f"{report['dropped_frames']}, errors {report['errors']}",
             f"- geometry of every received volume intact: {report['geometry_intact']} "
             f"(largest origin difference {report['max_origin_error_mm']} mm)", "",
             "| stage | p50 | p95 |", "|---|---|---|"]
    for name, p in report["stages_s"].items():
        lines.append(f"| {name} | {_ms(p['p50'])} | {_ms(p['p95'])} |")
    lines += ["", "| frame | volume | end to end | landmark error before (mm) | after (mm) | overlay |",
              "|---|---|---|---|---|---|"]
    for r in report["per_frame"]:
        before = f"{r['tre_before_mm']:.2f}" if "tre_before_mm" in r else "-"
        after = f"{r['tre_after_mm']:.2f}" if "tre_after_mm" in r else "-"
        overlay = f"[{r['overlay']}]({r['overlay']})" if "overlay" in r else ""
        lines.append(f"| {r['frame']} | {r['volume']} | {_ms(r['end_to_end_s'])} | {before} | {after} | {overlay} |")
    lines += ["", "Each overlay: top row before, bottom row after registration (as received from the service); "
                  "axial, coronal, sagittal."]
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
