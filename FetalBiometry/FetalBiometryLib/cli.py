"""`deepnav fetal measure|train|evaluate`."""

from __future__ import annotations

import argparse
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
from deepnav.outputs import distinct_names, require_writable_folder
from deepnav.progress import console, print_progress

# `deepnav fetal ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "fetal"
TRAIN_CONFIG = "FetalBiometryLib.training:TrainConfig"  # where train's hyper-parameter defaults live
NOTHING_MEASURED = 3  # exit status of `fetal measure` when no image could be measured (2: bad input, before any work)
HELP = "fetal head biometry from 2D ultrasound (FetalBiometry)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="head circumference, BPD and OFD from 2D ultrasound images",
                       epilog=examples(
                           "deepnav fetal measure 279_HC.png --pixel-size 0.13 --json hc.json --overlay pictures/",
                           "deepnav fetal measure hc18/test_set/*.png --pixel-size-csv hc18/test_set_pixel_size.csv "
                           "--json - > hc.json",
                           before="Exit status: 0 when at least one image was measured (the others have "
                                  "\"hc_mm\": null and a reason), 3 when none was, 2 for bad input found before "
                                  "any work (a missing image, an absurd --pixel-size, an output that cannot be "
                                  "written)."))
    p.add_argument("images", type=Path, nargs="+", help="2D ultrasound images (PNG, JPEG, DICOM)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--pixel-size", type=float, metavar="MM",
                      help="pixel size in mm, for all images (default: a DICOM's own Pixel Spacing)")
    size.add_argument("--pixel-size-csv", type=Path,
                      help="HC18-style CSV: filename,pixel size(mm),... (default: --pixel-size)")
    add_json_option(p, "the measurements, one row per image")
    p.add_argument("--overlay", type=Path, metavar="DIR",
                   help="write a picture per image here: ellipse, axes and values (default: none)")
    p.add_argument("--model", type=Path, help="head segmentation model (default: the shipped one)")
    add_device_option(p)
    p.set_defaults(run=_measure, distributed=True)  # also under torchrun: the images shared out

    p = sub.add_parser("train", help="train the head segmentation network on HC18-style data",
                       epilog=examples("deepnav fetal train --data ../shared/data/hc18 --out model/",
                                       "deepnav fetal train --data hc18 --limit 40 --epochs 2 --out quick/"))
    p.add_argument("--data", type=Path, required=True, help="folder with training_set/ and the pixel-size CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints, history and the model")
    config_option(p, "--epochs", TRAIN_CONFIG, type=int, help="epochs")
    config_option(p, "--batch", TRAIN_CONFIG, type=int, help="images per step")
    config_option(p, "--lr", TRAIN_CONFIG, type=float, help="learning rate")
    config_option(p, "--width", TRAIN_CONFIG, type=int, help="network width (channels of the first layer)")
    config_option(p, "--init", TRAIN_CONFIG, type=str, metavar="MODEL",
                  help="start from this model's weights (a model file, e.g. the shipped one; fine-tuning; "
                       "default: from scratch)")
    config_option(p, "--restarts", TRAIN_CONFIG, type=int,
                  help="cosine learning-rate cycles over the epochs (warm restarts; each cycle's end saved as cycle<k>.pt)")
    config_option(p, "--boundary-weight", TRAIN_CONFIG, type=float,
                  help="extra cross-entropy weight within --boundary-px working pixels of the head's edge")
    config_option(p, "--boundary-px", TRAIN_CONFIG, type=int, help="half-width of that band")
    config_option(p, "--canvas", TRAIN_CONFIG, "canvas_hw", type=str, metavar="ROWSxCOLS",
                  help="the network's input, multiples of 8; sets the working scale (an image is scaled so that a "
                       "0.9 corner crop fits it: 176x256 puts an 800x540 image at 284x192, 248x360 at 400x270), "
                       "stored in the model file and used by measure and evaluate")
    config_option(p, "--val-every", TRAIN_CONFIG, type=int,
                  help="validate every N epochs (0: never; the last epoch is kept)")
    config_option(p, "--keep", TRAIN_CONFIG, choices=("best", "last"),
                  help="which weights become the model: best on the validation images, or the last epoch's")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of fetuses kept for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, initialisation, augmentation)")
    p.add_argument("--limit", type=int, help="use only the first N images, for quick runs (default: all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    add_device_option(p)
    p.set_defaults(run=_train, distributed=True)  # also under torchrun (deepnav.distributed)

    p = sub.add_parser("evaluate", help="HC, Dice and Hausdorff against HC18-style annotations",
                       epilog=examples("deepnav fetal evaluate --data ../shared/data/hc18 --json eval.json"))
    p.add_argument("--data", type=Path, required=True, help="HC18-style folder (training_set/ with annotations)")
    p.add_argument("--split", choices=("validation", "all"), default="validation",
                   help="validation: the fetuses the model never trained on (its card's split); all: every image")
    p.add_argument("--model", type=Path, help="head segmentation model (default: the shipped one)")
    add_device_option(p)
    add_json_option(p, "the report")
    p.set_defaults(run=_evaluate)


def _segmenter(args):
    # said before torch is imported and the model read: the command's first seconds
    console.stage(f"loading the model ({args.model or 'shipped'}, device {args.device}, {args.precision})")
    from deepnav.torch_runtime import configure_threads, describe_device
    from FetalBiometryLib.segment import HeadSegmenter

    configure_threads()
    segmenter = HeadSegmenter.load(args.model, args.device, args.precision)
    print_progress(1.0, f"{segmenter.path.name} on {describe_device(segmenter.device)}")
    return segmenter


def _measure(args) -> int:
    from FetalBiometryLib.hc18 import csv_pixel_size, read_pixel_sizes
    from FetalBiometryLib.image_io import check_pixel_size

    # Inputs and outputs checked before any work (exit 2): a batch must not run for minutes to
    # report that an image was never there.
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(args.images)} images not found: {', '.join(missing)}")
    if args.pixel_size is not None:
        check_pixel_size(args.pixel_size, "--pixel-size")
    table = read_pixel_sizes(args.pixel_size_csv) if args.pixel_size_csv else {}
    by_name: dict[str, set[Path]] = {}
    for path in args.images:
        by_name.setdefault(path.name, set()).add(path.resolve())
    shared = sorted(name for name, paths in by_name.items() if len(paths) > 1)
    if args.pixel_size_csv and shared:
        raise InputError(f"{', '.join(shared)}: several images share this name, and {args.pixel_size_csv} gives pixel "
                         "sizes by name: measure each folder with its own CSV")
    require_json_target(args.json)
    if args.overlay:
        require_writable_folder(args.overlay, "overlay folder")

    segmenter = _segmenter(args)
    from deepnav import distributed
    from FetalBiometryLib.overlay import write_overlay
    from FetalBiometryLib.pipeline import measure_file

    console.stage(f"measuring {len(args.images)} image(s)")
    rows = []
    # inputs from two folders may share a name: each gets its own overlay
    overlay_names = distinct_names([f"{path.stem}_overlay" for path in args.images])
    mine = set(distributed.shard(range(len(args.images))))  # under torchrun this process's share; else all
    for n, (path, overlay_name) in enumerate(zip(args.images, overlay_names, strict=True)):
        if n not in mine:
            continue
        print_progress(n / len(args.images), path.name)
        given, why_none = args.pixel_size, None  # None: the file's own (DICOM)
        if args.pixel_size_csv:
            given, why_none = csv_pixel_size(table, args.pixel_size_csv, path)
        row, result = measure_file(segmenter, path, given, why_none)
        if row["hc_mm"] is None:
            console.warn(f"{path}: not measurable: {row['reason']}")
        else:
            console.say(f"{path}: HC {row['hc_mm']:.1f} mm, BPD {row['bpd_mm']:.1f} mm, OFD {row['ofd_mm']:.1f} mm"
                  + (f"  [{'; '.join(row['flags'])}]" if row["flags"] else ""))
        if args.overlay and result is not None:
            row["overlay"] = str(write_overlay(result, args.overlay / f"{overlay_name}.png", row.get("pixel_mm")))
        rows.append(row)
    print_progress(1.0, "done")
    rows = distributed.gather(rows)  # every process's rows, in the order of the images
    if not distributed.is_main():  # rank 0 writes the JSON and reports
        return 0 if any(row["hc_mm"] is not None for row in rows) else NOTHING_MEASURED
    write_json({"images": rows}, args.json)
    measured = sum(row["hc_mm"] is not None for row in rows)
    console.say(f"measured {measured} of {len(rows)} images")
    wrote(args.json)
    return 0 if measured else NOTHING_MEASURED


def _train(args) -> int:
    require_writable_folder(args.out)  # refused before anything else is said or imported
    console.stage("reading the training images")  # torch's import first: seconds
    from deepnav.torch_runtime import configure_threads, pick_device
    from FetalBiometryLib import crops, hc18, training

    configure_threads()
    config = training.TrainConfig(seed=args.seed)
    for name in ("epochs", "batch", "lr", "width", "init", "restarts", "boundary_weight", "boundary_px", "val_every",
                 "keep"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.canvas is not None:
        try:
            config.canvas_hw = crops.check_canvas(args.canvas)
        except ValueError as exc:
            raise InputError(f"--canvas: {exc}") from None
    cases = hc18.find_cases(args.data)[: args.limit] if args.limit else hc18.find_cases(args.data)
    train_cases, val_cases = hc18.split_by_subject(cases, args.val_fraction, args.seed)
    split = {"seed": args.seed, "val_fraction": args.val_fraction, "train_images": len(train_cases),
             "validation_images": len(val_cases), "validation_subjects": sorted({c.subject for c in val_cases})}
    console.stage(f"training on {len(train_cases)} images, validating on {len(val_cases)} (split by fetus)")
    _, info = training.train(train_cases, val_cases, args.out, config, device=pick_device(args.device),
                             resume=args.resume, metadata={"data": str(args.data), "split": split},
                             precision=args.precision)
    if info["model"] is None:  # not rank 0 of a torchrun job: rank 0 writes the model and reports
        return 0
    b = info["best"]
    scores = f"|HC diff| {b['hc_mae_mm']:.2f} mm, Dice {b['dice']:.4f}" if b.get("dice") else "nothing measurable yet"
    if "not_measurable" not in b:  # never validated (--val-every 0)
        console.say(f"kept epoch {b['epoch'] + 1} (not validated); wrote {info['model']}")
        return 0
    console.say(f"{'best' if config.keep == 'best' else 'last'} validation (epoch {b['epoch'] + 1}): {scores}, "
                f"{b['not_measurable']} not measurable; wrote {info['model']}")
    return 0


def _evaluate(args) -> int:
    require_json_target(args.json)
    segmenter = _segmenter(args)
    from FetalBiometryLib import hc18
    from FetalBiometryLib.evaluation import evaluate, format_table

    cases = hc18.find_cases(args.data)
    if args.split == "validation":
        split = segmenter.metadata.get("split")
        if not split:
            raise InputError("this model records no validation split: use --split all")
        cases = [c for c in cases if c.subject in set(split["validation_subjects"])]
    console.stage(f"evaluating on {len(cases)} images")
    report = evaluate(segmenter, cases, progress=print_progress)
    report["model"] = str(segmenter.path)
    report["split"] = args.split
    console.say(format_table(report["summary"]))
    write_json(report, args.json)
    wrote(args.json)
    return 0
