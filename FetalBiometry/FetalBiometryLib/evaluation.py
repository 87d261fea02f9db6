"""Scoring head measurements against HC18-style annotations (`deepnav fetal evaluate`).

Per image: HC difference (mm, prediction minus reference), Dice of the filled fitted ellipse
against the filled reference ellipse, symmetric Hausdorff distance between the two ellipse
outlines (mm), runtime; and the same figures for the spec's pixel-count method (HC from
dilate-minus-mask, Dice and Hausdorff of the fused mask itself) side by side.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import find_contours

from deepnav.statistics import spread
from deepnav.torch_runtime import machine_description
from FetalBiometryLib.hc18 import Case, reference_ellipse
from FetalBiometryLib.image_io import read_image_2d
from FetalBiometryLib.pipeline import measure_image
from FetalBiometryLib.segment import HeadSegmenter


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else 1.0


def hausdorff(points_a: np.ndarray, points_b: np.ndarray) -> float:
    return float(max(cKDTree(points_b).query(points_a)[0].max(), cKDTree(points_a).query(points_b)[0].max()))


def score_case(segmenter: HeadSegmenter, case: Case) -> dict:
    image = read_image_2d(case.image)
    t0 = time.perf_counter()
    result = measure_image(segmenter, image.pixels, case.pixel_mm)
    runtime = time.perf_counter() - t0
    ref = reference_ellipse(case.annotation)
    ref_hc = case.hc_mm if case.hc_mm is not None else ref.perimeter() * case.pixel_mm
    shape = image.pixels.shape
    ref_filled = ref.filled(shape)
    row = {"file": case.image.name, "pixel_mm": case.pixel_mm, "hc_ref_mm": ref_hc, "runtime_s": runtime}
    m = result.measurement
    if m.hc_mm is None:
        return {**row, "hc_mm": None, "reason": m.reason}
    row.update(hc_mm=m.hc_mm, hc_diff_mm=m.hc_mm - ref_hc, flags=m.flags,
               dice=dice(m.ellipse_px.filled(shape), ref_filled),
               hausdorff_mm=hausdorff(m.ellipse_px.outline(), ref.outline()) * case.pixel_mm)
    # the spec's method: boundary pixel count of the fused mask, and that mask as the segmentation
    mask = m.mask
    contour = max(find_contours(mask.astype(np.float32), 0.5), key=len)[:, ::-1]
    row.update(pixel_count_hc_mm=m.pixel_count_hc_mm, pixel_count_hc_diff_mm=m.pixel_count_hc_mm - ref_hc,
               pixel_count_dice=dice(mask, ref_filled),
               pixel_count_hausdorff_mm=hausdorff(contour, ref.outline()) * case.pixel_mm,
               contour_length_mm=m.contour_length_mm)
    return row


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if r.get("hc_mm") is not None]
    out = {"images": len(rows), "measured": len(done), "not_measurable": len(rows) - len(done)}
    if not done:
        return out
    diff = [r["hc_diff_mm"] for r in done]
    out["ellipse"] = {"hc_abs_diff_mm": spread(np.abs(diff)), "hc_signed_mean_mm": float(np.mean(diff)),
                      "hc_diff_sd_mm": float(np.std(diff)), "dice": spread([r["dice"] for r in done]),
                      "hausdorff_mm": spread([r["hausdorff_mm"] for r in done])}
    pc = [r["pixel_count_hc_diff_mm"] for r in done]
    out["pixel_count"] = {"hc_abs_diff_mm": spread(np.abs(pc)), "hc_signed_mean_mm": float(np.mean(pc)),
                          "hc_diff_sd_mm": float(np.std(pc)), "dice": spread([r["pixel_count_dice"] for r in done]),
                          "hausdorff_mm": spread([r["pixel_count_hausdorff_mm"] for r in done])}
    out["runtime_s"] = spread([r["runtime_s"] for r in done])
    out["flagged"] = sum(1 for r in done if r["flags"])
    return out


def evaluate(segmenter: HeadSegmenter, cases: list[Case], progress=None) -> dict:
    rows = []
    for n, case in enumerate(cases):
        rows.append(score_case(segmenter, case))
        if progress:
            progress((n + 1) / len(cases), f"{case.image.name}")
    return {"summary": summarise(rows), "rows": rows,
            "machine": machine_description() | {"device": str(segmenter.device)}}


def format_table(summary: dict) -> str:
    lines = [f"{summary['measured']} of {summary['images']} images measured "
             f"({summary['not_measurable']} not measurable, {summary.get('flagged', 0)} flagged)",
             f"{'method':14s}{'|HC diff| mean':>16s}{'median':>8s}{'signed':>8s}{'SD':>7s}{'Dice':>8s}{'HD mm':>8s}"]
    for name in ("ellipse", "pixel_count"):
        s = summary.get(name)
        if s:
            lines.append(f"{name:14s}{s['hc_abs_diff_mm']['mean']:16.2f}{s['hc_abs_diff_mm']['median']:8.2f}"
                         f"{s['hc_signed_mean_mm']:8.2f}{s['hc_diff_sd_mm']:7.2f}{s['dice']['mean']:8.4f}"
                         f"{s['hausdorff_mm']['mean']:8.2f}")
    if "runtime_s" in summary:
        lines.append(f"runtime per image: median {summary['runtime_s']['median']:.3f} s, p90 {summary['runtime_s']['p90']:.3f} s")
    return "\n".join(lines)

