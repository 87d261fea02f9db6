"""bf16 automatic mixed precision against fp32 (every command's `--precision`), and the
channels-last 3D memory layout, for the three shipped networks, on the machine it runs on.

    python benchmarks/mixed_precision.py --json benchmarks/results/mixed_precision_cpu.json
    python benchmarks/mixed_precision.py --layout-pairs 10 --json benchmarks/results/channels_last_cpu.json

Accuracy (the same inputs through both precisions, deepnav.torch_runtime.autocast):
- MR-US fusion: the shipped cascade, network only (no correction stage), on unseen synthetic
  patients (`fusion evaluate`'s seeds, one frame each): landmark TRE after the rigid stage and the
  cascade, and how far the bf16 field is from the fp32 one (mm, 1 mm grid);
- liver: the shipped lesion network (with its localiser) on simulated arterial + venous studies
  (`liver evaluate`'s seeds, synthetic abdomens): lesion and liver Dice against the truth, and
  between the two precisions' masks;
- fetal: the shipped head network on the first images of the HC18 validation split (the model
  card's split, by fetus): |HC - reference| in each precision and the HC difference between them.

Speed: `--repeats` rounds after one warm-up, each precision x memory layout in turn within a
round (so that the load, which drifts, falls on all alike; medians, and the ratio of each round's
paired times), of the fusion cascade's forward (128^3 pair) and its networks' layers alone, the
liver network on one 96^3 window (4 phases), the fetal network on one batch of 8 crops, and one
training step (forward, backward, Adam) of each network (the trainers' input sizes; fusion's
rigid stage). The load average is recorded beside every timing: others' work shares the cores.
`--layout-pairs N` runs only a paired contiguous / channels-last comparison in fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion"), str(ROOT / "LiverLesionSeg"), str(ROOT / "FetalBiometry")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepnav.command_line import write_json  # noqa: E402
from deepnav.torch_runtime import adam, autocast, configure_threads, forward_in, machine_description  # noqa: E402

PRECISIONS = ("fp32", "bf16")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def interleaved(runs: dict, repeats: int) -> dict:
    """Each of `runs` (name -> function) once to warm up, then `repeats` rounds of each in turn
    (A B C A B C ...), so that the load drifting during the runs falls on all alike: each one's
    median and times, the load average after each round."""
    for run in runs.values():
        run()
    times, loads = {name: [] for name in runs}, []
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        loads.append(load())
    out = {name: {"median_s": statistics.median(t), "runs_s": t} for name, t in times.items()}
    for name in runs:
        print(f"  {name}: {out[name]['median_s']:.3f} s", flush=True)
    print(f"  (load average {min(loads):.1f}-{max(loads):.1f})", flush=True)
    return {"runs": out, "load_average": loads}


def ratio(result: dict, slower: str, faster: str) -> dict:
    """Round by round, time of `slower` over time of `faster`: its median and in how many rounds > 1."""
    a, b = result["runs"][slower]["runs_s"], result["runs"][faster]["runs_s"]
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"of": f"{slower} / {faster}", "median": statistics.median(ratios), "above_1_in": f"{sum(r > 1 for r in ratios)} of "
            f"{len(ratios)}"}


def training_step(loss, optimiser):
    """One step: loss() (forward and loss), backward, the optimiser's update."""
    def step():
        value = loss()
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()

    return step


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=LAYOUTS[layout]) if x.dim() == 5 else x


# --- MR-US fusion ---------------------------------------------------------------------------------

def fusion_accuracy(cases: int) -> dict:
    from MRUSFusionLib.evaluation import case_seeds, landmark_errors
    from MRUSFusionLib.model_io import load_model
    from MRUSFusionLib.phantom import make_patient
    from MRUSFusionLib.preprocess import prepare_pair
    from MRUSFusionLib.registration import register_pair

    models = {p: load_model(None, "cpu", p) for p in PRECISIONS}
    rows = []
    for seed in case_seeds(cases, 0):
        patient = make_patient(seed, frames=1)
        frame = patient.frames[0]
        pair = prepare_pair(patient.mr, frame.image, liver=patient.liver, mr_vessels=patient.vessels,
                            us_vessels=frame.vessels)
        results = {p: register_pair(m, pair) for p, m in models.items()}
        row = {"patient_seed": seed}
        for p, result in results.items():
            errors = landmark_errors(result, patient, frame)
            row["tre_initial_mm"] = float(np.median(errors["initial"]))
            row[f"tre_rigid_{p}_mm"] = float(np.median(errors["rigid"]))
            row[f"tre_final_{p}_mm"] = float(np.median(errors["final"]))
        gap = np.linalg.norm(results["bf16"].disp_ijk - results["fp32"].disp_ijk, axis=0)  # voxels = mm here
        row.update(field_gap_median_mm=float(np.median(gap)), field_gap_max_mm=float(gap.max()),
                   rigid_matrix_gap=float(np.abs(results["bf16"].matrix_ijk - results["fp32"].matrix_ijk).max()))
        rows.append(row)
        print(f"  fusion patient {seed}: TRE final fp32 {row['tre_final_fp32_mm']:.2f} / bf16 {row['tre_final_bf16_mm']:.2f} mm,"
              f" field gap median {row['field_gap_median_mm']:.3f} max {row['field_gap_max_mm']:.3f} mm", flush=True)
    summary = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k != "patient_seed"}
    summary["field_gap_max_mm"] = float(max(r["field_gap_max_mm"] for r in rows))
    return {"summary": summary, "rows": rows}


def fusion_speed(repeats: int) -> dict:
    """The cascade's forward (networks and geometry), its two networks' layers alone, and a
    rigid-stage training step, in each precision and layout."""
    from MRUSFusionLib.model_io import load_model
    from MRUSFusionLib.networks import GRID

    g = torch.Generator().manual_seed(0)
    fixed, moving = (torch.rand(1, 1, GRID, GRID, GRID, generator=g) for _ in range(2))
    pair = torch.cat([fixed, moving], 1)
    cascades = {layout: load_model(None, "cpu").eager().eval().to(memory_format=f) for layout, f in LAYOUTS.items()}

    def forward(p, layout, layers_only=False):
        cascade = cascades[layout].set_precision(p)
        if layers_only:  # what autocast and the layout change: the convolutions (and the rigid head's fc)
            return cascade.rigid.run_layers(pair), cascade.bspline.run_layers(pair)
        return cascade(fixed, moving)

    out = {}
    with torch.no_grad():
        for what, layers_only in (("cascade forward", False), ("networks' layers", True)):
            out[what] = interleaved({f"{p} {layout}": lambda p=p, layout=layout, layers_only=layers_only:
                                     forward(p, layout, layers_only) for p in PRECISIONS for layout in LAYOUTS}, repeats)
    steps = {}
    for layout, cascade in cascades.items():
        cascade.train()
        step = training_step(lambda cascade=cascade: (cascade.rigid_stage(fixed, moving)[:, :, 3] ** 2).mean(),
                             adam(cascade.rigid.parameters(), 1e-5))  # (the loss's form does not matter for the time)
        for p in PRECISIONS:
            steps[f"{p} {layout}"] = lambda p=p, cascade=cascade, step=step: (cascade.set_precision(p), step())
    out["rigid training step"] = interleaved(steps, max(2, repeats // 2))
    return _ratios(out)


def _ratios(out: dict) -> dict:
    """bf16 over fp32 and channels-last over contiguous, round by round, where both were run."""
    for result in out.values():
        names, result["ratios"] = result["runs"], []
        for name in names:
            for a, b in (("bf16", "fp32"), ("channels_last_3d", "contiguous")):
                if a in name.split() and name.replace(a, b) in names:
                    result["ratios"].append(ratio(result, name, name.replace(a, b)))
    return out


# --- liver ----------------------------------------------------------------------------------------

def liver_accuracy(cases: int) -> dict:
    from LiverLesionSegLib.abdomen import synthetic_abdomen
    from LiverLesionSegLib.evaluation import EVALUATION_SEED_BASE, dice, score_case
    from LiverLesionSegLib.model_io import load_model
    from LiverLesionSegLib.pipeline import segment_study
    from LiverLesionSegLib.simulator import simulate_case

    models = {p: load_model(None, "cpu", precision=p) for p in PRECISIONS}
    rows = []
    for n in range(cases):
        seed = EVALUATION_SEED_BASE + n
        case = simulate_case(synthetic_abdomen(seed), seed, phases=("arterial", "venous"), field="slab")
        row, masks = {"case_seed": seed}, {}
        for p, model in models.items():
            t0 = time.perf_counter()
            result = segment_study(model, case.phases)
            row[f"runtime_{p}_s"] = time.perf_counter() - t0
            scores = score_case(case, result.lesions.array, result.liver.array)
            row[f"lesion_dice_{p}"], row[f"liver_dice_{p}"] = scores["lesion_dice"], scores["liver_dice"]
            row[f"lesions_found_{p}"], row["lesions_true"] = scores["lesions_found"], scores["lesions_true"]
            masks[p] = (result.lesions.array > 0, result.liver.array > 0)
        row["lesion_agreement_dice"] = dice(masks["fp32"][0], masks["bf16"][0])
        row["liver_agreement_dice"] = dice(masks["fp32"][1], masks["bf16"][1])
        row["load_average"] = load()
        rows.append(row)
        print(f"  liver case {seed}: lesion Dice fp32 {row['lesion_dice_fp32']:.4f} / bf16 {row['lesion_dice_bf16']:.4f}, "
              f"liver {row['liver_dice_fp32']:.4f} / {row['liver_dice_bf16']:.4f}, masks agree "
              f"{row['lesion_agreement_dice']:.4f} / {row['liver_agreement_dice']:.4f}", flush=True)
    keys = [k for k in rows[0] if k not in ("case_seed", "load_average")]
    return {"summary": {k: float(np.mean([r[k] for r in rows])) for k in keys}, "rows": rows}


def liver_speed(repeats: int) -> dict:
    """The shipped network on one 96^3 window (4 phases), and a training step (the trainer's
    batch and patch), in each precision and layout."""
    from LiverLesionSegLib.inference import ROI
    from LiverLesionSegLib.model_io import MODEL_FORMAT, MODEL_VERSION, SHIPPED_MODEL
    from LiverLesionSegLib.network import PHASE_CHANNELS, LesionUNet
    from LiverLesionSegLib.training import MaskedDiceFocalLoss, TrainConfig

    from deepnav import model_files

    g = torch.Generator().manual_seed(0)
    modules = {layout: model_files.load_archive(SHIPPED_MODEL, torch.device("cpu"), MODEL_FORMAT, MODEL_VERSION,
                                                "liver")[0].to(memory_format=f) for layout, f in LAYOUTS.items()}
    x = torch.rand(1, len(PHASE_CHANNELS), ROI, ROI, ROI, generator=g)
    out = {}
    with torch.no_grad():
        out["96^3 window"] = interleaved({f"{p} {layout}": lambda p=p, layout=layout:
                                          forward_in(p, modules[layout], _layout(x, layout))
                                          for p in PRECISIONS for layout in LAYOUTS}, repeats)
    config = TrainConfig()
    loss_fn = MaskedDiceFocalLoss(config)
    patch = torch.rand(config.batch, len(PHASE_CHANNELS), *(config.patch,) * 3, generator=g)
    target = torch.randint(0, 3, (config.batch, 1, *(config.patch,) * 3), generator=g).float()
    steps = {}
    for layout, f in LAYOUTS.items():
        net = LesionUNet(width=config.width).to(memory_format=f)
        for p in PRECISIONS:
            steps[f"{p} {layout}"] = training_step(lambda p=p, net=net, layout=layout:
                                                   loss_fn(forward_in(p, net, _layout(patch, layout)), target),
                                                   adam(net.parameters(), 1e-5))
    out[f"training step ({config.batch} x {config.patch}^3)"] = interleaved(steps, max(2, repeats // 2))
    return _ratios(out)


# --- fetal ----------------------------------------------------------------------------------------

def fetal_accuracy(data: Path, images: int) -> dict:
    from FetalBiometryLib.evaluation import score_case
    from FetalBiometryLib.hc18 import find_cases, split_by_subject
    from FetalBiometryLib.segment import HeadSegmenter

    _, validation = split_by_subject(find_cases(data), 0.15, 0)  # the model card's split (deepnav fetal train)
    segmenters = {p: HeadSegmenter.load(None, "cpu", p) for p in PRECISIONS}
    rows = []
    for case in validation[:images]:
        scores = {p: score_case(s, case) for p, s in segmenters.items()}
        row = {"file": case.image.name, "pixel_mm": case.pixel_mm}
        for p, s in scores.items():
            row[f"hc_{p}_mm"], row[f"runtime_{p}_s"] = s.get("hc_mm"), s["runtime_s"]
            row[f"abs_error_{p}_mm"] = abs(s["hc_diff_mm"]) if s.get("hc_mm") is not None else None
        both = row["hc_fp32_mm"] is not None and row["hc_bf16_mm"] is not None
        row["hc_bf16_minus_fp32_mm"] = row["hc_bf16_mm"] - row["hc_fp32_mm"] if both else None
        rows.append(row)
    measured = [r for r in rows if r["hc_bf16_minus_fp32_mm"] is not None]
    gaps = np.abs([r["hc_bf16_minus_fp32_mm"] for r in measured])
    summary = {"images": len(rows), "measured_both": len(measured),
               "measured_fp32": sum(r["hc_fp32_mm"] is not None for r in rows),
               "measured_bf16": sum(r["hc_bf16_mm"] is not None for r in rows),
               "mean_abs_error_fp32_mm": float(np.mean([r["abs_error_fp32_mm"] for r in measured])),
               "mean_abs_error_bf16_mm": float(np.mean([r["abs_error_bf16_mm"] for r in measured])),
               "abs_hc_gap_mean_mm": float(gaps.mean()), "abs_hc_gap_median_mm": float(np.median(gaps)),
               "abs_hc_gap_max_mm": float(gaps.max()),
               "runtime_fp32_s": float(np.median([r["runtime_fp32_s"] for r in rows])),
               "runtime_bf16_s": float(np.median([r["runtime_bf16_s"] for r in rows])), "load_average": load()}
    print(f"  fetal: |HC error| fp32 {summary['mean_abs_error_fp32_mm']:.3f} / bf16 {summary['mean_abs_error_bf16_mm']:.3f} mm, "
          f"|bf16 - fp32| mean {summary['abs_hc_gap_mean_mm']:.3f} max {summary['abs_hc_gap_max_mm']:.3f} mm "
          f"({len(measured)} of {len(rows)})", flush=True)
    return {"summary": summary, "rows": rows}


def fetal_speed(repeats: int) -> dict:
    """The shipped network on one batch of 8 crops (an image's four, mirrored), and a training
    step on 8 crops, in each precision (2D: no channels-last 3D)."""
    from FetalBiometryLib import crops
    from FetalBiometryLib.network import HeadNet
    from FetalBiometryLib.segment import HeadSegmenter
    from FetalBiometryLib.training import loss_fn

    module = HeadSegmenter.load(None, "cpu").module
    x = torch.rand(8, 1, *crops.CANVAS_HW, generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        out["batch of 8 crops"] = interleaved({p: lambda p=p: forward_in(p, module, x) for p in PRECISIONS}, repeats)
    net = HeadNet(16).train()
    target = (x > 0.5).float()
    optimiser = adam(net.parameters(), 1e-5)
    steps = {p: training_step(lambda p=p: loss_fn(forward_in(p, net, x), target), optimiser) for p in PRECISIONS}
    out["training step (8 crops)"] = interleaved(steps, max(2, repeats // 2))
    return _ratios(out)


def paired_layouts(pairs: int) -> dict:
    """Contiguous against channels-last 3D, fp32, run alternately (A B A B ...) so that the load
    drifting during the runs falls on both alike: the fusion cascade's forward and its networks'
    layers alone (128^3 pair), and the liver network on a 96^3 window. The ratio of each pair's
    times, and its median."""
    from LiverLesionSegLib.inference import ROI
    from LiverLesionSegLib.model_io import MODEL_FORMAT, MODEL_VERSION, SHIPPED_MODEL
    from LiverLesionSegLib.network import PHASE_CHANNELS

    from deepnav import model_files
    from MRUSFusionLib.model_io import load_model
    from MRUSFusionLib.networks import GRID

    g = torch.Generator().manual_seed(0)
    cascade = load_model(None, "cpu").eager().eval()
    fixed, moving = (torch.rand(1, 1, GRID, GRID, GRID, generator=g) for _ in range(2))
    pair = torch.cat([fixed, moving], 1)
    liver, _ = model_files.load_archive(SHIPPED_MODEL, torch.device("cpu"), MODEL_FORMAT, MODEL_VERSION, "liver")
    window = torch.rand(1, len(PHASE_CHANNELS), ROI, ROI, ROI, generator=g)
    cases = {"fusion cascade forward": (cascade, lambda layout: cascade(_layout(fixed, layout), _layout(moving, layout))),
             "fusion networks' layers (rigid + B-spline)": (
                 cascade, lambda layout: (cascade.rigid.layers(_layout(pair, layout)),
                                          cascade.bspline.layers(_layout(pair, layout)))),
             "liver network, 96^3 window": (liver, lambda layout: liver(_layout(window, layout)))}
    out = {}
    for name, (module, run) in cases.items():
        times = {layout: [] for layout in LAYOUTS}
        loads = []
        with torch.no_grad():
            for n in range(pairs + 1):  # the first pair warms up
                for layout in LAYOUTS:
                    module.to(memory_format=LAYOUTS[layout])
                    t0 = time.perf_counter()
                    run(layout)
                    if n:
                        times[layout].append(time.perf_counter() - t0)
                loads.append(load())
        module.to(memory_format=torch.contiguous_format)
        ratios = [b / a for a, b in zip(times["contiguous"], times["channels_last_3d"], strict=True)]
        out[name] = {"contiguous_median_s": statistics.median(times["contiguous"]),
                     "channels_last_3d_median_s": statistics.median(times["channels_last_3d"]),
                     "ratio_median": statistics.median(ratios), "ratios": ratios,
                     "channels_last_faster_in": f"{sum(r < 1 for r in ratios)} of {len(ratios)}", "load_average": loads}
        print(f"  {name}: contiguous {out[name]['contiguous_median_s']:.3f} s, channels_last_3d "
              f"{out[name]['channels_last_3d_median_s']:.3f} s, ratio {out[name]['ratio_median']:.3f} "
              f"(faster in {out[name]['channels_last_faster_in']}; load {min(loads):.1f}-{max(loads):.1f})", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--fusion-cases", type=int, default=3)
    parser.add_argument("--liver-cases", type=int, default=1)
    parser.add_argument("--fetal-images", type=int, default=24)
    parser.add_argument("--fetal-data", type=Path, default=ROOT.parent / "shared" / "data" / "hc18")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=("fusion", "liver", "fetal"), default=("fusion", "liver", "fetal"))
    parser.add_argument("--skip", nargs="+", choices=("accuracy", "speed"), default=())
    parser.add_argument("--layout-pairs", type=int, default=0,
                        help="only the paired contiguous / channels-last comparison, this many pairs")
    args = parser.parse_args()
    configure_threads()
    with autocast("bf16", "cpu"):  # bf16 autocast works on this CPU (else the comparison means nothing)
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    report = {"machine": machine_description(), "load_average_start": load(), "settings": vars(args) | {
        "json": str(args.json), "fetal_data": str(args.fetal_data)}}
    if args.layout_pairs:
        report["layouts_paired"] = paired_layouts(args.layout_pairs)
        report["load_average_end"] = load()
        write_json(report, args.json)
        print(f"wrote {args.json}")
        return 0
    for name in args.only:
        print(f"{name}:", flush=True)
        part = {}
        if "accuracy" not in args.skip:
            part["accuracy"] = {"fusion": lambda: fusion_accuracy(args.fusion_cases),
                                "liver": lambda: liver_accuracy(args.liver_cases),
                                "fetal": lambda: fetal_accuracy(args.fetal_data, args.fetal_images)}[name]()
        if "speed" not in args.skip:
            part["speed"] = {"fusion": fusion_speed, "liver": liver_speed, "fetal": fetal_speed}[name](args.repeats)
        report[name] = part
    report["load_average_end"] = load()
    print(table(report))
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


def table(report: dict) -> str:
    lines = ["| what | median s (or ratio of paired runs) |", "|---|---|"]
    for name in ("fusion", "liver", "fetal"):
        for what, result in report.get(name, {}).get("speed", {}).items():
            loads = result["load_average"]
            times = ", ".join(f"{k} {v['median_s']:.3f}" for k, v in result["runs"].items())
            lines.append(f"| {name} {what} (load {min(loads):.1f}-{max(loads):.1f}) | {times} |")
            for r in result["ratios"]:
                lines.append(f"| {name} {what}: {r['of']} | {r['median']:.2f} (above 1 in {r['above_1_in']}) |")
        summary = report.get(name, {}).get("accuracy", {}).get("summary", {})
        for key in sorted(k for k in summary if "fp32" in k):
            lines.append(f"| {name} {key}, bf16 | {summary[key]:.4f}, {summary[key.replace('fp32', 'bf16')]:.4f} |")
        for key in sorted(k for k in summary if "gap" in k or "agreement" in k):
            lines.append(f"| {name} {key} | {summary[key]:.4f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
