"""Training pairs from synthetic patients or from a user's own files, on the fusion grid."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from deepnav.errors import InputError
from deepnav.imaging import read_volume
from MRUSFusionLib.phantom import make_patient
from MRUSFusionLib.preprocess import prepare_pair
from MRUSFusionLib.training import Sample

# Patient seeds at or above this value are reserved for training the shipped model; evaluation
# draws its patients below it, so an evaluation never sees a training patient.
TRAINING_SEED_BASE = 10_000_000


def patient_samples(seed: int, frames: int) -> list[Sample]:
    patient = make_patient(seed, frames=frames)
    return [
        Sample.from_pair(prepare_pair(patient.mr, f.image, liver=patient.liver,
                                      mr_vessels=patient.vessels, us_vessels=f.vessels))
        for f in patient.frames
    ]


def synthetic_samples(seeds: list[int], frames: int, workers: int = 2) -> list[list[Sample]]:
    """One list of samples per patient, generated in parallel processes. The workers are spawned,
    not forked: a fork after torch has started its thread pool can deadlock the children."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(patient_samples, seeds, [frames] * len(seeds)))


def file_samples(mr: Path, mr_vessels: Path, us: list[Path], us_vessels: list[Path], liver: Path | None) -> list[Sample]:
    """The spec's per-patient workflow: one MR with its vessel label, US frames with theirs."""
    if len(us) != len(us_vessels):
        raise InputError(f"{len(us)} US volumes but {len(us_vessels)} US vessel labels: give one label per volume")
    mr_volume = read_volume(mr, what="MR")
    mr_label = read_volume(mr_vessels, what="MR vessel label")
    liver_volume = read_volume(liver, what="liver mask") if liver else None
    samples = []
    for image_path, label_path in zip(us, us_vessels, strict=True):
        pair = prepare_pair(mr_volume, read_volume(image_path, what="US volume"), liver=liver_volume,
                            mr_vessels=mr_label, us_vessels=read_volume(label_path, what="US vessel label"))
        samples.append(Sample.from_pair(pair))
    return samples
