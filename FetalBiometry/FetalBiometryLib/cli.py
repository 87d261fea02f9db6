"""`deepnav fetal measure|train|evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepnav.errors import InputError
from deepnav.outputs import distinct_names, require_writable_folder
from deepnav.progress import print_progress

# `deepnav fetal ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "fetal"
NOTHING_MEASURED = 3  # exit status of `fetal measure` when no image could be measured (2: bad input, before any work)
HELP = "fetal head biometry from 2D ultrasound (FetalBiometry)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="head circumference, BPD and OFD from 2D ultrasound images",
                       description="Exit status: 0 when at least one image was measured (the others have "
                                   "\"hc_mm\": null and a reason), 3 when none was, 2 for bad input found before "
                                   "any work (a missing image, an absurd --pixel-size, an output that cannot be "
                                   "written).")
    p.add_argument("images", type=Path, nargs="+")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--pixel-size", type=float, metavar="MM", help="pixel size in mm (all images)")
    size.add_argument("--pixel-size-csv", type=Path, help="HC18-style CSV: filename,pixel size(mm),...")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--overlay", type=Path, metavar="DIR", help="write ellipse/contour pictures here")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_measure)

    p = sub.add_parser("train", help="train the head segmentation network on HC18-style data")
    p.add_argument("--data", type=Path, required=True, help="folder with training_set/ and the pixel-size CSV")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--width", type=int, help="network width (channels of the first layer)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N images (quick runs)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_train)

    p = sub.add_parser("evaluate", help="HC, Dice and Hausdorff against HC18-style annotations")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", choices=("validation", "all"), default="validation",
                   help="validation: the fetuses the model never trained on (its card's split)")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=_evaluate)


def _segmenter(args):
    from deepnav.torch_runtime import configure_threads, describe_device
    from FetalBiometryLib.segment import HeadSegmenter

    configure_threads()
    segmenter = HeadSegmenter.load(args.model, args.device)
    print_progress(0.0, f"model {segmenter.path.name} on {describe_device(segmenter.device)}")
    return segmenter


def _measure(args) -> int:
    from FetalBiometryLib.hc18 import csv_pixel_size, read_pixel_sizes
    from FetalBiometryLib.image_io import check_pixel_size
    from FetalBiometryLib.overlay import write_overlay
    from FetalBiometryLib.pipeline import measure_file

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
    require_writable_folder(args.json.parent, "folder of --json")
    if args.overlay:
        require_writable_folder(args.overlay, "overlay folder")

    segmenter = _segmenter(args)
    rows = []
    # inputs from two folders may share a name: each gets its own overlay
    overlay_names = distinct_names([f"{path.stem}_overlay" for path in args.images])
    for path, overlay_name in zip(args.images, overlay_names, strict=True):
        given, why_none = args.pixel_size, None  # None: the file's own (DICOM)
        if args.pixel_size_csv:
            given, why_none = csv_pixel_size(table, args.pixel_size_csv, path)
        row, result = measure_file(segmenter, path, given, why_none)
        if row["hc_mm"] is None:
            print(f"{path}: not measurable: {row['reason']}")
        else:
            print(f"{path}: HC {row['hc_mm']:.1f} mm, BPD {row['bpd_mm']:.1f} mm, OFD {row['ofd_mm']:.1f} mm"
                  + (f"  [{'; '.join(row['flags'])}]" if row["flags"] else ""))
        if args.overlay and result is not None:
            row["overlay"] = str(write_overlay(result, args.overlay / f"{overlay_name}.png"))
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": rows}, indent=2))
    measured = sum(row["hc_mm"] is not None for row in rows)
    print(f"measured {measured} of {len(rows)} images; wrote {args.json}")
    return 0 if measured else NOTHING_MEASURED


def _train(args) -> int:
    from deepnav.torch_runtime import configure_threads, pick_device
    from FetalBiometryLib import hc18, training

    require_writable_folder(args.out)
    configure_threads()
    config = training.TrainConfig(seed=args.seed)
    for name in ("epochs", "batch", "lr", "width"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    cases = hc18.find_cases(args.data)[: args.limit] if args.limit else hc18.find_cases(args.data)
    train_cases, val_cases = hc18.split_by_subject(cases, args.val_fraction, args.seed)
    split = {"seed": args.seed, "val_fraction": args.val_fraction, "train_images": len(train_cases),
             "validation_images": len(val_cases), "validation_subjects": sorted({c.subject for c in val_cases})}
    print_progress(0.0, f"{len(train_cases)} training and {len(val_cases)} validation images (split by fetus)")
    _, info = training.train(train_cases, val_cases, args.out, config, device=pick_device(args.device),
                             resume=args.resume, metadata={"data": str(args.data), "split": split})
    b = info["best"]
    scores = f"|HC diff| {b['hc_mae_mm']:.2f} mm, Dice {b['dice']:.4f}" if b.get("dice") else "nothing measurable yet"
    print(f"best validation (epoch {b['epoch'] + 1}): {scores}, {b['not_measurable']} not measurable; wrote {info['model']}")
    return 0


def _evaluate(args) -> int:
    from FetalBiometryLib import hc18
    from FetalBiometryLib.evaluation import evaluate, format_table

    require_writable_folder(args.json.parent, "folder of --json")
    segmenter = _segmenter(args)
    cases = hc18.find_cases(args.data)
    if args.split == "validation":
        split = segmenter.metadata.get("split")
        if not split:
            raise InputError("this model records no validation split: use --split all")
        cases = [c for c in cases if c.subject in set(split["validation_subjects"])]
    report = evaluate(segmenter, cases, progress=print_progress)
    report["model"] = str(segmenter.path)
    report["split"] = args.split
    print(format_table(report["summary"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0
