"""`deepnav fetal train`: the head network trained from scratch on HC18-style data.

- Split by fetus (`hc18.split_by_subject`), deterministic seeds.
- Images are de-identified and scaled to the working resolution once (aspect ratio kept); the
  target is the filled reference ellipse, area-averaged to that resolution (a soft edge that
  puts the 0.5 level on the ellipse itself).
- Each sample is one of the four corner crops (the spec's multi-angle cropping; sometimes a
  random position instead), padded to the canvas. Augmentations suited to ultrasound: flips,
  rotation and scale (the head's pose and size vary), gain/contrast/gamma (TGC and dynamic
  range settings differ between scanners) and speckle-like multiplicative noise.
- Loss: pixel-wise binary cross-entropy (the spec's) plus soft Dice (the measured region is
  one large blob: Dice keeps the boundary honest when the head is small). Adam with cosine
  decay: from scratch it converges much faster than the spec's fine-tuning SGD.
- Every epoch runs the full inference path on the validation images (four crops, fusion,
  ellipse) and keeps the weights with the lowest mean absolute HC difference. A checkpoint is
  written each epoch; `resume` continues from it. `keep="last"` keeps the last epoch instead and
  `val_every=0` never validates, so that no choice rests on the validation images.
- Fine-tuning: `init` starts from a model file's weights (fresh optimiser); `restarts` > 1 splits
  the epochs into that many cosine cycles (warm restarts, SGDR), each cycle's last weights saved as
  a model (`cycle<k>.pt`, a snapshot ensemble's members); `boundary_weight` adds that much extra
  binary cross-entropy weight within `boundary_px` working pixels of the target's edge, the band
  where the HC is decided (the rest of the image is easy once the head is found).
- `canvas_hw` (`--canvas`) is the network's input and so the working scale: the default 176x256
  puts an 800x540 image at 284x192, 248x360 at 400x270. It is stored in the model file, and
  measuring uses the model's own.
- Under torchrun (deepnav.distributed), `batch` is per process: every rank draws the same global
  batch of N * batch crops (the draws and augmentation are cheap 2D work on the CPU, and drawing
  them all keeps the random streams those of one process) and trains on its own slice of it; the
  gradients are averaged (DistributedDataParallel) and batch norm uses the global batch's
  statistics, so N processes with batch b train as one with batch N * b. An epoch is one pass
  over the training images at the global batch. Validation images are shared out and the scores
  merged; rank 0 alone writes. A checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepnav import distributed
from deepnav.errors import InputError
from deepnav.progress import CancelToken, ProgressCallback, print_progress, silent
from deepnav.torch_runtime import adam, forward_in, seed_everything
from FetalBiometryLib import crops, segment
from FetalBiometryLib.deidentify import deidentify
from FetalBiometryLib.evaluation import score_case, summarise
from FetalBiometryLib.hc18 import Case, reference_ellipse
from FetalBiometryLib.image_io import read_image_2d
from FetalBiometryLib.network import HeadNet

UNMEASURED_PENALTY_MM = 50.0


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 40
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0
    corner_probability: float = 0.75
    rotation_deg: float = 20.0
    scale_jitter: float = 0.12
    val_every: int = 1  # 0: never (keep is then "last")
    keep: str = "best"  # "best": the lowest validation score; "last": the last epoch
    restarts: int = 1  # cosine cycles over the epochs (warm restarts)
    boundary_weight: float = 0.0  # extra cross-entropy weight near the target's edge
    boundary_px: int = 3
    init: str | None = None  # a model file whose weights training starts from
    canvas_hw: tuple[int, int] = crops.CANVAS_HW  # the network's input (rows, cols): sets the working scale

    def __post_init__(self):
        self.canvas_hw = crops.check_canvas(self.canvas_hw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"canvas_hw": list(self.canvas_hw)}


@dataclasses.dataclass
class Prepared:
    image: torch.Tensor  # (1, rows, cols) float16 at working resolution
    target: torch.Tensor  # same, soft filled ellipse
    layout: crops.Layout


def prepare(case: Case, canvas_hw: tuple[int, int] = crops.CANVAS_HW) -> Prepared:
    pixels, _ = deidentify(read_image_2d(case.image).pixels)
    layout = crops.layout_for(pixels.shape, canvas_hw)
    image = crops.to_working(torch.from_numpy(segment.normalise(pixels))[None, None], layout)
    filled = reference_ellipse(case.annotation).filled(pixels.shape).astype(np.float32)
    target = crops.to_working(torch.from_numpy(filled)[None, None], layout)
    return Prepared(image[0].half(), target[0].half(), layout)


def sample_batch(data: list[Prepared], config: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    canvas = config.canvas_hw
    x = torch.zeros(config.batch, 1, *canvas)
    y = torch.zeros(config.batch, 1, *canvas)
    for n in range(config.batch):
        item = data[int(rng.integers(len(data)))]
        (h, w), (rows, cols) = item.layout.crop_hw, item.layout.work_hw
        if rng.random() < config.corner_probability:
            r, c = item.layout.origins[int(rng.integers(4))]
        else:
            r, c = int(rng.integers(rows - h + 1)), int(rng.integers(cols - w + 1))
        x[n, :, :h, :w] = item.image[:, r:r + h, c:c + w].float()
        y[n, :, :h, :w] = item.target[:, r:r + h, c:c + w].float()
    return augment(x, y, config, rng)


def augment(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, rng: np.random.Generator):
    b = x.shape[0]
    angle = torch.from_numpy(np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, b))).float()
    scale = torch.from_numpy(rng.uniform(1 - config.scale_jitter, 1 + config.scale_jitter, b)).float()
    flip_x = torch.from_numpy(rng.choice([-1.0, 1.0], b)).float()
    flip_y = torch.from_numpy(rng.choice([-1.0, 1.0], b)).float()
    theta = torch.zeros(b, 2, 3)
    # affine_grid works in normalised coordinates; correct the rotation for the canvas aspect ratio
    aspect = x.shape[3] / x.shape[2]
    theta[:, 0, 0] = torch.cos(angle) / scale * flip_x
    theta[:, 0, 1] = -torch.sin(angle) / scale / aspect
    theta[:, 1, 0] = torch.sin(angle) / scale * aspect
    theta[:, 1, 1] = torch.cos(angle) / scale * flip_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False)
    y = F.grid_sample(y, grid, align_corners=False)
    gain = torch.from_numpy(rng.uniform(0.75, 1.3, (b, 1, 1, 1))).float()
    gamma = torch.from_numpy(rng.uniform(0.7, 1.4, (b, 1, 1, 1))).float()
    speckle = 1 + torch.from_numpy(rng.uniform(0.0, 0.15, (b, 1, 1, 1))).float() * torch.randn_like(x)
    x = (x.clamp(0, 1) ** gamma * gain * speckle).clamp(0, 1)
    return x, y


def boundary_band(target: torch.Tensor, radius: int) -> torch.Tensor:
    """1 within `radius` pixels (chessboard) of the edge of the target's 0.5 region, else 0."""
    inside = (target > 0.5).float()
    k = 2 * radius + 1
    grown = F.max_pool2d(inside, k, stride=1, padding=radius)
    shrunk = -F.max_pool2d(-inside, k, stride=1, padding=radius)
    return grown - shrunk


def loss_fn(logits: torch.Tensor, target: torch.Tensor, boundary_weight: float = 0.0, boundary_px: int = 3) -> torch.Tensor:
    if boundary_weight > 0:
        weight = 1 + boundary_weight * boundary_band(target, boundary_px)
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + dice.mean()


def cosine_factor(step: int, total: int, cycles: int = 1) -> float:
    """Learning-rate factor: cosine from 1 to 0 over each of `cycles` equal cycles of `total` steps."""
    if step >= total:
        return 0.0
    length = total / max(cycles, 1)
    return 0.5 * (1 + math.cos(math.pi * (step % length) / length))


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a saved head model (TorchScript archive, as shipped) or a state dict (best.pt)."""
    try:
        return {k: v.float() if v.is_floating_point() else v
                for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def train(train_cases: list[Case], val_cases: list[Case], out_dir: Path, config: TrainConfig, *,
          device: torch.device | None = None, resume: bool = False, metadata: dict | None = None,
          progress: ProgressCallback = print_progress, cancel: CancelToken | None = None,
          precision: str = "fp32") -> tuple[HeadNet, dict]:
    """`precision` 'bf16': the network's forward (training and validation) in bf16 autocast, its
    logits back in fp32 for the loss; batch-norm statistics, weights, gradients and Adam in fp32."""
    device = device or torch.device("cpu")
    world = distributed.world()
    progress = progress if world.is_main else silent
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = seed_everything(config.seed)
    net = HeadNet(config.width)
    if config.init:
        net.load_state_dict(initial_weights(config.init))
    model = distributed.global_batch_norm(net, world.active).to(device)
    optimiser = adam(model.parameters(), config.lr, weight_decay=config.weight_decay)
    global_config = dataclasses.replace(config, batch=config.batch * world.size)  # what every rank draws
    mine = slice(world.rank * config.batch, (world.rank + 1) * config.batch)  # and trains on
    steps = max(1, len(train_cases) // global_config.batch)
    total = config.epochs * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: cosine_factor(step, total, config.restarts))
    cycle_epochs = {round(config.epochs * (k + 1) / max(config.restarts, 1)) - 1: k + 1
                    for k in range(max(config.restarts, 1))} if config.restarts > 1 else {}
    history, start, best = [], 0, {"score": float("inf")}
    checkpoint = out_dir / "checkpoint.pt"
    state = distributed.from_main(lambda: torch.load(checkpoint, map_location="cpu", weights_only=False)
                                  if resume and checkpoint.is_file() else None)
    if state is not None:
        trained_at = tuple(state["config"].get("canvas_hw", crops.CANVAS_HW))
        if trained_at != tuple(config.canvas_hw):
            raise InputError(f"{checkpoint} was trained at canvas {trained_at[0]}x{trained_at[1]}: resume with "
                             f"--canvas {trained_at[0]}x{trained_at[1]}")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, start, best = state["history"], state["epoch"] + 1, state["best"]
        progress(0.0, f"resuming after epoch {start}")
    progress(0.0, f"preparing {len(train_cases)} training images")
    data = [prepare(c, config.canvas_hw) for c in train_cases]
    trained = distributed.wrap(model)  # the model itself in one process
    for epoch in range(start, config.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for _ in range(steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            x, y = sample_batch(data, global_config, rng)
            loss = loss_fn(forward_in(precision, trained, x[mine].to(device)), y[mine].to(device), config.boundary_weight,
                           config.boundary_px)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        row = {"epoch": epoch, **distributed.mean_across({"loss": float(np.mean(losses))}),
               "train_s": time.perf_counter() - t0}
        validate = config.val_every > 0 and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs)
        if validate:
            model.eval()
            segmenter = segment.HeadSegmenter.from_module(model, device, precision, config.canvas_hw)
            # each rank scores its share of the images; the rows merged in order, as one process makes them
            summary = summarise(distributed.gather([score_case(segmenter, c) for c in distributed.shard(val_cases)]))
            e = summary.get("ellipse")
            row.update(hc_mae_mm=e["hc_abs_diff_mm"]["mean"] if e else None,
                       hc_signed_mm=e["hc_signed_mean_mm"] if e else None, dice=e["dice"]["mean"] if e else None,
                       not_measurable=summary["not_measurable"])
            # selection score: mean |HC diff| with an image the model cannot measure counted as 50 mm
            measured = summary["measured"]
            row["score"] = ((row["hc_mae_mm"] or 0.0) * measured + UNMEASURED_PENALTY_MM * row["not_measurable"]) / \
                max(summary["images"], 1)
        if config.keep == "last" or not config.val_every:
            keep = epoch + 1 == config.epochs
        else:
            keep = validate and (row["score"] < best["score"] or not (out_dir / "best.pt").is_file())
        if keep:
            best = dict(row)
            if world.is_main:
                torch.save(model.state_dict(), out_dir / "best.pt")
        history.append(row)
        if not world.is_main:
            continue
        if epoch in cycle_epochs:  # the end of a cosine cycle: a snapshot, as a model file
            distributed.global_batch_norm(model, on=False)
            segment.save(model, out_dir / f"cycle{cycle_epochs[epoch]}.pt",
                         {**(metadata or {}), "config": config.to_json(), "epoch": epoch}, config.canvas_hw)
            distributed.global_batch_norm(model, world.active).to(device)  # saving left it on the CPU
        tmp = out_dir / ".partial-checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "history": history,
                    "epoch": epoch, "best": best, "config": config.to_json()}, tmp)
        tmp.replace(checkpoint)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        scores = f", validation |HC diff| {row['hc_mae_mm']:.2f} mm, Dice {row['dice']:.4f}" if row.get("dice") else ""
        scores += f", lr {schedule.get_last_lr()[0]:.2g}"
        progress((epoch + 1) / config.epochs,
                 f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}{scores} ({row['train_s']:.0f} s)")
    distributed.global_batch_norm(model, on=False)  # plain BatchNorm2d again (scripting, other users)
    if not world.is_main:  # rank 0 writes the model
        return model, {"best": best, "history": history, "model": None}
    model.load_state_dict(torch.load(out_dir / "best.pt", map_location=device))
    model_path = segment.save(model, out_dir / "model.pt", {**(metadata or {}), "config": config.to_json(),
                                                             "best_validation": best}, config.canvas_hw)
    return model, {"best": best, "history": history, "model": model_path}
