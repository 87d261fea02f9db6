"""`deepnav fusion phantom|train|register|serve|demo|bench-stream|evaluate`."""

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
from deepnav.outputs import distinct_names, image_stem, require_writable_folder
from deepnav.progress import console, print_progress

# `deepnav fusion ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "fusion"
TRAIN_CONFIG = "MRUSFusionLib.training:TrainConfig"  # where train's hyper-parameter defaults live
HELP = "MR / 3D-ultrasound fusion (MRUSFusion)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic liver patient (MR, labels, landmarks, US breathing sequence)",
                       epilog=examples("deepnav fusion phantom --seed 3 --frames 8 --out patient/"))
    p.add_argument("--seed", type=int, default=0, help="which synthetic patient (the same seed, the same patient)")
    p.add_argument("--frames", type=int, default=8, help="US frames over half a breathing cycle")
    p.add_argument("--oblique", choices=("auto", "yes", "no"), default="auto",
                   help="oblique MR direction (auto: odd seeds)")
    p.add_argument("--format", choices=(".nrrd", ".nii.gz"), default=".nrrd", help="image file format")
    p.add_argument("--out", type=Path, required=True, help="folder for the patient's files and patient.json")
    p.set_defaults(run=_phantom)

    p = sub.add_parser("train", help="train the rigid + B-spline cascade for one patient (or on synthetic patients)",
                       epilog=examples("deepnav fusion train --mr mr.nrrd --mr-vessels mr_vessels.nrrd --us us_*.nrrd "
                                       "--us-vessels us_*_vessels.nrrd --init shipped.pt --out model/",
                                       "deepnav fusion train --synthetic 16 --out model/"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mr", type=Path, help="preoperative MR (train on this patient's files)")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic patients instead")
    p.add_argument("--mr-vessels", type=Path, help="vessel label map on the MR grid (required with --mr)")
    p.add_argument("--liver", type=Path,
                   help="liver mask on the MR grid (centres the 128 mm region; default: the MR's centre)")
    p.add_argument("--us", type=Path, nargs="+",
                   help="training US volumes, e.g. 8 over half a breathing cycle (required with --mr)")
    p.add_argument("--us-vessels", type=Path, nargs="+", help="their vessel label maps, same order (required with --mr)")
    p.add_argument("--val-frames", type=int, default=1, help="US frames held out for validation (file mode)")
    p.add_argument("--frames", type=int, default=8, help="frames per synthetic patient")
    p.add_argument("--val-patients", type=int, default=2, help="synthetic patients held out for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed (patients, initialisation, sampling)")
    config_option(p, "--rigid-epochs", TRAIN_CONFIG, type=int, help="epochs of the rigid stage")
    config_option(p, "--bspline-epochs", TRAIN_CONFIG, type=int, help="epochs of the B-spline stage")
    config_option(p, "--steps-per-epoch", TRAIN_CONFIG, type=int, help="optimiser steps per epoch")
    p.add_argument("--batch", type=int, help="pairs per step in each process (default 1; under torchrun the "
                                             "global batch is processes x this)")
    p.add_argument("--weights", type=float, nargs=3, metavar=("LABEL", "MIND", "SMOOTH"),
                   help="loss weights (default 100 0.01 1: labels main; the spec's other reading is 0.01 100 1)")
    config_option(p, "--lr-rigid", TRAIN_CONFIG, type=float, help="learning rate of the rigid stage")
    config_option(p, "--lr-bspline", TRAIN_CONFIG, type=float, help="learning rate of the B-spline stage")
    p.add_argument("--constant-lr", action="store_true", help="no cosine decay of the learning rate within each stage")
    config_option(p, "--weight-average", TRAIN_CONFIG, type=float, metavar="DECAY",
                  help="validate and keep an exponential moving average of the weights (e.g. 0.99; 0: off)")
    p.add_argument("--landmark-weight", type=float, nargs=2, metavar=("RIGID", "BSPLINE"),
                   help="synthetic patients: add the mean landmark error (mm, known truth) to the rigid and "
                        "B-spline losses with these weights (default 0 0: the spec's losses alone)")
    config_option(p, "--augment-shift", TRAIN_CONFIG, type=float, help="random extra US shift, voxels (0: none)")
    config_option(p, "--augment-rotation", TRAIN_CONFIG, "augment_rotation_deg", type=float,
                  help="random extra US rotation, degrees (0: none)")
    p.add_argument("--init", type=Path,
                   help="start from this model (.pt), e.g. the shipped one, to fine-tune (default: from scratch)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    add_device_option(p)
    p.add_argument("--out", type=Path, required=True,
                   help="folder for checkpoint.pt, best.pt, history.json, model.pt and model.pt2")
    p.set_defaults(run=_train, distributed=True)  # also under torchrun (deepnav.distributed)

    p = sub.add_parser(
        "register", help="register US volume(s) to an MR and write the transforms",
        epilog=examples("deepnav fusion register --mr patient/mr.nrrd --us patient/us_05.nrrd "
                        "--liver patient/mr_liver.nrrd --out reg/     # -> reg/us_05/transform.h5, ...",
                        "deepnav fusion register --mr mr.nrrd --us us_*.nrrd --initial fiducials.tfm --fast --out reg/"))
    p.add_argument("--mr", type=Path, required=True, help="preoperative MR (the fixed image)")
    p.add_argument("--us", type=Path, nargs="+", required=True, help="US volume(s), each registered to the MR")
    p.add_argument("--liver", type=Path,
                   help="liver mask on the MR grid (centres the 128 mm region; default: the MR's centre)")
    p.add_argument("--initial", type=Path, help="linear transform file (MR LPS -> US LPS) applied before the network "
                                                "(default: none, the scanner's geometry)")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    p.add_argument("--fast", action="store_true",
                   help="the network alone, without the MIND-SSC correction stage (~0.4 s instead of ~2 s on a CPU)")
    add_device_option(p)
    p.add_argument("--out", type=Path, required=True,
                   help="folder; each US volume's results go to OUT/<its name>/")
    p.set_defaults(run=_register)

    p = sub.add_parser("serve", help="the OpenIGTLink fusion service: register each incoming US volume to the MR",
                       epilog=examples("deepnav fusion serve --mr mr.nrrd --liver mr_liver.nrrd --port 18944",
                                       "deepnav fusion serve --mr mr.nrrd --connect plus-server:18944 --fast"))
    p.add_argument("--mr", type=Path, help="preoperative MR (default: the built-in synthetic patient)")
    p.add_argument("--liver", type=Path,
                   help="liver mask on the MR grid (centres the 128 mm region; default: the MR's centre)")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    add_device_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=18944, help="port to listen on")
    p.add_argument("--connect", metavar="HOST:PORT",
                   help="connect out to a US source (e.g. a PLUS server) instead (default: listen)")
    p.add_argument("--us-device", action="append", metavar="NAME",
                   help="IMAGE device name(s) to register (default: any)")
    p.add_argument("--fast", action="store_true",
                   help="the network's results only (default: each frame's corrected result follows its network "
                        "result, a few seconds later on a CPU, unless a newer frame is waiting)")
    p.add_argument("--echo", action="store_true", help="send each volume straight back (transport test)")
    p.add_argument("--max-frames", type=int, help="stop after this many registered frames (default: no limit)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until stopped)")
    p.add_argument("--max-clients", type=int, default=8,
                   help="peers served at once (one reader thread each); more are refused with a STATUS")
    p.set_defaults(run=_serve)

    p = sub.add_parser("demo", help="live fusion demo: the service and a simulated scanner over loopback OpenIGTLink",
                       epilog=examples("deepnav fusion demo --frames 24 --rate 2 --out demo-output/",
                                       "deepnav fusion demo --us case3_us.nii.gz case4_us.nii.gz"))
    p.add_argument("--frames", type=int, default=24, help="frames to stream")
    p.add_argument("--rate", type=float, default=2.0, help="scanner frame rate, Hz")
    p.add_argument("--us", type=Path, nargs="+",
                   help="replay these US volumes (default: the built-in synthetic patient's breathing sequence)")
    p.add_argument("--mr", type=Path, help="MR for --us (default: the first US volume is the reference)")
    p.add_argument("--liver", type=Path,
                   help="liver mask on the --mr grid (centres the 128 mm region; default: the MR's centre)")
    p.add_argument("--correct", action="store_true", help="the service also sends each frame's corrected result")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the pictures and the reports")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench-stream", help="streaming latency, throughput and memory, fusion against transport alone",
                       epilog=examples("deepnav fusion bench-stream --frames 300 --rate 2 --json stream.json"))
    p.add_argument("--frames", type=int, default=300, help="frames streamed per volume size and mode")
    p.add_argument("--rate", type=float, default=2.0, help="scanner frame rate, Hz")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="cubic uint8 volume sizes")
    p.add_argument("--correct", action="store_true", help="also stream to a service that sends corrected results")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    add_device_option(p)
    add_json_option(p, "the measurements")
    p.set_defaults(run=_bench_stream)

    p = sub.add_parser("evaluate", help="accuracy and speed on unseen synthetic patients, against SimpleITK",
                       epilog=examples("deepnav fusion evaluate --cases 5 --seed 1 --json eval.json",
                                       "deepnav fusion evaluate --cases 2 --no-baseline --json - | jq .summary"))
    p.add_argument("--cases", type=int, default=5, help="synthetic patients")
    p.add_argument("--seed", type=int, default=1, help="the first patient's seed (never one used in training)")
    p.add_argument("--frames", type=int, default=2, help="US frames per case (start and end of the half cycle)")
    p.add_argument("--no-baseline", action="store_true", help="skip the SimpleITK comparison (faster)")
    p.add_argument("--no-correction", action="store_true", help="the network alone (as register --fast)")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    add_device_option(p)
    add_json_option(p, "the report")
    p.set_defaults(run=_evaluate)


def _load(args):
    # said before torch is imported and the model read: the command's first seconds
    console.stage(f"loading the model ({args.model or 'shipped'}, device {args.device}, {args.precision})")
    from deepnav.torch_runtime import configure_threads, describe_device
    from MRUSFusionLib.model_io import load_model

    configure_threads()
    model = load_model(args.model, args.device, args.precision)
    print_progress(1.0, f"{model.path.name} on {describe_device(model.device)}")
    return model


def _phantom(args) -> int:
    require_writable_folder(args.out)
    console.stage(f"making synthetic patient {args.seed}")
    from MRUSFusionLib.patient_files import write_patient
    from MRUSFusionLib.phantom import make_patient

    oblique = None if args.oblique == "auto" else args.oblique == "yes"
    index = write_patient(make_patient(args.seed, frames=args.frames, oblique=oblique), args.out, args.format)
    console.say(f"wrote synthetic patient {args.seed} ({len(index['frames'])} US frames) to {args.out}")
    return 0


def _train(args) -> int:
    require_writable_folder(args.out)  # refused before anything else is said or imported
    console.stage("preparing the training data")  # before torch's import: seconds
    from deepnav import distributed
    from deepnav.progress import silent
    from deepnav.torch_runtime import configure_threads, pick_device
    from MRUSFusionLib import dataset, losses, model_io, training

    configure_threads()
    config = (training.checkpoint_config(args.out) if args.resume else None) or training.TrainConfig(seed=args.seed)
    overrides = {"rigid_epochs": args.rigid_epochs, "bspline_epochs": args.bspline_epochs,
                 "steps_per_epoch": args.steps_per_epoch, "batch": args.batch,
                 "lr_rigid": args.lr_rigid, "lr_bspline": args.lr_bspline,
                 "augment_shift": args.augment_shift, "augment_rotation_deg": args.augment_rotation,
                 "weight_average": args.weight_average}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if args.landmark_weight:
        if not args.synthetic:
            raise InputError("--landmark-weight needs --synthetic: a patient's own files carry no known landmark truth")
        config.landmark_weight_rigid, config.landmark_weight_bspline = args.landmark_weight
    if args.constant_lr:
        config.lr_decay = False
    if args.weights:
        config.weights = losses.LossWeights(*args.weights)
    if args.synthetic:
        if args.synthetic <= args.val_patients:
            raise InputError(f"--synthetic {args.synthetic} leaves no training patient after {args.val_patients} for validation")
        seeds = dataset.training_seeds(args.seed, args.synthetic)
        n_train = len(seeds) - args.val_patients
        if n_train < distributed.world().size:
            raise InputError(f"--synthetic {args.synthetic} leaves {n_train} training patients for "
                             f"{distributed.world().size} processes: each needs at least one")
        # under torchrun each process makes its own share of the patients (none is made twice)
        mine = distributed.shard(seeds[:n_train]) + distributed.shard(seeds[n_train:])
        print_progress(0.0, f"generating {len(mine)} synthetic patients x {args.frames} frames"
                       + (f" ({distributed.world().describe()})" if distributed.world().active else ""))
        pools = dataset.synthetic_samples(mine, args.frames, workers=dataset.generation_workers(),
                                          progress=print_progress if distributed.is_main() else silent)
        n_mine = len(distributed.shard(seeds[:n_train]))
        train_samples = [s for pool in pools[:n_mine] for s in pool]
        val_samples = [pool[i] for pool in pools[n_mine:] for i in dataset.validation_frames(len(pool))]
        source = {"kind": "synthetic", "patient_seeds": seeds, "frames": args.frames, "validation_patients": seeds[n_train:]}
    else:
        if not (args.mr_vessels and args.us and args.us_vessels):
            raise InputError("file training needs --mr, --mr-vessels, --us and --us-vessels")
        samples = dataset.file_samples(args.mr, args.mr_vessels, args.us, args.us_vessels, args.liver)
        train_samples, val_samples, val_idx = training.split_frames(samples, args.val_frames)
        val_samples = distributed.shard(val_samples)  # each process validates its share
        source = {"kind": "files", "mr": str(args.mr), "us": [str(p) for p in args.us], "validation_frames": val_idx}
    init = model_io.load_model(args.init, "cpu").eager().state_dict() if args.init else None
    console.stage("training")
    path, info = training.train_and_save(train_samples, val_samples, args.out, config, source=source,
                                         device=pick_device(args.device), resume=args.resume, init_state=init,
                                         precision=args.precision)
    if path is None:  # not rank 0 of a torchrun job: rank 0 reports and writes
        return 0
    best = info["best"]
    # the score the best epoch was chosen by: landmark TRE where the truth is known (synthetic)
    chosen_by = f"landmark TRE {best['tre_mm']:.2f} mm, " if "tre_mm" in best else ""
    console.say(f"best validation (epoch {best['epoch'] + 1}): {chosen_by}vessel Dice {best['vessel_dice']:.3f}; "
          f"wrote {path} and {path.with_suffix('.pt2')}")
    return 0


def _register(args) -> int:
    require_writable_folder(args.out)
    model = _load(args)  # says so first: the imports below and the model's take seconds
    import SimpleITK as sitk

    from deepnav.imaging import read_volume
    from MRUSFusionLib.overlay import write_png
    from MRUSFusionLib.registration import MRSideCache, overlay_picture, register

    mr = read_volume(args.mr, what="MR")
    liver = read_volume(args.liver, what="liver mask") if args.liver else None
    initial = None
    if args.initial:
        try:
            initial = sitk.ReadTransform(str(args.initial))
        except RuntimeError as exc:
            raise InputError(f"cannot read transform {args.initial}") from exc
    # one folder per US volume, named after it, whether one volume is given or many: a script
    # finds OUT/<name>/transform.h5 without knowing how many came with it
    names = distinct_names([image_stem(p) for p in args.us])
    # one stage for the batch: its bar moves volume by volume, so the ETA is the batch's
    console.stage(f"registering {len(args.us)} US volume(s)" + ("" if args.fast else ", network then correction"))
    mr_side = MRSideCache()  # volumes of one sweep share their region: the MR's features are made once
    for n, (us_path, name) in enumerate(zip(args.us, names, strict=True)):
        print_progress(n / len(args.us), us_path.name)
        us = read_volume(us_path, what="US volume")
        result = register(model, mr, us, liver=liver, initial=initial, correct=not args.fast, mr_side=mr_side)
        out = args.out / name
        paths = result.write(out)
        paths["overlay"] = write_png(overlay_picture(result, mr, us, initial), out / "overlay.png")
        # quality(): MIND (radius 1, 2 mm) and folding of the network's answer on its own grid
        quality = result.quality()
        record = {"us": str(us_path), "stage": result.stage, "timings_s": result.timings,
                  **(quality if result.correction is None else {"network": quality}),
                  "files": {k: v.name for k, v in paths.items()}}
        summary = f"network {result.timings['network']:.2f} s"
        if result.correction is not None:
            c = result.correction
            record["correction"] = c.report
            record["registration_region"] = {"size": list(c.region.size_ijk), "spacing_mm": c.region.spacing.tolist(),
                                             "origin_lps": c.region.origin.tolist(),
                                             "direction_lps": c.region.direction.flatten().tolist()}
            summary += (f", correction {c.timings['total']:.2f} s from the {c.report['start']} alignment "
                        f"(MIND-SSC {c.report['mind_ssc_before']:.3f} -> {c.report['mind_ssc_after']:.3f}, "
                        f"inliers {100 * c.report['inlier_share']:.0f}%)")
        (out / "registration.json").write_text(json.dumps(record, indent=2))
        console.say(f"{us_path.name}: {summary}, folding {result.folding_percent():.3f}% -> {out}")
        if result.correction is not None and result.correction.report["flags"]:
            console.warn(f"{us_path.name}: check {', '.join(result.correction.report['flags'])} (see registration.json)")
    print_progress(1.0, "done")
    return 0


def _serve(args) -> int:
    import logging
    import signal

    connect = None
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--connect wants HOST:PORT, got {args.connect!r}")
        connect = (host, int(port))
    console.stage("starting the fusion service")  # before torch's import: seconds
    from deepnav.imaging import read_volume
    from MRUSFusionLib.service import EchoProcessor, FusionProcessor, FusionService

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.echo:
        processor = EchoProcessor()
    else:
        model = _load(args)
        if args.mr:
            mr = read_volume(args.mr, what="MR")
            liver = read_volume(args.liver, what="liver mask") if args.liver else None
        else:
            from MRUSFusionLib.demo import DEMO_PATIENT_SEED
            from MRUSFusionLib.phantom import make_patient

            print_progress(0.0, f"no --mr: serving the built-in synthetic patient {DEMO_PATIENT_SEED}")
            patient = make_patient(DEMO_PATIENT_SEED, frames=1)  # the MR does not depend on the frames
            mr, liver = patient.mr, patient.liver
        processor = FusionProcessor(model, mr, liver, correct=not args.fast)
        console.stage("warming up")
        processor.warm_up()
    service = FusionService(processor, host=args.host, port=args.port, devices=tuple(args.us_device or ()),
                            connect=connect, max_frames=args.max_frames, max_clients=args.max_clients)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    try:
        service.start()
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    try:
        service.wait(args.duration)
    finally:
        service.close()
    stats = service.stats()
    console.say(f"stopped: {stats['frames_processed']} frames registered, {stats['frames_dropped']} dropped, "
          f"{stats['errors']} rejected messages")
    return 0


def _demo(args) -> int:
    require_writable_folder(args.out)
    model = _load(args)
    from MRUSFusionLib.demo import run_demo

    console.stage("live demo")
    report = run_demo(model, args.out, frames=args.frames, rate_hz=args.rate, us_files=args.us, mr_file=args.mr,
                      liver_file=args.liver, correct=args.correct)
    e2e = report["end_to_end_s"]
    console.say(f"{report['frames_completed']}/{report['frames']} frames fused, {report['dropped_frames']} dropped; "
          f"end to end p50 {e2e['p50'] * 1000:.0f} ms, p95 {e2e['p95'] * 1000:.0f} ms; "
          + (f"corrected ({report['corrected_frames']} frames) p50 {report['corrected_end_to_end_s']['p50']:.1f} s; "
             if report.get("corrected_frames") else "") +
          f"geometry intact: {report['geometry_intact']}")
    for row in report["per_frame"]:
        if "overlay" in row:
            console.say(f"  overlay: {(args.out / row['overlay']).resolve()}")
    console.say(f"latency report: {(args.out / 'report.md').resolve()} (and report.json)")
    return 0


def _bench_stream(args) -> int:
    require_json_target(args.json)
    model = _load(args)
    from MRUSFusionLib.stream_benchmark import format_table, run_benchmark

    console.stage("streaming")
    report = run_benchmark(model, frames=args.frames, rate_hz=args.rate, sizes=args.sizes, correct=args.correct)
    console.say(format_table(report))
    write_json(report, args.json)
    wrote(args.json)
    return 0


def _evaluate(args) -> int:
    require_json_target(args.json)
    model = _load(args)
    from MRUSFusionLib.evaluation import evaluate, format_table

    console.stage(f"evaluating on {args.cases} synthetic patients")
    report = evaluate(model, args.cases, args.seed, frames=args.frames, baseline=not args.no_baseline,
                      correct=not args.no_correction)
    console.say(format_table(report))
    write_json(report, args.json)
    wrote(args.json)
    return 0
