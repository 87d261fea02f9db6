"""`deepnav fusion phantom|train|register|serve|demo|bench-stream|evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepnav.errors import InputError
from deepnav.outputs import distinct_names, image_stem, require_writable_folder
from deepnav.progress import print_progress

# `deepnav fusion ...`: found by deepnav.cli through the "deepnav.commands" entry point
COMMAND = "fusion"
HELP = "MR / 3D-ultrasound fusion (MRUSFusion)"


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic liver patient (MR, labels, landmarks, US breathing sequence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--oblique", choices=("auto", "yes", "no"), default="auto",
                   help="oblique MR direction (auto: odd seeds)")
    p.add_argument("--format", choices=(".nrrd", ".nii.gz"), default=".nrrd")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_phantom)

    p = sub.add_parser("train", help="train the rigid + B-spline cascade for one patient (or on synthetic patients)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mr", type=Path, help="preoperative MR")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic patients instead")
    p.add_argument("--mr-vessels", type=Path, help="vessel label map on the MR grid")
    p.add_argument("--liver", type=Path, help="liver mask on the MR grid (centres the 128 mm region)")
    p.add_argument("--us", type=Path, nargs="+", help="training US volumes (e.g. 8 over half a breathing cycle)")
    p.add_argument("--us-vessels", type=Path, nargs="+", help="their vessel label maps, same order")
    p.add_argument("--val-frames", type=int, default=1, help="US frames held out for validation (file mode)")
    p.add_argument("--frames", type=int, default=8, help="frames per synthetic patient")
    p.add_argument("--val-patients", type=int, default=2, help="synthetic patients held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rigid-epochs", type=int)
    p.add_argument("--bspline-epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--weights", type=float, nargs=3, metavar=("LABEL", "MIND", "SMOOTH"),
                   help="loss weights (default 100 0.01 1: labels main; the spec's other reading is 0.01 100 1)")
    p.add_argument("--lr-rigid", type=float)
    p.add_argument("--lr-bspline", type=float)
    p.add_argument("--constant-lr", action="store_true", help="no cosine decay of the learning rate within each stage")
    p.add_argument("--weight-average", type=float, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights (e.g. 0.99; 0: off)")
    p.add_argument("--landmark-weight", type=float, nargs=2, metavar=("RIGID", "BSPLINE"),
                   help="synthetic patients: add the mean landmark error (mm, known truth) to the rigid and "
                        "B-spline losses with these weights (default 0 0: the spec's losses alone)")
    p.add_argument("--augment-shift", type=float, help="random extra US shift, voxels (0: none)")
    p.add_argument("--augment-rotation", type=float, help="random extra US rotation, degrees (0: none)")
    p.add_argument("--init", type=Path, help="start from this model (.pt), e.g. the shipped one, to fine-tune")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_train)

    p = sub.add_parser("register", help="register US volume(s) to an MR and write the transforms")
    p.add_argument("--mr", type=Path, required=True)
    p.add_argument("--us", type=Path, nargs="+", required=True)
    p.add_argument("--liver", type=Path)
    p.add_argument("--initial", type=Path, help="linear transform file (MR LPS -> US LPS) applied before the network")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    p.add_argument("--fast", action="store_true",
                   help="the network alone, without the MIND-SSC correction stage (~0.4 s instead of ~2 s on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_register)

    p = sub.add_parser("serve", help="the OpenIGTLink fusion service: register each incoming US volume to the MR")
    p.add_argument("--mr", type=Path, help="preoperative MR (default: the built-in synthetic patient)")
    p.add_argument("--liver", type=Path, help="liver mask on the MR grid (centres the 128 mm region)")
    p.add_argument("--model", type=Path, help="model .pt or .pt2 (default: the shipped model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=18944)
    p.add_argument("--connect", metavar="HOST:PORT", help="connect out to a US source (e.g. a PLUS server) instead")
    p.add_argument("--us-device", action="append", metavar="NAME",
                   help="IMAGE device name(s) to register (default: any)")
    p.add_argument("--correct", action="store_true",
                   help="after each frame's network result, send its corrected result (MIND-SSC correction, "
                        "~2-5 s on a CPU) unless a newer frame is waiting")
    p.add_argument("--echo", action="store_true", help="send each volume straight back (transport test)")
    p.add_argument("--max-frames", type=int, help="stop after this many registered frames")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--max-clients", type=int, default=8,
                   help="peers served at once (one reader thread each); more are refused with a STATUS")
    p.set_defaults(run=_serve)

    p = sub.add_parser("demo", help="live fusion demo: the service and a simulated scanner over loopback OpenIGTLink")
    p.add_argument("--frames", type=int, default=24, help="frames to stream")
    p.add_argument("--rate", type=float, default=2.0, help="scanner frame rate, Hz")
    p.add_argument("--us", type=Path, nargs="+", help="replay these US volumes instead of the synthetic patient")
    p.add_argument("--mr", type=Path, help="MR for --us (default: the first US volume is the reference)")
    p.add_argument("--liver", type=Path, help="liver mask on the --mr grid (centres the 128 mm region)")
    p.add_argument("--correct", action="store_true", help="the service also sends each frame's corrected result")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench-stream", help="streaming latency, throughput and memory, fusion against transport alone")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="cubic uint8 volume sizes")
    p.add_argument("--correct", action="store_true", help="also stream to a service that sends corrected results")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=_bench_stream)

    p = sub.add_parser("evaluate", help="accuracy and speed on unseen synthetic patients, against SimpleITK")
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--frames", type=int, default=2, help="US frames per case (start and end of the half cycle)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-correction", action="store_true", help="the network alone (as register --fast)")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=_evaluate)


def _load(args):
    from deepnav.torch_runtime import configure_threads, describe_device
    from MRUSFusionLib.model_io import load_model

    configure_threads()
    model = load_model(args.model, args.device)
    print_progress(0.0, f"model {model.path.name} on {describe_device(model.device)}")
    return model


def _phantom(args) -> int:
    from MRUSFusionLib.patient_files import write_patient
    from MRUSFusionLib.phantom import make_patient

    require_writable_folder(args.out)
    oblique = None if args.oblique == "auto" else args.oblique == "yes"
    index = write_patient(make_patient(args.seed, frames=args.frames, oblique=oblique), args.out, args.format)
    print(f"wrote synthetic patient {args.seed} ({len(index['frames'])} US frames) to {args.out}")
    return 0


def _train(args) -> int:
    from deepnav.torch_runtime import configure_threads, pick_device
    from MRUSFusionLib import dataset, losses, model_io, training

    require_writable_folder(args.out)
    configure_threads()
    config = (training.checkpoint_config(args.out) if args.resume else None) or training.TrainConfig(seed=args.seed)
    overrides = {"rigid_epochs": args.rigid_epochs, "bspline_epochs": args.bspline_epochs,
                 "steps_per_epoch": args.steps_per_epoch, "lr_rigid": args.lr_rigid, "lr_bspline": args.lr_bspline,
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
        print_progress(0.0, f"generating {len(seeds)} synthetic patients x {args.frames} frames")
        pools = dataset.synthetic_samples(seeds, args.frames, progress=print_progress)
        n_train = len(seeds) - args.val_patients
        train_samples = [s for pool in pools[:n_train] for s in pool]
        val_samples = [pool[i] for pool in pools[n_train:] for i in dataset.validation_frames(len(pool))]
        source = {"kind": "synthetic", "patient_seeds": seeds, "frames": args.frames, "validation_patients": seeds[n_train:]}
    else:
        if not (args.mr_vessels and args.us and args.us_vessels):
            raise InputError("file training needs --mr, --mr-vessels, --us and --us-vessels")
        samples = dataset.file_samples(args.mr, args.mr_vessels, args.us, args.us_vessels, args.liver)
        train_samples, val_samples, val_idx = training.split_frames(samples, args.val_frames)
        source = {"kind": "files", "mr": str(args.mr), "us": [str(p) for p in args.us], "validation_frames": val_idx}
    init = model_io.load_model(args.init, "cpu").eager().state_dict() if args.init else None
    path, info = training.train_and_save(train_samples, val_samples, args.out, config, source=source,
                                         device=pick_device(args.device), resume=args.resume, init_state=init)
    best = info["best"]
    # the score the best epoch was chosen by: landmark TRE where the truth is known (synthetic)
    chosen_by = f"landmark TRE {best['tre_mm']:.2f} mm, " if "tre_mm" in best else ""
    print(f"best validation (epoch {best['epoch'] + 1}): {chosen_by}vessel Dice {best['vessel_dice']:.3f}; "
          f"wrote {path} and {path.with_suffix('.pt2')}")
    return 0


def _register(args) -> int:
    import SimpleITK as sitk

    from deepnav.imaging import read_volume
    from MRUSFusionLib.overlay import write_png
    from MRUSFusionLib.registration import overlay_picture, register

    require_writable_folder(args.out)
    model = _load(args)
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
    for us_path, name in zip(args.us, distinct_names([image_stem(p) for p in args.us]), strict=True):
        us = read_volume(us_path, what="US volume")
        result = register(model, mr, us, liver=liver, initial=initial, correct=not args.fast)
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
        print(f"{us_path.name}: {summary}, folding {result.folding_percent():.3f}% -> {out}")
        if result.correction is not None and result.correction.report["flags"]:
            print(f"  check: {', '.join(result.correction.report['flags'])} (see registration.json)")
    return 0


def _serve(args) -> int:
    import logging
    import signal

    from deepnav.imaging import read_volume
    from MRUSFusionLib.service import EchoProcessor, FusionProcessor, FusionService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    connect = None
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--connect wants HOST:PORT, got {args.connect!r}")
        connect = (host, int(port))
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
        processor = FusionProcessor(model, mr, liver, correct=args.correct)
        print_progress(0.0, "warming up")
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
    print(f"stopped: {stats['frames_processed']} frames registered, {stats['frames_dropped']} dropped, "
          f"{stats['errors']} rejected messages")
    return 0


def _demo(args) -> int:
    from MRUSFusionLib.demo import run_demo

    require_writable_folder(args.out)
    model = _load(args)
    report = run_demo(model, args.out, frames=args.frames, rate_hz=args.rate, us_files=args.us, mr_file=args.mr,
                      liver_file=args.liver, correct=args.correct)
    e2e = report["end_to_end_s"]
    print(f"{report['frames_completed']}/{report['frames']} frames fused, {report['dropped_frames']} dropped; "
          f"end to end p50 {e2e['p50'] * 1000:.0f} ms, p95 {e2e['p95'] * 1000:.0f} ms; "
          + (f"corrected ({report['corrected_frames']} frames) p50 {report['corrected_end_to_end_s']['p50']:.1f} s; "
             if report.get("corrected_frames") else "") +
          f"geometry intact: {report['geometry_intact']}")
    for row in report["per_frame"]:
        if "overlay" in row:
            print(f"  overlay: {(args.out / row['overlay']).resolve()}")
    print(f"latency report: {(args.out / 'report.md').resolve()} (and report.json)")
    return 0


def _bench_stream(args) -> int:
    from MRUSFusionLib.stream_benchmark import format_table, run_benchmark

    require_writable_folder(args.json.parent, "folder of --json")
    model = _load(args)
    report = run_benchmark(model, frames=args.frames, rate_hz=args.rate, sizes=args.sizes, correct=args.correct)
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


def _evaluate(args) -> int:
    from MRUSFusionLib.evaluation import evaluate, format_table, write_report

    require_writable_folder(args.json.parent, "folder of --json")
    model = _load(args)
    report = evaluate(model, args.cases, args.seed, frames=args.frames, baseline=not args.no_baseline,
                      correct=not args.no_correction)
    print(format_table(report))
    write_report(report, args.json)
    print(f"wrote {args.json}")
    return 0
