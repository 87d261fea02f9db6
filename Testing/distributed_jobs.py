"""One trainer on tiny data, in this process: alone (`python distributed_jobs.py ...`) or as one
rank of a torchrun job (`torchrun --nproc-per-node 2 distributed_jobs.py ...`). Used by
test_distributed.py, which compares what the runs leave in their output folders.

    distributed_jobs.py KIND DATA OUT BATCH EPOCHS [--resume]

KIND: fusion (DATA: a pickle of (train, validation) Samples), liver (DATA: a pickle of
(train, validation) TrainingCases) or fetal (DATA: an HC18-style folder); die or stall: rank 1
exits, or stops answering, while rank 0 waits in a collective.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "MRUSFusion", ROOT / "FetalBiometry", ROOT / "LiverLesionSeg"):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from deepnav import distributed  # noqa: E402
from deepnav.progress import silent  # noqa: E402


def run(kind: str, data: Path, out: Path, batch: int, epochs: int, resume: bool) -> None:
    if kind == "fusion":
        from MRUSFusionLib.training import TrainConfig, train

        train_samples, val_samples = pickle.loads(data.read_bytes())
        config = TrainConfig(rigid_epochs=1, bspline_epochs=epochs - 1, steps_per_epoch=2, batch=batch, seed=3,
                             weight_average=0.9)
        train(train_samples, distributed.shard(val_samples), out, config, resume=resume, progress=silent)
    elif kind == "liver":
        from LiverLesionSegLib.training import TrainConfig, train

        train_cases, val_cases = pickle.loads(data.read_bytes())
        config = TrainConfig(epochs=epochs, steps_per_epoch=2, batch=batch, patch=32, width=4, lr=1e-3)
        train(train_cases, val_cases, out, config, resume=resume, progress=silent)
    elif kind == "fetal":
        from FetalBiometryLib.hc18 import find_cases, split_by_subject
        from FetalBiometryLib.training import TrainConfig, train

        train_cases, val_cases = split_by_subject(find_cases(data), 0.34, seed=0)
        config = TrainConfig(epochs=epochs, batch=batch, width=4)
        train(train_cases, val_cases, out, config, resume=resume, progress=silent)
    elif kind in ("die", "stall"):
        distributed.barrier()
        if distributed.world().rank == 1:
            if kind == "die":
                os._exit(3)
            time.sleep(120)
        distributed.mean_across({"loss": 1.0})
    else:
        raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same arithmetic alone and in a job; two ranks share two cores
    kind, data, out, batch, epochs = sys.argv[1:6]
    try:
        with distributed.session("cpu"):
            run(kind, Path(data), Path(out), int(batch), int(epochs), "--resume" in sys.argv)
    except distributed.PeerLost as exc:  # as deepnav.cli reports it
        print(f"deepnav: error: {exc}", file=sys.stderr)
        sys.exit(1)
