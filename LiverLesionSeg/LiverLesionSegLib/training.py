"""Training the lesion network on an MSD-layout folder: patches, the method's augmentations,
focal + Dice loss, Adam, a validation loss per epoch on whole cases (sliding window), the
lowest-validation-loss weights kept, resumable checkpoints, seeds.

Patches are 64^3 voxels (96 mm at 1.5 mm); a share (`lesion_fraction`) is centred on a lesion
(lesions are a small share of the liver, as nnU-Net oversamples foreground): a lesion is drawn
first, then a voxel of it, so that 5 mm lesions are seen as often as 60 mm ones; another share
(`liver_fraction`) on a liver voxel (the liver is a few percent of an abdominal field of view);
the rest anywhere. The learning rate decays polynomially (nnU-Net's schedule) to settle the
weights in the last epochs. Phase dropout (each present phase zeroed with probability 0.3, at
least one kept) teaches the network to work on any subset of phases, so that one model serves
1 to 4 phases; `single_phase` gives a share of patches one phase alone, since dropout alone
rarely leaves exactly one (2% of patches for a given phase) while a single series is what a
user often has.

Under torchrun (deepnav.distributed), `batch` is per process: every rank draws the same global
batch of N * batch patches (the same random streams as one process with batch N * batch) and runs
the network on its own slice; the loss, a batch Dice, is computed on the logits of the whole
global batch (gathered differentiably), and DistributedDataParallel averages the gradients, so N
processes with batch b train as one with batch N * b. Validation cases are shared out and their
scores merged; rank 0 alone writes. A checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.losses import DiceLoss, FocalLoss
from monai.networks import one_hot
from scipy import ndimage

from deepnav import distributed
from deepnav.model_files import save_atomic
from deepnav.progress import CancelToken, ProgressCallback, print_progress, silent
from deepnav.torch_runtime import adam, forward_in, seed_everything
from LiverLesionSegLib.dataset import IGNORE, TrainingCase
from LiverLesionSegLib.evaluation import dice
from LiverLesionSegLib.inference import predict_logits
from LiverLesionSegLib.network import LesionUNet
from LiverLesionSegLib.preprocess import Normalisation

CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    steps_per_epoch: int = 40
    batch: int = 2
    patch: int = 64
    lr: float = 1e-3
    lr_decay_power: float = 0.9  # lr * (1 - epoch / epochs) ** power
    lesion_fraction: float = 0.33
    liver_fraction: float = 0.33
    val_every: int = 1  # validate (and maybe keep the weights) every n epochs and after the last
    phase_drop: float = 0.3
    single_phase: float = 0.0  # share of patches given one present phase alone (after dropout's draw)
    focal_weight: float = 1.0  # the method's a
    dice_weight: float = 1.0  # the method's b
    lesion_class_weight: float = 3.0  # the focal term's foreground (lesion) weight
    gamma: float = 2.0
    width: int = 8
    seed: int = 0


class MaskedDiceFocalLoss(torch.nn.Module):
    """The method's focal + Dice loss (MONAI's DiceFocalLoss with softmax, liver and lesion
    classes), leaving out voxels labelled IGNORE (where the truth is unknown). MONAI's
    DiceFocalLoss takes no mask, and its MaskedDiceLoss masks the logits before the softmax, which
    gives masked voxels probability 1/3 for every class; here the probabilities and the per-voxel
    focal terms are masked instead. With nothing ignored, equal to DiceFocalLoss (tested).

    Dice is batch Dice (nnU-Net's choice): overlaps summed over the batch before dividing. Per
    patch, a lesion-free patch scores 0 or 1 on the lesion class depending on a few stray voxels, a
    noisy term that pushed the network to predict no lesion at all (seen on whole-field cases)."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        weight = [1.0, config.lesion_class_weight]
        self.dice = DiceLoss(include_background=False, batch=True, weight=weight)
        self.focal = FocalLoss(include_background=False, gamma=config.gamma, weight=weight, reduction="none")
        self.dice_weight, self.focal_weight = config.dice_weight, config.focal_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, 3, ...); target (B, 1, ...) with 0/1/2 and IGNORE."""
        known = (target != IGNORE).to(logits.dtype)
        onehot = one_hot(torch.where(target == IGNORE, 0, target), num_classes=logits.shape[1]) * known
        dice = self.dice(torch.softmax(logits, dim=1) * known, onehot)
        focal = (self.focal(logits, onehot) * known).sum() / (known.sum() * (logits.shape[1] - 1)).clamp_min(1)
        return self.dice_weight * dice + self.focal_weight * focal


def augmentation(seed: int) -> mt.Compose:
    """The method's list: scaling, Gaussian noise, Gaussian blur, brightness, contrast,
    low-resolution simulation, gamma, mirroring (MONAI's implementations). Mirroring is along the
    superior-inferior and anterior-posterior axes only: a left-right flip puts the liver where the
    spleen is, and the side is what tells them apart in the portal venous phase."""
    keys = ["image", "label"]
    compose = mt.Compose([
        mt.RandZoomd(keys, prob=0.3, min_zoom=0.85, max_zoom=1.15, mode=("trilinear", "nearest"), keep_size=True),
        mt.RandGaussianNoised("image", prob=0.2, std=0.1),
        mt.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        mt.RandScaleIntensityd("image", prob=0.2, factors=0.25),  # brightness
        mt.RandStdShiftIntensityd("image", prob=0.2, factors=0.25),  # contrast
        mt.RandSimulateLowResolutiond("image", prob=0.2, zoom_range=(0.5, 1.0)),
        mt.RandAdjustContrastd("image", prob=0.2, gamma=(0.7, 1.5)),  # gamma
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=1),  # (z, y, x) arrays: axis 2 is x, left-right
    ])
    compose.set_random_state(seed)
    return compose


def _lesion_voxels(label: np.ndarray) -> list[np.ndarray]:
    """The voxel indices of each lesion (connected component of label 2)."""
    components, _ = ndimage.label(label == 2)
    return [np.argwhere(components[box] == n + 1) + [s.start for s in box]
            for n, box in enumerate(ndimage.find_objects(components))]


def _patch(image: np.ndarray, label: np.ndarray, lesions: list[np.ndarray], liver: np.ndarray, size: int,
           rng: np.random.Generator, centre_on: str):
    """A size^3 patch (padded where the case is smaller), centred on a voxel of a random lesion
    (`centre_on` "lesion"), a liver voxel ("liver": `liver` holds their flat indices) or anywhere."""
    shape = np.array(label.shape)
    if centre_on == "lesion" and lesions:
        voxels = lesions[int(rng.integers(len(lesions)))]
        centre = voxels[rng.integers(len(voxels))]
    elif centre_on == "liver" and len(liver):
        centre = np.array(np.unravel_index(liver[rng.integers(len(liver))], label.shape))
    else:
        centre = rng.integers(0, shape)
    lo = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    box = tuple(slice(a, a + size) for a in lo)
    img, lab = image[(slice(None), *box)], label[box]
    pad = [(0, max(0, size - n)) for n in lab.shape]
    if any(p[1] for p in pad):
        img = np.pad(img, [(0, 0), *pad])
        lab = np.pad(lab, pad)
    return img, lab


def _patch_centre(rng: np.random.Generator, config: TrainConfig) -> str:
    """Where the next patch is centred: "lesion", "liver" or "any", in the configured shares."""
    u = rng.random()
    if u < config.lesion_fraction:
        return "lesion"
    return "liver" if u < config.lesion_fraction + config.liver_fraction else "any"


def _drop_phases(image: np.ndarray, present: list[int], rng: np.random.Generator, p: float,
                 single: float = 0.0) -> np.ndarray:
    if single and rng.random() < single:  # no draw when off: runs without it stay reproducible
        keep = [present[int(rng.integers(len(present)))]]
    else:
        keep = [c for c in present if rng.random() >= p] or [present[int(rng.integers(len(present)))]]
    out = np.zeros_like(image)
    out[keep] = image[keep]
    return out


def train(train_cases: list[TrainingCase], val_cases: list[TrainingCase], out_dir: Path, config: TrainConfig, *,
          device: torch.device | None = None, resume: bool = False, init: tuple[dict, Normalisation] | None = None,
          progress: ProgressCallback = print_progress,
          cancel: CancelToken | None = None, precision: str = "fp32") -> tuple[LesionUNet, Normalisation, dict]:
    """Train; returns the lowest-validation-loss model, its normalisation and the history.
    Writes `checkpoint.pt` (every epoch), `best.pt` and `history.json` into `out_dir`.
    `init`: (weights, normalisation) of a model to fine-tune; its normalisation is kept, since the
    weights expect inputs scaled that way. `precision` 'bf16': the network's forward (training
    and validation) in bf16 autocast, its logits back in fp32 for the loss; weights, gradients
    and Adam in fp32."""
    if not train_cases or not val_cases:
        raise ValueError("training needs at least one training and one validation case")
    device = device or torch.device("cpu")
    world = distributed.world()
    progress = progress if world.is_main else silent
    global_batch = config.batch * world.size  # every rank draws them all and trains on its slice
    mine = slice(world.rank * config.batch, (world.rank + 1) * config.batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    normalisation = init[1] if init is not None else Normalisation.fit(
        {phase: [c.phases_hu[phase][(c.label == 1) | (c.label == 2)] for c in train_cases if phase in c.phases_hu]
         for phase in {p for c in train_cases for p in c.phases_hu}})
    inputs = [(normalisation.apply(c.phases_hu), c.label) for c in train_cases]
    present = [[n for n, v in enumerate(x) if np.any(v)] for x, _ in inputs]
    lesions = [_lesion_voxels(label) for _, label in inputs]
    livers = [np.flatnonzero(label == 1) for _, label in inputs]
    # channels-last 3D: a training step (2 x 64^3) took 0.41x the time of the contiguous layout on this
    # CPU (oneDNN; benchmarks/mixed_precision.py, results/mixed_precision_cpu.json)
    model = LesionUNet(width=config.width)
    if init is not None:
        model.load_state_dict(init[0])
    model = model.to(device, memory_format=torch.channels_last_3d)
    optimizer = adam(model.parameters(), config.lr)
    loss_fn = MaskedDiceFocalLoss(config)
    history: list[dict] = []
    best = {"val_loss": math.inf, "epoch": -1}
    epoch0 = 0
    checkpoint = out_dir / "checkpoint.pt"
    state = distributed.from_main(lambda: torch.load(checkpoint, map_location="cpu", weights_only=False)
                                  if resume and checkpoint.exists() else None)  # rank 0 reads, all get it
    if state is not None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{checkpoint} is not a checkpoint of this version")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, epoch0 = state["history"], state["best"], state["epoch"] + 1
        normalisation = Normalisation.from_json(state["normalisation"])
        progress(epoch0 / config.epochs, f"resuming after epoch {epoch0} of {config.epochs}")
    net = distributed.wrap(model)  # the model itself in one process
    for epoch in range(epoch0, config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        augment = augmentation(config.seed * 1000 + epoch)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (1 - epoch / config.epochs) ** config.lr_decay_power
        model.train()
        t0, losses = time.perf_counter(), []
        for step in range(config.steps_per_epoch):
            if cancel is not None:
                cancel.raise_if_cancelled()
            images, labels = [], []
            for _ in range(global_batch):
                n = int(rng.integers(len(inputs)))
                image, label = _patch(*inputs[n], lesions[n], livers[n], config.patch, rng, _patch_centre(rng, config))
                image = _drop_phases(image, present[n], rng, config.phase_drop, config.single_phase)
                sample = augment({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None].astype(np.float32))})
                images.append(torch.as_tensor(sample["image"]))
                labels.append(torch.as_tensor(sample["label"]))
            x = torch.stack(images[mine]).float().to(device, memory_format=torch.channels_last_3d)
            y = torch.stack(labels).round().to(device)
            loss = loss_fn(distributed.gather_batch(forward_in(precision, net, x)), y)  # on the whole global batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 10 == 0:
                progress((epoch + (step + 1) / config.steps_per_epoch) / config.epochs,
                         f"epoch {epoch + 1}/{config.epochs} step {step + 1}: loss {np.mean(losses[-10:]):.4f}")
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": float(np.mean(losses))}
        if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
            scores = validate(model, val_cases, normalisation, loss_fn, device, cancel, precision)  # (shared out)
            record.update(scores)
            progress((epoch + 1) / config.epochs,
                     f"epoch {epoch + 1}/{config.epochs}: val loss {scores['val_loss']:.4f}, "
                     f"lesion Dice {scores['val_lesion_dice']:.3f}, liver Dice {scores['val_liver_dice']:.3f}")
            if scores["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch, **scores}
                if world.is_main:
                    save_atomic({"model": model.state_dict(), "epoch": epoch}, out_dir / "best.pt")
        history.append({**record, "seconds": time.perf_counter() - t0})
        if not world.is_main:  # rank 0 alone writes
            continue
        save_atomic({"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "epoch": epoch, "history": history, "best": best, "normalisation": normalisation.to_json(),
                      "config": dataclasses.asdict(config)}, checkpoint)
        (out_dir / "history.json").write_text(json.dumps({"config": dataclasses.asdict(config), "history": history,
                                                          "best": best}, indent=2))
    if world.is_main:  # (the other processes return their last weights)
        model.load_state_dict(torch.load(out_dir / "best.pt", map_location=device, weights_only=False)["model"])
    return model.eval(), normalisation, {"history": history, "best": best, "config": dataclasses.asdict(config)}


@torch.no_grad()
def validate(model: LesionUNet, cases: list[TrainingCase], normalisation: Normalisation, loss_fn, device,
             cancel: CancelToken | None = None, precision: str = "fp32") -> dict:
    """Whole-case validation: mean loss, lesion and liver Dice (all phases given; IGNORE voxels left
    out). Under torchrun each process scores its share of the cases and the scores are merged."""
    model.eval()
    losses, lesion, liver = [], [], []
    for case in distributed.shard(cases):
        logits = predict_logits(functools.partial(forward_in, precision, model), normalisation.apply(case.phases_hu), device,
                                cancel=cancel)
        target = torch.from_numpy(case.label.astype(np.float32))[None, None]
        losses.append(float(loss_fn(logits[None], target)))
        known = case.label != IGNORE
        prediction, label = logits.argmax(0).numpy()[known], case.label[known]
        lesion.append(dice(prediction == 2, label == 2))
        liver.append(dice(prediction > 0, label > 0))
    losses, lesion, liver = zip(*distributed.gather(list(zip(losses, lesion, liver, strict=True))), strict=True)
    return {"val_loss": float(np.mean(losses)), "val_lesion_dice": float(np.mean(lesion)),
            "val_liver_dice": float(np.mean(liver))}
