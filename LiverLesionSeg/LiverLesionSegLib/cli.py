"""`deepnav liver ...`: simulate multi-phase cases, train the lesion network, register phases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepnav.command_line import (
    add_device_option,
    add_json_option,
    config_option,
    examples,
    require_json_target,
    write_json,
    wrote,
)
from deepnav.errors import InputError
from deepnav.outputs import require_writable_folder
from deepnav.progress import console, print_progress
from LiverLesionSegLib.plausibility import EXIT_UNRELIABLE

DEFAULT_ABDOMEN = Path(__file__).resolve().parents[3] / "shared" / "data" / "abdomen"


# `deepnav liver ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "liver"
TRAIN_CONFIG = "LiverLesionSegLib.training:TrainConfig"  # where train's hyper-parameter defaults live
REGISTRATION_HELP = ("how the phases are aligned: pso-powell (particle swarm then Powell, on mutual information) "
                     "or sitk (SimpleITK's optimiser)")
HELP = "multi-phase CT liver lesion segmentation (LiverLesionSeg)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated multi-phase cases as an MSD-layout training folder",
                       epilog=examples("deepnav liver simulate --cases 40 --seed 0 --out cases/"))
    p.add_argument("--cases", type=int, required=True, help="how many cases")
    p.add_argument("--seed", type=int, default=0, help="case seeds are seed*1000 + n")
    p.add_argument("--abdomen", type=Path, default=DEFAULT_ABDOMEN,
                   help="folder with example_ct.nii.gz and example_seg.nii.gz (TotalSegmentator classes); "
                        "without them every case uses a synthetic abdomen")
    p.add_argument("--synthetic-share", type=float, default=0.25,
                   help="share of cases built on a synthetic abdomen instead (anatomical variety)")
    p.add_argument("--field-of-view", choices=["ct", "slab", "liver"], default="ct",
                   help="ct: the whole abdominal CT (what a network must learn on, as a full-length series "
                        "shows the whole body); slab: its in-plane field of view over the labelled slices only; "
                        "liver: the liver's box plus 25 mm (small, for quick experiments)")
    p.add_argument("--out", type=Path, required=True, help="the MSD-layout folder (imagesTr, labelsTr, dataset.json)")
    p.set_defaults(run=_simulate)

    p = sub.add_parser("train", help="train the lesion network on an MSD-layout folder (imagesTr, labelsTr)",
                       epilog=examples("deepnav liver train cases/ --out model/",
                                       "deepnav liver train cases/ --init shipped.pt --epochs 5 --out model/"))
    p.add_argument("data", type=Path, help="MSD-layout folder (imagesTr, labelsTr, dataset.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints, history and model.pt")
    p.add_argument("--val-cases", type=int, default=4, help="the last N cases are kept for validation")
    config_option(p, "--epochs", TRAIN_CONFIG, type=int, help="epochs")
    config_option(p, "--steps-per-epoch", TRAIN_CONFIG, type=int, help="optimiser steps per epoch")
    config_option(p, "--lr", TRAIN_CONFIG, type=float, help="learning rate (polynomial decay)")
    config_option(p, "--lesion-fraction", TRAIN_CONFIG, type=float, help="share of patches centred on a lesion")
    config_option(p, "--liver-fraction", TRAIN_CONFIG, type=float, help="share of patches centred on a liver voxel")
    config_option(p, "--val-every", TRAIN_CONFIG, type=int,
                  help="validate every n epochs (validation is whole-case inference)")
    config_option(p, "--single-phase", TRAIN_CONFIG, type=float,
                  help="share of patches given one phase alone (0: phase dropout only)")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, sampling)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p.add_argument("--init", type=Path, help="a DeepNav liver model file to fine-tune (its normalisation is kept; "
                                             "default: from scratch)")
    p.add_argument("--batch", type=int, help="patches per step in each process (default 2; under torchrun the "
                                             "global batch is processes x this)")
    add_device_option(p)
    p.set_defaults(run=_train, distributed=True)  # also under torchrun (deepnav.distributed)

    p = sub.add_parser(
        "segment", help="segment the lesions of a study: lesions.nii.gz, liver.nii.gz, lesions.json/.csv",
        description="Segment the liver and its lesions from 1-4 phases of a contrast CT (one model takes any "
                    "subset; two or more are more accurate) and judge whether the result is plausible.",
        epilog=examples(
            "deepnav liver segment --phase venous=venous.nii.gz --phase arterial=arterial.nii.gz --out study/",
            "deepnav liver segment --phase venous=dicom/series_folder/ --out study/",
            "deepnav liver segment --studies patients/ --out results/     # each patients/<study>/ holding its phases",
            before=f"exit status: 0 result written and plausible; {EXIT_UNRELIABLE} result written but implausible "
                   '(lesions.json says "reliable": false with the reasons, also printed: e.g. a liver of impossible '
                   "size or extent, liver or lesion HU outside what the phase allows); 2 bad input, nothing written; "
                   "130 cancelled"))
    p.add_argument("--phase", action="append", metavar="NAME=PATH[:SERIES_UID]",
                   help="a phase (plain, arterial, venous, delayed) as an image file or DICOM folder; repeat per phase "
                        "(required unless --studies is given)")
    p.add_argument("--studies", type=Path, nargs="+", metavar="FOLDER",
                   help="instead of --phase, many studies: folders holding their phases named after them "
                        "(arterial.nii.gz, venous/ a DICOM folder, ...), or folders of such folders; each is written "
                        "to OUT/<its name>, a summary to OUT/studies.json; under torchrun shared out among the processes "
                        "(default: the one study --phase gives)")
    p.add_argument("--reference", help="phase whose frame the results are in (default: arterial, else venous)")
    p.add_argument("--liver", type=Path, help="a liver mask on the reference phase's grid (default: the model's)")
    p.add_argument("--registration", choices=["pso-powell", "sitk"], default="pso-powell", help=REGISTRATION_HELP)
    p.add_argument("--model", type=Path, help="lesion model (default: the shipped one, with the shipped localiser)")
    p.add_argument("--localiser", type=Path,
                   help="model that finds the liver's slab on series taller than 220 mm before --model runs "
                        "(default: the shipped one with the shipped --model, else none)")
    add_device_option(p)
    p.add_argument("--out", type=Path, required=True,
                   help="folder for lesions.nii.gz, liver.nii.gz, lesions.json and lesions.csv")
    p.set_defaults(run=_segment, distributed=True)  # --studies also under torchrun (deepnav.distributed)

    p = sub.add_parser("evaluate", help="score the model on simulated studies never used in training",
                       epilog=examples("deepnav liver evaluate --cases 8 --json eval.json",
                                       "deepnav liver evaluate --cases 2 --json - | jq .summary"))
    p.add_argument("--cases", type=int, required=True, help="how many simulated studies")
    p.add_argument("--seed", type=int, default=0, help="evaluation seeds are 1000 + seed*1000 + n (never trained on)")
    p.add_argument("--abdomen", type=Path, default=DEFAULT_ABDOMEN,
                   help="folder with example_ct.nii.gz and example_seg.nii.gz (as for simulate)")
    p.add_argument("--model", type=Path, help="lesion model (default: the shipped one)")
    add_device_option(p)
    add_json_option(p, "the report")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("register", help="rigidly register one phase to another (PSO + Powell, or SimpleITK)",
                       epilog=examples("deepnav liver register --reference arterial.nii.gz --moving venous.nii.gz "
                                       "--out venous_to_arterial.tfm"))
    p.add_argument("--reference", type=Path, required=True, help="the phase that stays (fixed image)")
    p.add_argument("--moving", type=Path, required=True, help="the phase aligned to it")
    p.add_argument("--registration", choices=["pso-powell", "sitk"], default="pso-powell", help=REGISTRATION_HELP)
    # the old spelling, kept working and hidden: one name for the idea across commands (as segment's)
    p.add_argument("--method", dest="registration", choices=["pso-powell", "sitk"], default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, required=True, help="transform file (.tfm/.h5): reference LPS -> moving LPS")
    add_json_option(p, "the result (method, seconds, mutual information, matrix)", required=False)
    p.set_defaults(run=_register, json=Path("-"))


def _abdomens(args):
    from LiverLesionSegLib.abdomen import load_abdomen, synthetic_abdomen

    real = None
    if (args.abdomen / "example_ct.nii.gz").is_file():
        real = load_abdomen(args.abdomen / "example_ct.nii.gz", args.abdomen / "example_seg.nii.gz")
    else:
        print_progress(0.0, f"no abdominal CT in {args.abdomen}: every case uses a synthetic abdomen")
    return real, synthetic_abdomen


def _abdomen_for_seed(args, synthetic_share: float):
    """seed -> the abdomen a case is built on: the real CT, or (a share of cases) a synthetic one."""
    import numpy as np

    real, synthetic = _abdomens(args)

    def pick(seed: int):
        use_real = real is not None and np.random.default_rng([seed, 7]).random() >= synthetic_share
        return real if use_real else synthetic(seed)

    return pick


def _simulate(args) -> int:
    from LiverLesionSegLib.dataset import write_simulated
    from LiverLesionSegLib.simulator import simulate_case

    require_writable_folder(args.out)
    if not 0 <= args.seed < 1000 or args.cases > 1000:
        raise InputError("--seed must be in 0..999 and --cases at most 1000 (higher seeds are kept for evaluation)")
    console.stage(f"simulating {args.cases} cases")
    abdomen_for = _abdomen_for_seed(args, args.synthetic_share)
    for n in range(args.cases):
        seed = args.seed * 1000 + n
        abdomen = abdomen_for(seed)
        use_real = abdomen.z_offset != 0
        case = simulate_case(abdomen, seed, phases=("arterial", "venous", "plain", "delayed"), field=args.field_of_view)
        write_simulated([case], args.out, start=n)
        kinds = ", ".join(f"{lesion.kind} {lesion.diameter_mm:.0f} mm" for lesion in case.lesion_list)
        print_progress((n + 1) / args.cases, f"case {n} ({'real' if use_real else 'synthetic'} abdomen): {kinds}")
    console.say(f"wrote {args.cases} cases to {args.out}")
    return 0


def _train(args) -> int:
    require_writable_folder(args.out)  # refused before anything else is said or imported
    console.stage("reading the training cases")  # torch's import first: seconds
    from deepnav import distributed
    from deepnav.torch_runtime import configure_threads, pick_device
    from LiverLesionSegLib.dataset import read_dataset
    from LiverLesionSegLib.model_io import save_model
    from LiverLesionSegLib.training import TrainConfig, train

    configure_threads()
    config = TrainConfig(seed=args.seed)
    for name in ("epochs", "steps_per_epoch", "batch", "lr", "lesion_fraction", "liver_fraction", "val_every", "single_phase"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    cases = read_dataset(args.data, progress=print_progress)
    if len(cases) <= args.val_cases:
        raise InputError(f"{len(cases)} cases: need more than the {args.val_cases} kept for validation (--val-cases)")
    init = None
    if args.init is not None:
        from LiverLesionSegLib.model_io import load_model

        start = load_model(args.init, "cpu")
        init = (start.module.state_dict(), start.normalisation)
    console.stage("training")
    model, normalisation, info = train(cases[:-args.val_cases], cases[-args.val_cases:], args.out, config,
                                       device=pick_device(args.device), resume=args.resume, init=init,
                                       precision=args.precision)
    if not distributed.is_main():  # rank 0 of a torchrun job writes the model and reports
        return 0
    manifest = json.loads((args.data / "dataset.json").read_text())
    path = save_model(model, normalisation, args.out / "model.pt", {"training": {
        "data": str(args.data), "data_description": manifest.get("description") or manifest.get("name", ""),
        "init": str(args.init) if args.init else None,
        "cases": [c.name for c in cases], "validation": [c.name for c in cases[-args.val_cases:]],
        "config": info["config"], "best": info["best"]}})
    console.say(f"best validation (epoch {info['best']['epoch'] + 1}): loss {info['best']['val_loss']:.4f}, "
          f"lesion Dice {info['best']['val_lesion_dice']:.3f}; wrote {path}")
    return 0


def _load(args):
    # said before torch is imported and the model read: the command's first seconds
    console.stage(f"loading the model ({args.model or 'shipped'}, device {args.device}, {args.precision})")
    from deepnav.torch_runtime import configure_threads, describe_device
    from LiverLesionSegLib.model_io import load_model

    configure_threads()
    model = load_model(args.model, args.device, localiser=getattr(args, "localiser", None), precision=args.precision)
    print_progress(1.0, f"{model.path.name} on {describe_device(model.device)}")
    return model


def _segment(args) -> int:
    require_writable_folder(args.out)
    if args.studies:
        return _segment_studies(args)
    from deepnav import distributed

    if not args.phase:
        raise InputError("give a study's phases (--phase NAME=PATH, repeated) or --studies FOLDER...")
    if distributed.world().active:
        raise InputError("under torchrun, liver segment shares out --studies; one study (--phase) runs as one process")
    console.stage(f"reading {len(args.phase)} phase(s)")  # the imports below bring torch: seconds
    from deepnav.imaging import read_volume
    from LiverLesionSegLib.pipeline import read_phase, segment_study

    phases = {}
    for item in args.phase:
        name, sep, rest = item.partition("=")
        if not sep:
            raise InputError(f"--phase wants NAME=PATH, got {item!r}")
        path, _, uid = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
        if name in phases:
            raise InputError(f"the {name} phase is given twice")
        phases[name] = read_phase(Path(path), f"{name} phase", uid or None)
    model = _load(args)
    liver = read_volume(args.liver, what="liver mask") if args.liver else None
    console.stage("segmenting")
    result = segment_study(model, phases, reference=args.reference, registration=args.registration, liver=liver,
                           progress=print_progress)
    paths = result.write(args.out)
    for warning in result.warnings:
        print(f"warning: {warning}")
    for reason in result.plausibility.reasons:
        print(f"not reliable: {reason}")
    console.say(f"{result.message()} (reference: {result.reference}; {sum(result.timings_s.values()):.1f} s)")
    for key, path in paths.items():
        console.say(f"  {key}: {path}")
    return 0 if result.plausibility.reliable else EXIT_UNRELIABLE


def _segment_studies(args) -> int:
    """`--studies`: each study as `--phase ... --out OUT/<study>` would be; under torchrun each process
    its share (deepnav.distributed), rank 0 writes OUT/studies.json. Exit status: 2 when no study
    could be segmented, EXIT_UNRELIABLE when one could not or was judged implausible, else 0."""
    if args.phase or args.liver:
        raise InputError("--studies takes each study's phases from its folder: leave out --phase and --liver")
    from deepnav import distributed
    from LiverLesionSegLib.batch import find_studies, segment_studies

    studies = find_studies(args.studies)
    model = _load(args)
    console.stage(f"segmenting {len(studies)} studies" + (f" ({distributed.world().describe()})"
                                                          if distributed.world().active else ""))
    rows = segment_studies(model, studies, args.out, reference=args.reference, registration=args.registration,
                           progress=print_progress)
    if distributed.is_main():
        for row in rows:
            console.say(f"{row['study']}: {row.get('message') or 'error: ' + row['error']}"
                        + ("" if row.get("reliable", True) else "  [not reliable]"))
        write_json({"studies": rows}, args.out / "studies.json")
        wrote(args.out / "studies.json")
    if not any(row["out"] for row in rows):
        return 2
    return 0 if all(row.get("reliable") for row in rows) else EXIT_UNRELIABLE


def _evaluate(args) -> int:
    require_json_target(args.json)
    model = _load(args)
    from LiverLesionSegLib.evaluation import evaluate, format_table

    console.stage(f"evaluating on {args.cases} simulated studies")
    report = evaluate(model, _abdomen_for_seed(args, 0.25), args.cases, args.seed)
    console.say(format_table(report))
    write_json(report, args.json)
    wrote(args.json)
    return 0


def _register(args) -> int:
    import SimpleITK as sitk

    from deepnav.imaging import read_volume
    from LiverLesionSegLib.phase_registration import register_phase, register_phase_sitk

    require_writable_folder(args.out.parent, "folder of --out")
    require_json_target(args.json)
    reference = read_volume(args.reference, what="reference phase")
    moving = read_volume(args.moving, what="moving phase")
    console.stage(f"registering {args.moving.name} to {args.reference.name} ({args.registration})")
    run = register_phase if args.registration == "pso-powell" else register_phase_sitk
    result = run(reference.with_array(reference.array.astype("float32")), moving.with_array(moving.array.astype("float32")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(result.transform(), str(args.out))
    write_json({"method": result.method, "seconds": round(result.seconds, 2), "evaluations": result.evaluations,
                "mutual_information": {"before": result.mi_before, "after": result.mi_after},
                "matrix_lps": result.matrix_lps.round(5).tolist(), "transform": str(args.out)}, args.json)
    wrote(args.json)
    return 0
