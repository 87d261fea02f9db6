"""Which head model to ship, chosen by 5-fold cross-validation by fetus (issue 25).

Candidates: model files (`--model NAME=PATH`) and ensembles of them (`--ensemble NAME=A+B`: the mean
of the members' probabilities, each with the test-time mirror, as network.HeadEnsemble computes).
On the validation fetuses every candidate's fused probability map is measured with each edge
sharpness of the grid; then, for each of 5 folds by fetus (the folds of fetal_error_sources.py),
the (candidate, sharpness) pair with the lowest mean |HC difference| on the other four folds is
chosen and scored on the fold: the held-out figures are what a choice made this way is worth, and
no fold's score rests on a choice made on it. Also each candidate in sample (every fold alike), its
ellipse Dice, and the whole path's runtime per image (best of 3 on every 7th image, 1 thread and the
configured threads, with the load average).

    python benchmarks/fetal_model_choice.py --data ../shared/data/hc18 --model shipped=OLD.pt \\
        --model finetuned=NEW.pt --ensemble both=shipped+finetuned --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "FetalBiometry"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fetal_error_sources import FOLDS, SHARPNESS_GRID, errors, fold_of  # noqa: E402
from FetalBiometryLib import hc18  # noqa: E402
from FetalBiometryLib.deidentify import deidentify  # noqa: E402
from FetalBiometryLib.evaluation import dice  # noqa: E402
from FetalBiometryLib.image_io import read_image_2d  # noqa: E402
from FetalBiometryLib.measure import EDGE_SHARPNESS, measure  # noqa: E402
from FetalBiometryLib.network import HeadEnsemble  # noqa: E402
from FetalBiometryLib.segment import HeadSegmenter  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402


def ensemble_segmenter(members: list[HeadSegmenter]) -> HeadSegmenter:
    """The members as one scripted module, as a shipped ensemble file would hold."""
    module = torch.jit.script(HeadEnsemble([m.module for m in members]).eval())
    return HeadSegmenter(module, members[0].metadata, members[0].device, None)


def image_row(segmenters: dict[str, HeadSegmenter], case: hc18.Case) -> dict:
    clean, _ = deidentify(read_image_2d(case.image).pixels)
    ref_filled = hc18.reference_ellipse(case.annotation).filled(clean.shape)
    row = {"file": case.image.name, "subject": case.subject, "pixel_mm": case.pixel_mm, "hc_ref_mm": case.hc_mm}
    for name, segmenter in segmenters.items():
        probability = segmenter.probability(clean)
        for sharpness in SHARPNESS_GRID:
            m = measure(probability, case.pixel_mm, sharpness)
            row[f"{name}_sharp{sharpness}_mm"] = None if m.hc_mm is None else m.hc_mm - case.hc_mm
            if sharpness == EDGE_SHARPNESS and m.hc_mm is not None:
                row[f"{name}_dice"] = dice(m.ellipse_px.filled(clean.shape), ref_filled)
    return row


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], float)


def cross_validated(rows: list[dict], names: list[str]) -> dict:
    folds = fold_of(rows)
    pairs = [(n, s) for n in names for s in SHARPNESS_GRID]
    table = {p: column(rows, f"{p[0]}_sharp{p[1]}_mm") for p in pairs}
    held, chosen = np.zeros(len(rows)), []
    for k in range(FOLDS):
        fit, test = folds != k, folds == k
        best = min(pairs, key=lambda p: np.nanmean(np.abs(table[p][fit])))
        held[test] = table[best][test]
        chosen.append({"fold": k, "model": best[0], "sharpness": best[1],
                       "fit_abs_mean_mm": float(np.nanmean(np.abs(table[best][fit])))})
    # the model alone chosen by the folds, at the shipped sharpness
    held_model, chosen_model = np.zeros(len(rows)), []
    for k in range(FOLDS):
        fit, test = folds != k, folds == k
        best = min(names, key=lambda n: np.nanmean(np.abs(table[(n, EDGE_SHARPNESS)][fit])))
        held_model[test] = table[(best, EDGE_SHARPNESS)][test]
        chosen_model.append({"fold": k, "model": best})
    return {"model_and_sharpness": {"chosen": chosen, "held_out": errors(held)},
            f"model_at_sharpness_{EDGE_SHARPNESS}": {"chosen": chosen_model, "held_out": errors(held_model)}}


def timing(segmenters: dict[str, HeadSegmenter], cases: list[hc18.Case]) -> dict:
    out = {"images": len(cases), "load_average_1min_at_start": os.getloadavg()[0]}
    before = torch.get_num_threads()
    for threads in sorted({1, before}):
        torch.set_num_threads(threads)
        for name, segmenter in segmenters.items():
            best = []
            for case in cases:
                pixels = read_image_2d(case.image).pixels
                runs = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    clean, _ = deidentify(pixels)
                    measure(segmenter.probability(clean), case.pixel_mm)
                    runs.append(time.perf_counter() - t0)
                best.append(min(runs))
            out[f"{name}_{threads}_thread_s"] = spread(best)
    torch.set_num_threads(before)
    out["load_average_1min_at_end"] = os.getloadavg()[0]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="HC18 folder")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a candidate model file")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=A+B", help="an ensemble of candidates")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="the first N validation images only (a quick look)")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    configure_threads()
    segmenters = {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        segmenters[name] = HeadSegmenter.load(path, "cpu")
    splits = {json.dumps(s.metadata["split"], sort_keys=True) for s in segmenters.values()}
    if len(splits) != 1:
        raise SystemExit("the candidates were trained on different splits")
    for spec in args.ensemble:
        name, members = spec.split("=", 1)
        segmenters[name] = ensemble_segmenter([segmenters[m] for m in members.split("+")])
    validation = set(next(iter(segmenters.values())).metadata["split"]["validation_subjects"])
    cases = [c for c in hc18.find_cases(args.data) if c.subject in validation]
    cases = cases[: args.limit] if args.limit else cases
    rows = []
    for n, case in enumerate(cases):
        rows.append(image_row(segmenters, case))
        print(f"{n + 1}/{len(cases)} {case.image.name}: " + ", ".join(
            f"{name} {rows[-1][f'{name}_sharp{EDGE_SHARPNESS}_mm'] or float('nan'):+.2f}" for name in segmenters),
            file=sys.stderr)
    names = list(segmenters)
    in_sample = {name: {**errors(column(rows, f"{name}_sharp{EDGE_SHARPNESS}_mm")),
                        "ellipse_dice": float(np.nanmean(column(rows, f"{name}_dice"))),
                        "every_sharpness": {str(s): errors(column(rows, f"{name}_sharp{s}_mm")) for s in SHARPNESS_GRID}}
                 for name in names}
    summary = {"in_sample_at_shipped_sharpness": in_sample, "cross_validated": cross_validated(rows, names)}
    if not args.no_timing:
        summary["runtime_per_image"] = timing(segmenters, cases[::7])
    report = {"summary": summary, "rows": rows, "candidates": args.model + args.ensemble, "machine": machine_description(),
              "command": "python benchmarks/fetal_model_choice.py " + " ".join(sys.argv[1:])}
    write_json(report, args.json)
    wrote(args.json)
    for name, e in in_sample.items():
        print(f"{name:16s} |diff| {e['abs_mean']:.3f}  bias {e['bias']:+.3f}  SD {e['sd']:.3f}  p90 {e['abs_p90']:.2f}"
              f"  Dice {e['ellipse_dice']:.4f}")
    for what, cv in summary["cross_validated"].items():
        e = cv["held_out"]
        print(f"CV {what}: held-out |diff| {e['abs_mean']:.3f}  bias {e['bias']:+.3f}  SD {e['sd']:.3f}; chosen "
              + ", ".join(f"{c['model']}" + (f"@{c['sharpness']}" if "sharpness" in c else "") for c in cv["chosen"]))
    if "runtime_per_image" in summary:
        t = summary["runtime_per_image"]
        print("runtime per image (median of best of 3): " + ", ".join(
            f"{k[:-2]} {v['median']:.3f} s" for k, v in t.items() if isinstance(v, dict)),
            f"(load {t['load_average_1min_at_start']:.1f} -> {t['load_average_1min_at_end']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
