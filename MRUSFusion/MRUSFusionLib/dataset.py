"""Training pairs from synthetic patients or from a user's own files, on the fusion grid."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from deepnav.errors import InputError
from deepnav.imaging import Volume, read_volume
from deepnav.progress import ProgressCallback, silent
from MRUSFusionLib.phantom import landmarks_in_view, make_patient
from MRUSFusionLib.preprocess import fusion_grid, prepare_pair
from MRUSFusionLib.training import Sample

# Patient seeds at or above this value are reserved for training the shipped model; evaluation
# draws its patients below it, so an evaluation never sees a training patient.
TRAINING_SEED_BASE = 10_000_000


def training_seeds(run_seed: int, patients: int) -> list[int]:
    """The synthetic patients `fusion train --synthetic N --seed S` trains on: a block of 1000
    per run seed, above TRAINING_SEED_BASE."""
    return [TRAINING_SEED_BASE + run_seed * 1000 + i for i in range(patients)]


def patient_samples(seed: int, frames: int) -> list[Sample]:
    """A synthetic patient's training pairs, with its landmarks (known truth) for validation."""
    patient = make_patient(seed, frames=frames)
    samples = []
    for frame in patient.frames:
        pair = prepare_pair(patient.mr, frame.image, liver=patient.liver,
                            mr_vessels=patient.vessels, us_vessels=frame.vessels)
        use = landmarks_in_view(patient, frame, pair.grid)
        # on the fusion grid (1 mm, its voxel indices): the US was resampled there by identity,
        # so a US point's true position is its own index in the grid
        landmarks = np.stack([pair.grid.lps_to_index(patient.landmarks_lps[use]),
                              pair.grid.lps_to_index(frame.landmarks_lps[use])], axis=1)
        samples.append(Sample.from_pair(pair, landmarks_ijk=landmarks))
    return samples


def validation_frames(frames: int) -> list[int]:
    """Which frames of a held-out synthetic patient validate: the first (end-expiration: the rigid
    residual alone), the middle and the last (full breathing). Without the first, a network that
    adds the typical breathing shift to every frame scored well (the shipped model moved the
    end-expiration frames of four unseen patients further from the truth, rigid stage 4.4 -> 6.5 mm)."""
    return sorted({0, frames // 2, frames - 1})


def generation_workers() -> int:
    """Worker processes for synthetic patients: this machine's cores shared among the processes a
    torchrun job starts on it (LOCAL_WORLD_SIZE; one process: every core, 2 on this 2-core CPU as
    before), so that N ranks on a node generate N shares at once without oversubscribing it."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def synthetic_samples(seeds: list[int], frames: int, workers: int = 2,
                      progress: ProgressCallback = silent) -> list[list[Sample]]:
    """One list of samples per patient, generated in parallel processes (~7 s per patient of
    3 frames on one core), reporting each patient done. The workers are spawned, not forked: a
    fork after torch has started its thread pool can deadlock the children."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent) as pool:
        pools = []
        for done, payload in enumerate(pool.map(_patient_samples_pickled, seeds, [frames] * len(seeds)), 1):
            pools.append(pickle.loads(payload))
            progress(done / len(seeds), f"synthetic patient {done}/{len(seeds)} ({frames} frames)")
        return pools


def _exit_with_parent() -> None:
    """Worker initializer: when the parent dies (e.g. `fusion train` killed while generating),
    the worker exits too. Without this it waited forever on the task queue, whose write end it
    holds itself, so it never sees end-of-file: two idle processes with torch loaded were left
    behind. A watcher thread waits on the parent's sentinel (portable, unlike Linux's prctl)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _patient_samples_pickled(seed: int, frames: int) -> bytes:
    """A worker's result as plain pickle bytes. Returned as tensors, multiprocessing would pass
    each through shared memory behind its own file descriptor (torch's sharing strategy): six per
    frame, held open for the whole training, so ~170 frames would exhaust the common limit of 1024
    descriptors (a 256-patient run held 3,490)."""
    return pickle.dumps(patient_samples(seed, frames))


def file_samples(mr: Path, mr_vessels: Path, us: list[Path], us_vessels: list[Path], liver: Path | None) -> list[Sample]:
    """The spec's per-patient workflow from files: one MR with its vessel label, US frames with theirs."""
    if len(us) != len(us_vessels):
        raise InputError(f"{len(us)} US volumes but {len(us_vessels)} US vessel labels: give one label per volume")
    return volume_samples(read_volume(mr, what="MR"), read_volume(mr_vessels, what="MR vessel label"),
                          [(read_volume(i, what="US volume"), read_volume(v, what="US vessel label"))
                           for i, v in zip(us, us_vessels, strict=True)],
                          read_volume(liver, what="liver mask") if liver else None)


def volume_samples(mr: Volume, mr_vessels: Volume, us_frames: list[tuple[Volume, Volume]],
                   liver: Volume | None = None) -> list[Sample]:
    """Training pairs from volumes in memory (the Slicer module's nodes): (US, US vessel label)
    per frame."""
    grid = fusion_grid(mr, liver)
    return [Sample.from_pair(prepare_pair(mr, image, liver=liver, mr_vessels=mr_vessels, us_vessels=label, grid=grid))
            for image, label in us_frames]
