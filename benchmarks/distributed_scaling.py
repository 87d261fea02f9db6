"""Training throughput in 1 and 2 processes (torch.distributed, gloo on loopback; nccl when run on
GPUs), with the time of one gradient all-reduce, for the three networks as their trainers train
them (deepnav.distributed: DistributedDataParallel, the fusion stage's loss module, the liver's
batch Dice on the gathered logits, the fetal network's global batch norm).

    python benchmarks/distributed_scaling.py --json benchmarks/results/distributed_scaling_cpu.json

Each run is its own process (1) or torchrun job (2, `--standalone`): one process with one torch
thread and with every core, two processes with cores / 2 threads each; the machine's load average
is recorded beside each run (others' work shares the cores). Throughput counts the global
batch: pairs (fusion, 128^3), patches (liver, 64^3, 4 phases), images (fetal, 176x256 crops) per
second over the timed steps, after one warm-up step. The all-reduce time is a flat float32
tensor of the trained parameters' size, all-reduced 10 times (what DDP's buckets carry per step).
On a 2-core CPU shared by both processes the speed-up cannot be large; the point is that it is
correct (Testing/test_distributed.py) and measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion"), str(ROOT / "LiverLesionSeg"), str(ROOT / "FetalBiometry")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepnav import distributed  # noqa: E402
from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.torch_runtime import adam, machine_description, pick_device, seed_everything  # noqa: E402

BATCH = {"fusion": 1, "liver": 2, "fetal": 8}  # per process, the trainers' defaults


def _fusion(device, batch):
    from MRUSFusionLib.dataset import patient_samples
    from MRUSFusionLib.networks import Cascade
    from MRUSFusionLib.training import TrainConfig, _StageLoss, make_batch

    samples = patient_samples(10_000_000 + distributed.world().rank, frames=2)
    config = TrainConfig(batch=batch)
    # channels-last 3D, as the trainer since issue 24's mixed-precision work (results/distributed_scaling_cpu.json
    # was measured before, with contiguous weights: a rigid step then took ~1.4x as long, mixed_precision_cpu.json)
    model = Cascade().to(device, memory_format=torch.channels_last_3d)
    net = distributed.wrap(_StageLoss(model, "rigid", config, distributed.world().active))
    rng = np.random.default_rng(distributed.world().rank)
    batches = [make_batch(samples[i % len(samples)], config, device, rng) for i in range(batch)]

    def step():
        for n, b in enumerate(batches):
            with distributed.no_sync(net) if n < len(batches) - 1 else contextlib.nullcontext():
                loss, _ = net(b, rng)
                (loss / len(batches)).backward()

    return model.rigid, step


def _liver(device, batch):
    from LiverLesionSegLib.network import LesionUNet
    from LiverLesionSegLib.training import MaskedDiceFocalLoss, TrainConfig

    config = TrainConfig(batch=batch)
    model = LesionUNet(width=config.width).to(device, memory_format=torch.channels_last_3d)
    net = distributed.wrap(model)
    loss_fn = MaskedDiceFocalLoss(config)
    g = torch.Generator().manual_seed(distributed.world().rank)
    x = torch.randn(batch, 4, config.patch, config.patch, config.patch, generator=g).to(
        device, memory_format=torch.channels_last_3d)
    y = torch.randint(0, 3, (batch * distributed.world().size, 1, config.patch, config.patch, config.patch),
                      generator=torch.Generator().manual_seed(0)).float().to(device)

    def step():
        loss_fn(distributed.gather_batch(net(x)), y).backward()

    return model, step


def _fetal(device, batch):
    from FetalBiometryLib.crops import CANVAS_HW
    from FetalBiometryLib.network import HeadNet
    from FetalBiometryLib.training import loss_fn

    model = distributed.global_batch_norm(HeadNet(16), distributed.world().active).to(device)
    net = distributed.wrap(model)
    g = torch.Generator().manual_seed(distributed.world().rank)
    x = torch.rand(batch, 1, *CANVAS_HW, generator=g).to(device)
    y = (torch.rand(batch, 1, *CANVAS_HW, generator=g) > 0.5).float().to(device)

    def step():
        loss_fn(net(x), y).backward()

    return model, step


def worker(kind: str, steps: int, out: Path, device_name: str) -> None:
    with distributed.session(device_name):
        record = _measure(kind, steps, pick_device(device_name))  # its DDP objects gone before the group
        if distributed.is_main():
            out.write_text(json.dumps(record))


def _measure(kind: str, steps: int, device: torch.device) -> dict:
    world = distributed.world()
    seed_everything(0)
    batch = BATCH[kind]
    model, step = {"fusion": _fusion, "liver": _liver, "fetal": _fetal}[kind](device, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, 1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        step()
        optimizer.step()

    train_step()  # warm-up
    _sync(device)
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    flat = torch.zeros(sum(p.numel() for p in params), device=device)
    reduce_ms = []
    for _ in range(10):
        distributed.barrier()
        t = time.perf_counter()
        if world.active:
            torch.distributed.all_reduce(flat)
        _sync(device)
        reduce_ms.append(1000 * (time.perf_counter() - t))
    unit = {"fusion": "pairs", "liver": "patches", "fetal": "images"}[kind]
    return {"model": kind, "processes": world.size, "backend": world.backend or "none (one process)",
            "device": str(device), "threads_per_process": torch.get_num_threads(),
            "batch_per_process": batch, "global_batch": batch * world.size, "steps": steps,
            "seconds": seconds, "unit": unit, f"{unit}_per_s": batch * world.size * steps / seconds,
            "step_s": seconds / steps, "trained_parameters": int(flat.numel()),
            "allreduce_ms_median": float(np.median(reduce_ms)) if world.active else 0.0}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["fusion", "liver", "fetal"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, Path(args.worker[1]), args.device)
        return 0
    cores = os.cpu_count() or 1
    runs = []
    plan = [(n, t) for n in args.processes for t in sorted({1, max(1, cores // n)})] if args.device == "cpu" else \
        [(n, 1) for n in args.processes]
    for kind in args.models:
        for n, t in plan:
            part = args.json.with_suffix(f".{kind}.{n}.part")
            launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            threads = str(t)
            load_before = os.getloadavg()[0]
            env = {**os.environ, "OMP_NUM_THREADS": threads, "DEEPNAV_THREADS": threads}
            subprocess.run([sys.executable, *launcher, __file__, "--worker", kind, str(part), "--steps", str(args.steps),
                            "--device", args.device, "--json", str(args.json)], check=True, env=env)
            runs.append({**json.loads(part.read_text()), "load_average_1min": [load_before, os.getloadavg()[0]]})
            part.unlink()
            r = runs[-1]
            print(f"{kind}: {n} process(es) x {t} thread(s), {r[r['unit'] + '_per_s']:.2f} {r['unit']}/s, "
                  f"step {r['step_s']:.2f} s, all-reduce {r['allreduce_ms_median']:.1f} ms", flush=True)
    speedups = {}  # against one process with the same threads per process as each run
    for kind in args.models:
        rate = {(r["processes"], r["threads_per_process"]): r[f"{r['unit']}_per_s"] for r in runs if r["model"] == kind}
        speedups[kind] = {f"{n}x{t}": v / rate[(1, t)] for (n, t), v in rate.items() if (1, t) in rate and n > 1}
    write_json({"machine": machine_description(), "runs": runs, "speedup": speedups}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
