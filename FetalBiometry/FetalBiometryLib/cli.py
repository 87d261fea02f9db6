"""`deepnav fetal measure|train|evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepnav.errors import InputError
from deepnav.progress import print_progress

# `deepnav fetal ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "fetal"
HELP = "fetal head biometry from 2D ultrasound (FetalBiometry)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="head circumference, BPD and OFD from 2D ultrasound images")
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
    from FetalBiometryLib.hc18 import read_pixel_sizes
    from FetalBiometryLib.overlay import write_overlay
    from FetalBiometryLib.pipeline import measure_file

    segmenter = _segmenter(args)
    table = read_pixel_sizes(args.pixel_size_csv) if args.pixel_size_csv else {}
    rows = []
    for path in args.images:
        given = args.pixel_size if args.pixel_size is not None else table.get(path.name, (None,))[0]
        row, result = measure_file(segmenter, path, given)
        if row["hc_mm"] is None:
            print(f"{path.name}: not measurable: {row['reason']}")
        else:
            print(f"{path.name}: HC {row['hc_mm']:.1f} mm, BPD {row['bpd_mm']:.1f} mm, OFD {row['ofd_mm']:.1f} mm"
                  + (f"  [{'; '.join(row['flags'])}]" if row["flags"] else ""))
        if args.overlay and result is not None:
            row["overlay"] = str(write_overlay(result, args.overlay / (path.stem + "_overlay.png")))
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


def _train(args) -> int:
    from deepnav.torch_runtime import configure_threads, pick_device
    from FetalBiometryLib import hc18, training

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
