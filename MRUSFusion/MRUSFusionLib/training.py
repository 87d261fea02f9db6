"""Per-patient training of the cascade: the rigid stage first, then the B-spline stage.

The rigid network learns from the vessel-label term only (as the spec says); the B-spline
network then learns with the hybrid loss while the rigid network stays frozen. Each epoch ends
with a validation score on held-out frames, a resumable checkpoint (written atomically), and the
best-validation weights kept apart. Seeds make runs repeatable.

A step trains on `batch` pairs per process (default one), each drawn and augmented from its own
random stream, one per place in the global batch (one pair per step in one process keeps the
stream it always had). Under torchrun (deepnav.distributed) every process trains on its own
training pairs (its own synthetic patients), its places in the global batch of N * batch pairs,
the gradients averaged by DistributedDataParallel: N processes with batch b train as one with
batch N * b. Each process validates its own held-out frames and the scores are merged; rank 0
alone writes and reports. A checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from deepnav import distributed
from deepnav.errors import InputError
from deepnav.model_files import save_atomic
from deepnav.progress import CancelToken, ProgressCallback, print_progress, silent
from deepnav.torch_runtime import adam, seed_everything
from MRUSFusionLib import losses
from MRUSFusionLib.networks import Cascade
from MRUSFusionLib.preprocess import FusionPair
from MRUSFusionLib.warp import affine_displacement, compose_affine, compose_matrices, grid_centre, map_points, rigid_matrix, warp

CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class TrainConfig:
    rigid_epochs: int = 10
    bspline_epochs: int = 16
    steps_per_epoch: int = 50
    batch: int = 1  # pairs per step in each process (gradients averaged over them)
    lr_rigid: float = 2e-4
    lr_bspline: float = 3e-4
    lr_decay: bool = True  # cosine over each stage, to 5% of its rate (stage_lr)
    weights: losses.LossWeights = dataclasses.field(default_factory=losses.LossWeights)
    label_sigma: float = 2.0  # voxels, blur of the vessel labels for the label term
    loss_block: int = 80  # MIND is evaluated on a random block of this size inside the US
    augment_shift: float = 4.0  # extra random rigid misalignment of the US, voxels
    augment_rotation_deg: float = 3.0
    # exponential moving average of the weights, validated and kept instead of the raw ones
    # (0: off); see WeightAverage
    weight_average: float = 0.0
    # known-truth term for synthetic patients (not in the spec; 0: off): the mean distance (mm)
    # between where the prediction sends the MR landmarks in the US and where they truly lie,
    # added to each stage's loss with these weights (the rigid loss is 1 - NCC, ~0.1 when trained;
    # the B-spline loss ~8, mostly 100 * (1 - NCC)); see landmark_error
    landmark_weight_rigid: float = 0.0
    landmark_weight_bspline: float = 0.0
    seed: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["weights"] = losses.LossWeights(**data["weights"])
        return cls(**data)


@dataclasses.dataclass
class Sample:
    """One training pair on the fusion grid. Every tensor holds values in [0, 1] (normalised
    images, field of view, soft labels), stored as 8-bit fractions q / 255: a quarter of float32's
    memory, so that hundreds of synthetic patients fit in memory (a frame with its cached blurred
    labels takes 14 MB, 29 MB as float16). The quantisation step, 1/255, is below the US's own:
    it is 8-bit B-mode to begin with."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fov: torch.Tensor
    fixed_label: torch.Tensor
    moving_label: torch.Tensor
    # known correspondences (synthetic patients only): (L, 2, 3) grid voxel positions (i, j, k),
    # [:, 0] in the MR, [:, 1] where the same anatomy lies in the US; validation scores their TRE
    landmarks_ijk: torch.Tensor | None = None
    _blurred: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pair(cls, pair: FusionPair, landmarks_ijk: np.ndarray | None = None) -> Sample:
        if pair.fixed_label is None or pair.moving_label is None:
            raise ValueError("training pairs need vessel labels on both sides")
        t = [_to_fraction8(torch.from_numpy(a))[None, None] for a in
             (pair.fixed, pair.moving, pair.fov, pair.fixed_label, pair.moving_label)]
        landmarks = None if landmarks_ijk is None else torch.as_tensor(landmarks_ijk, dtype=torch.float32)
        return cls(*t, landmarks_ijk=landmarks)

    def tensors(self, device, label_sigma: float | None = None) -> list[torch.Tensor]:
        """(fixed, moving, fov, fixed_label, moving_label) as float32 on `device`; with
        `label_sigma`, the labels blurred for the label term (`blurred_labels`) instead of as drawn."""
        labels = (self.fixed_label, self.moving_label) if label_sigma is None else self.blurred_labels(label_sigma)
        return [_from_fraction8(t, device) for t in (self.fixed, self.moving, self.fov, *labels)]

    def blurred_labels(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed, moving) vessel labels blurred for the label term, computed once per sample:
        blurring before warping rather than after saves two 128^3 convolutions per step."""
        if sigma not in self._blurred:
            self._blurred[sigma] = tuple(_to_fraction8(losses.blur_label(_from_fraction8(t, "cpu"), sigma))
                                         for t in (self.fixed_label, self.moving_label))
        return self._blurred[sigma]


def _to_fraction8(values: torch.Tensor) -> torch.Tensor:
    """[0, 1] values -> uint8 q with q / 255 nearest (values outside [0, 1] are clipped)."""
    return torch.round(values.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _from_fraction8(q: torch.Tensor, device) -> torch.Tensor:
    return q.to(device=device, dtype=torch.float32) / 255.0


@dataclasses.dataclass
class Batch:
    """A training step's tensors (float32, on the device). The US stays on its own grid: the
    network sees `moving_in`, the US resampled through a random rigid `augmentation`
    (x -> A x + b, voxels); the losses resample the original US, its field of view and its
    blurred vessel label once, through the composition of augmentation and prediction."""

    fixed: torch.Tensor
    moving_in: torch.Tensor
    augmentation: torch.Tensor  # (1, 3, 4)
    us: torch.Tensor  # (1, 3, D, H, W): original US, field of view, blurred vessel label
    fixed_label: torch.Tensor  # blurred
    landmarks: torch.Tensor | None = None  # (L, 2, 3) as Sample.landmarks_ijk, on the device

    @property
    def size(self) -> list[int]:
        return list(self.fixed.shape[2:])


def make_batch(sample: Sample, config: TrainConfig, device, rng: np.random.Generator | None = None) -> Batch:
    """The sample as a batch; with `rng`, its US moved by a random rigid augmentation (more
    misalignments to learn from), without, by none."""
    fixed, moving, fov, fixed_label, moving_label = sample.tensors(device, config.label_sigma)
    params = torch.zeros(1, 6, device=device)
    if rng is not None:
        shift = rng.uniform(-config.augment_shift, config.augment_shift, 3)
        angles = np.deg2rad(rng.uniform(-config.augment_rotation_deg, config.augment_rotation_deg, 3))
        params = torch.tensor(np.concatenate([shift, angles]), dtype=torch.float32, device=device)[None]
    augmentation = rigid_matrix(params, grid_centre(fixed.shape[2], device))
    moving_in = warp(moving, affine_displacement(augmentation, list(fixed.shape[2:]))) if bool(params.any()) else moving
    landmarks = None if sample.landmarks_ijk is None or not len(sample.landmarks_ijk) else sample.landmarks_ijk.to(device)
    return Batch(fixed, moving_in, augmentation, torch.cat([moving, fov, moving_label], 1), fixed_label, landmarks)


def stage_lr(config: TrainConfig, stage: str, epoch: int, step: int) -> float:
    """The learning rate at (epoch, step): cosine decay over the stage from its rate to 5% of it.
    With one pair per step, a constant rate kept the weights jumping: the rigid stage's validation
    TRE swung between 4.6 and 8.3 mm over consecutive epochs. A function of the position alone,
    so a resumed run follows the same schedule."""
    if stage == "rigid":
        base, first, epochs = config.lr_rigid, 0, config.rigid_epochs
    else:
        base, first, epochs = config.lr_bspline, config.rigid_epochs, config.bspline_epochs
    if not config.lr_decay:
        return base
    t = ((epoch - first) * config.steps_per_epoch + step) / max(epochs * config.steps_per_epoch, 1)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


class WeightAverage:
    """An exponential moving average of a model's weights (a copy of the model):
    w_avg <- decay * w_avg + (1 - decay) * w after each step, over all parameters (those of the
    stage not being trained equal the model's, so averaging them changes nothing). With one pair
    per step the raw weights carry step-to-step noise that the average of the last ~1 / (1 - decay)
    steps removes; it did not remove the slower drift: over 256-patient runs the rigid stage's
    validation TRE still moved by up to 0.7 mm between consecutive epochs (0.9 mm without it)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self._averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))  # a copy of `model`
        # the copy is the average's first value: the next update averages with it, not replaces it
        # (AveragedModel's first update_parameters otherwise copies the model)
        self._averaged.n_averaged.fill_(1)
        self.model = self._averaged.module  # state_dict keys as the model's (checkpoints, best.pt)

    def update(self, model: torch.nn.Module) -> None:
        self._averaged.update_parameters(model)


def _block(shape: list[int], size: int, fov: torch.Tensor, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random cubic block whose centre lies in the US field of view."""
    if size >= shape[0]:
        return (slice(None),) * 5
    idx = torch.nonzero(fov[0, 0] > 0.5)
    centre = idx[int(rng.integers(len(idx)))].cpu().numpy() if len(idx) else np.array(shape) // 2  # fov may be on a GPU
    start = np.clip(centre - size // 2, 0, np.array(shape) - size)
    return (slice(None), slice(None)) + tuple(slice(int(s), int(s) + size) for s in start)


def landmark_error(batch: Batch, to_us: torch.Tensor) -> torch.Tensor:
    """Mean distance (voxels of the 1 mm grid: mm) between where a prediction sends the MR
    landmarks in the original US and their true positions there; `to_us` is the prediction's
    (1, 3, D, H, W) grid-to-US displacement field, the one the label term resamples through (a
    rigid field is interpolated exactly: it is affine). The distance, not its square: a constant
    pull on every landmark, which keeps driving the last millimetres down, and a few landmarks a
    breathing field cannot reach do not dominate."""
    x, truth = batch.landmarks.unbind(1)
    return torch.linalg.norm(map_points(to_us, x) - truth, dim=1).mean()


def rigid_step(model: Cascade, batch: Batch, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    matrix = model.rigid_stage(batch.fixed, batch.moving_in)
    to_us = affine_displacement(compose_matrices(batch.augmentation, matrix), batch.size)
    mask, warped_label = warp(batch.us[:, 1:], to_us).split(1, 1)
    terms = {"label": losses.label_loss(batch.fixed_label, warped_label, mask)}
    total = terms["label"]
    if config.landmark_weight_rigid > 0 and batch.landmarks is not None:
        terms["landmarks"] = landmark_error(batch, to_us)
        total = total + config.landmark_weight_rigid * terms["landmarks"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


def bspline_step(model: Cascade, batch: Batch, config: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        matrix = model.rigid_stage(batch.fixed, batch.moving_in)
        rigid_warped = warp(batch.moving_in, affine_displacement(matrix, batch.size))
    u = model.dense_field(batch.fixed, rigid_warped)
    to_us = compose_affine(compose_matrices(batch.augmentation, matrix), u)
    warped, mask, warped_label = warp(batch.us, to_us).split(1, 1)
    block = _block(batch.size, config.loss_block, mask.detach(), rng)
    terms = {
        "label": losses.label_loss(batch.fixed_label, warped_label, mask),
        "mind": losses.mind_loss(batch.fixed[block], warped[block], mask[block]),
        "smooth": losses.smoothness(u),
    }
    w = config.weights
    total = w.label * terms["label"] + w.mind * terms["mind"] + w.smooth * terms["smooth"]
    if config.landmark_weight_bspline > 0 and batch.landmarks is not None:
        terms["landmarks"] = landmark_error(batch, to_us)
        total = total + config.landmark_weight_bspline * terms["landmarks"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def validate(model: Cascade, samples: list[Sample], device) -> dict:
    """Vessel Dice and label NCC after the full cascade, over held-out frames, and MIND; where
    every frame carries known landmarks (synthetic patients), also their median TRE (mm: the grid
    is 1 mm) before registration, after the rigid stage and after the cascade. Under torchrun,
    each process scores its own frames and the scores are those of all of them."""
    model.eval()
    rows = []
    for sample in samples:
        fixed, moving, fov, fixed_label, moving_label = sample.tensors(device)
        warped, disp, matrix, _ = model(fixed, moving)
        mask = (warp(fov, disp) > 0.5).float()
        warped_label = warp(moving_label, disp)
        row = {"dice": vessel_dice(fixed_label, warped_label, mask), "ncc": float(losses.ncc(fixed_label, warped_label, mask)),
               "mind": float(losses.mind_loss(fixed, warped, mask)), "landmarks": sample.landmarks_ijk is not None,
               "tre_initial": [], "tre_rigid": [], "tre": []}
        if sample.landmarks_ijk is not None and len(sample.landmarks_ijk):
            x, truth = sample.landmarks_ijk.to(device).unbind(1)
            row["tre_initial"] = torch.linalg.norm(x - truth, dim=1).tolist()
            rigid = affine_displacement(matrix, list(fixed.shape[2:]))
            row["tre_rigid"] = torch.linalg.norm(map_points(rigid, x) - truth, dim=1).tolist()
            row["tre"] = torch.linalg.norm(map_points(disp, x) - truth, dim=1).tolist()
        rows.append(row)
    model.train()
    rows = distributed.gather_concat(rows)  # every process's frames (one process: its own)
    dice, ncc, mind = ([r[k] for r in rows] for k in ("dice", "ncc", "mind"))
    tre_initial, tre_rigid, tre = ([v for r in rows for v in r[k]] for k in ("tre_initial", "tre_rigid", "tre"))
    scores = {"vessel_dice": float(np.mean(dice)), "label_ncc": float(np.mean(ncc)), "mind": float(np.mean(mind))}
    if tre and all(r["landmarks"] for r in rows):
        scores.update(tre_initial_mm=float(np.median(tre_initial)), tre_rigid_mm=float(np.median(tre_rigid)),
                      tre_mm=float(np.median(tre)))
    return scores


def vessel_dice(fixed_label: torch.Tensor, warped_label: torch.Tensor, mask: torch.Tensor) -> float:
    """Dice of the binarised labels inside the US field of view."""
    a = (fixed_label > 0.5) & (mask > 0.5)
    b = (warped_label > 0.5) & (mask > 0.5)
    denominator = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / denominator if denominator else float("nan")


def checkpoint_config(out_dir: Path) -> TrainConfig | None:
    """The configuration a run in `out_dir` was started with (to resume it), or None."""
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return None
    return TrainConfig.from_json(torch.load(path, map_location="cpu", weights_only=False)["config"])


def train(
    train_samples: list[Sample],
    val_samples: list[Sample],
    out_dir: Path,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    resume: bool = False,
    progress: ProgressCallback = print_progress,
    cancel: CancelToken | None = None,
    metadata: dict | None = None,
    init_state: dict | None = None,
    precision: str = "fp32",
) -> tuple[Cascade, dict]:
    """Train and return the best-validation model and the history. Writes to `out_dir`:
    `checkpoint.pt` (resumable, every epoch), `best.pt` (best weights), `history.json`.
    With `resume`, training continues after the checkpoint's last epoch up to `config`'s epoch
    counts (pass `checkpoint_config(out_dir)` with more epochs to extend a finished run).
    `precision` 'bf16': the two networks' layers run in bf16 autocast (Cascade.set_precision),
    the warps, fields and losses in fp32; the weights, their gradients and Adam stay fp32. The
    returned model is fp32 again (for saving and scripting)."""
    world = distributed.world()
    if not train_samples or not sum(distributed.gather_concat([len(val_samples)])):
        raise ValueError("training needs at least one training and one validation frame")
    device = device or torch.device("cpu")
    progress = progress if world.is_main else silent
    # this process's places in the global batch of world.size * config.batch pairs
    slots = range(world.rank * config.batch, (world.rank + 1) * config.batch)
    one_stream = world.size * config.batch == 1  # one pair per step: the stream it always had
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    # channels-last 3D weights: a rigid-stage step took ~0.73x the time on this CPU in fp32, and in
    # bf16 0.18x (oneDNN's bf16 3D convolutions' backward is slow in the contiguous layout)
    # (benchmarks/mixed_precision.py); the same arithmetic to float rounding
    model = Cascade().to(device, memory_format=torch.channels_last_3d).set_precision(precision)
    if init_state is not None:  # fine-tuning from a trained model (e.g. the shipped one)
        model.load_state_dict(init_state)
    history: list[dict] = []
    best = {"score": -math.inf, "epoch": -1}
    epoch0 = 0
    opt_state = None
    checkpoint_path = out_dir / "checkpoint.pt"
    # read on rank 0 and sent to the others (the nodes need not share a file system)
    ckpt = distributed.from_main(lambda: torch.load(checkpoint_path, map_location="cpu", weights_only=False)
                                 if resume and checkpoint_path.exists() else None)
    if ckpt is not None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{checkpoint_path} is not a checkpoint of this version")
        model.load_state_dict(ckpt["model"])
        history, best, epoch0, opt_state = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1, ckpt["optimizer"]
        progress(0.0, f"resuming after epoch {epoch0} of {config.rigid_epochs + config.bspline_epochs}")
    average = WeightAverage(model, config.weight_average) if config.weight_average > 0 else None
    if average is not None and epoch0 > 0 and ckpt.get("average") is not None:
        # (a run resumed with averaging newly asked for starts its average at the resumed weights)
        average.model.load_state_dict(ckpt["average"])
    evaluated = average.model if average is not None else model
    total_epochs = config.rigid_epochs + config.bspline_epochs
    model.train()
    optimizer = None
    for epoch in range(epoch0, total_epochs):
        stage = "rigid" if epoch < config.rigid_epochs else "bspline"
        if average is not None and epoch == config.rigid_epochs:
            # the B-spline stage learns on the output of the rigid network that will ship
            model.rigid.load_state_dict(average.model.rigid.state_dict())
        if optimizer is None or (stage == "bspline" and epoch == config.rigid_epochs):
            params = model.rigid.parameters() if stage == "rigid" else model.bspline.parameters()
            lr = config.lr_rigid if stage == "rigid" else config.lr_bspline
            optimizer = adam(params, lr)
            if opt_state is not None and opt_state["stage"] == stage:
                optimizer.load_state_dict(opt_state["state"])
            step_loss = distributed.wrap(_StageLoss(model, stage, config, world.active))
        rngs = [np.random.default_rng([config.seed, epoch] if one_stream else [config.seed, epoch, slot]) for slot in slots]
        t0 = time.perf_counter()
        running: dict[str, list[float]] = {}
        for step in range(config.steps_per_epoch):
            if cancel is not None:
                cancel.raise_if_cancelled()
            optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, list[float]] = {}
            for n, rng in enumerate(rngs):
                sample = train_samples[int(rng.integers(len(train_samples)))]
                batch = make_batch(sample, config, device, rng)
                # gradients accumulate over this process's pairs and are averaged over the
                # processes after the last one (DistributedDataParallel)
                with distributed.no_sync(step_loss) if n < len(rngs) - 1 else contextlib.nullcontext():
                    loss, terms = step_loss(batch, rng)
                    (loss / len(rngs)).backward()
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    step_terms.setdefault(k, []).append(v)
            for group in optimizer.param_groups:
                group["lr"] = stage_lr(config, stage, epoch, step)
            optimizer.step()
            if average is not None:
                average.update(model)
            for k, v in step_terms.items():
                running.setdefault(k, []).append(float(np.mean(v)))
            done = (epoch + (step + 1) / config.steps_per_epoch) / total_epochs
            if (step + 1) % 10 == 0:
                recent = np.mean(running["loss"][-10:])
                progress(done, f"epoch {epoch + 1}/{total_epochs} ({stage}) step {step + 1}: loss {recent:.4f}")
        scores = validate(evaluated, val_samples, device)
        record = {"epoch": epoch, "stage": stage, "seconds": time.perf_counter() - t0, "lr": optimizer.param_groups[0]["lr"],
                  **distributed.mean_across({f"train_{k}": float(np.mean(v)) for k, v in running.items()}),
                  **{f"val_{k}": v for k, v in scores.items()}}
        history.append(record)
        tre = (f" TRE {scores['tre_initial_mm']:.2f} -> {scores['tre_rigid_mm']:.2f} (rigid) -> {scores['tre_mm']:.2f} mm"
               if "tre_mm" in scores else "")
        progress((epoch + 1) / total_epochs,
                 f"epoch {epoch + 1}/{total_epochs} ({stage}) val vessel Dice {scores['vessel_dice']:.3f} "
                 f"label NCC {scores['label_ncc']:.3f} MIND {scores['mind']:.4f}{tre}")
        # best = lowest landmark TRE where the truth is known (synthetic patients), else highest
        # label NCC, then (same NCC) lowest MIND; the B-spline stage must improve on the rigid
        score = -scores["tre_mm"] if "tre_mm" in scores else scores["label_ncc"] - scores["mind"]
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, **scores}
            if world.is_main:
                save_atomic({"model": evaluated.state_dict(), "epoch": epoch, "scores": scores}, out_dir / "best.pt")
        if not world.is_main:  # rank 0 alone writes
            continue
        save_atomic({
            "version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
            "average": None if average is None else average.model.state_dict(),
            "optimizer": {"stage": stage, "state": optimizer.state_dict()},
            "config": config.to_json(), "history": history, "best": best,
        }, checkpoint_path)
        (out_dir / "history.json").write_text(json.dumps({"config": config.to_json(), "history": history,
                                                          "best": best, "metadata": metadata or {}}, indent=2))
    model.requires_grad_(True)
    if world.is_main:  # (the other processes return their last weights)
        best_state = torch.load(out_dir / "best.pt", map_location=device, weights_only=False)
        model.load_state_dict(best_state["model"])
    model.eval().set_precision("fp32")
    return model, {"history": history, "best": best, "config": config.to_json()}


class _StageLoss(torch.nn.Module):
    """One pair's loss for the stage being trained, as a module that DistributedDataParallel can
    wrap (it hooks the gradient averaging into forward); under DDP the other stage is frozen, so
    that only the trained stage's gradients are averaged."""

    def __init__(self, model: Cascade, stage: str, config: TrainConfig, freeze_other: bool):
        super().__init__()
        self.model, self.stage, self.config = model, stage, config
        if freeze_other:
            model.rigid.requires_grad_(stage == "rigid")
            model.bspline.requires_grad_(stage != "rigid")

    def forward(self, batch: Batch, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        if self.stage == "rigid":
            return rigid_step(self.model, batch, self.config)
        return bspline_step(self.model, batch, self.config, rng)


def split_frames(samples: list, val_frames: int) -> tuple[list, list, list[int]]:
    """Per-patient split of one recorded sequence: `val_frames` validation frames spread over it
    (every k-th, so they cover the breathing cycle), the rest for training."""
    if len(samples) <= val_frames:
        raise InputError(f"{len(samples)} US frames: need more than the {val_frames} kept for validation")
    step = len(samples) / val_frames
    val_idx = sorted({int(step * (i + 0.5)) for i in range(val_frames)})
    return [s for i, s in enumerate(samples) if i not in val_idx], [samples[i] for i in val_idx], val_idx


def train_and_save(train_samples: list[Sample], val_samples: list[Sample], out_dir: Path, config: TrainConfig, *,
                   source: dict, device: torch.device | None = None, resume: bool = False,
                   init_state: dict | None = None, progress: ProgressCallback = print_progress,
                   cancel: CancelToken | None = None, precision: str = "fp32") -> tuple[Path, dict]:
    """`train`, then the best model as `model.pt` (TorchScript) and `model.pt2` (torch.export)
    with a record of the data, loss and best validation: the command line's and the Slicer
    module's one way to make a model."""
    from MRUSFusionLib import model_io

    w = config.weights
    metadata = {"training": {**source, "config": config.to_json(),
                             "loss": f"{w.label} * label + {w.mind} * MIND + {w.smooth} * smoothness"}}
    model, info = train(train_samples, val_samples, out_dir, config, device=device, resume=resume,
                        progress=progress, cancel=cancel, metadata=metadata, init_state=init_state, precision=precision)
    if not distributed.is_main():  # rank 0 writes the model
        return None, info
    metadata["training"]["best"] = info["best"]
    path = model_io.save_torchscript(model, out_dir / "model.pt", metadata)
    model_io.save_exported(model, out_dir / "model.pt2", metadata)
    return path, info
