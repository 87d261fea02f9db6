"""One process, or one of several under `torchrun`: the torch.distributed plumbing every trainer
and batch command shares.

Run as usual, `deepnav ...` is one process and nothing here does anything (world() is rank 0 of 1,
every helper is the identity). Under `torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint
HOST:PORT] -m deepnav ...`, `session()` (entered by deepnav.cli for the commands that support it)
joins the job from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): `nccl`
when the command's device is a GPU (each process on the GPU of its LOCAL_RANK), `gloo` on the CPU,
with a timeout on every collective (DEEPNAV_DIST_TIMEOUT_S, default 900 s) so that a rank that
died or hangs ends the job with PeerLost's one-line message instead of a hang.

Conventions the trainers follow:
- rank 0 alone writes files and reports progress (`is_main()`); what every rank needs from a
  file (a checkpoint to resume) is read on rank 0 and sent to the others (`from_main`), so that the
  nodes need not share a file system for reading;
- work lists are dealt round-robin (`shard`: item i to rank i % N) and results put back in their
  original order (`gather`), so a merged result is the one a single process makes;
- gradients are averaged by DistributedDataParallel (`wrap`); losses that are not a plain mean
  over the batch (batch Dice, masked means) sum their parts across ranks with `sum_across`
  (differentiable), and batch norm uses the statistics of the whole global batch (`GlobalBatchNorm2d`),
  so N processes with batch b train as one with batch N*b.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from deepnav.errors import PeerLost

T = TypeVar("T")

TIMEOUT_ENV = "DEEPNAV_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.backend})" if self.active else "one process"


_world = World()


def world() -> World:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""
    return _world


def is_main() -> bool:
    return _world.is_main


def launched_by_torchrun() -> bool:
    """torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@contextlib.contextmanager
def session(device: str | torch.device = "auto") -> Iterator[World]:
    """Join the torchrun job for the duration of a command (outside torchrun: one process, nothing
    to do), and leave it cleanly however the command ends. The backend follows the device: nccl
    for a GPU (this process's GPU: cuda:LOCAL_RANK; gloo beside it for CPU tensors), gloo for the
    CPU. A collective that fails because a peer is gone, or that waits longer than the timeout,
    becomes PeerLost."""
    global _world
    if not launched_by_torchrun() or dist.is_initialized():
        yield _world
        return
    from deepnav.torch_runtime import pick_device

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device) if isinstance(device, str) else device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
    try:
        # with GPUs, nccl for device tensors and gloo for the few CPU ones (scores, objects)
        dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()),
                                device_id=torch.device("cuda", local_rank) if backend == "nccl" else None)
    except Exception as exc:  # the rendezvous never completed
        raise PeerLost(f"rank {rank} of {size}: could not join the torchrun job: {_first_line(exc)}") from exc
    _world = World(rank, size, local_rank, backend)
    try:
        yield _world
    except Exception as exc:
        if _is_peer_failure(exc):
            raise PeerLost(f"rank {rank} of {size} stopped: another process of the job failed or stopped answering "
                           f"within {timeout_s():.0f} s ({TIMEOUT_ENV}); see that process's own message "
                           f"[{_first_line(exc)}]") from exc
        raise
    finally:
        _world = World()
        # DistributedDataParallel objects left in reference cycles must go before their process
        # group: one collected after it aborted the process at exit ("terminate called ...")
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("connection closed", "connection reset", "timed out", "gloo", "nccl", "broken pipe"))


def barrier() -> None:
    if _world.active:
        dist.barrier()


def shard(items: Sequence[T], rank: int | None = None, size: int | None = None) -> list[T]:
    """This rank's share of a work list: items rank, rank + N, rank + 2N, ... (round-robin keeps
    the shares within one item of each other and mixes long and short items)."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    return list(items[rank::size])


def gather(local: list[T]) -> list[T]:
    """Every rank's `shard` results put back together, in the order of the original list, on every
    rank (one process: `local` itself)."""
    if not _world.active:
        return list(local)
    parts: list = [None] * _world.size
    dist.all_gather_object(parts, list(local))
    merged: list[T] = []
    for i in range(max(len(p) for p in parts)):
        merged.extend(p[i] for p in parts if i < len(p))
    return merged


def gather_concat(local: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order, on every rank (one process: `local`)."""
    if not _world.active:
        return list(local)
    parts: list = [None] * _world.size
    dist.all_gather_object(parts, list(local))
    return [x for p in parts for x in p]


def from_main(make: Callable[[], T]) -> T:
    """`make()` run on rank 0 alone (reading a checkpoint, say) and its result sent to every rank."""
    if not _world.active:
        return make()
    box = [make() if _world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (for figures every rank computes on its own share of
    equal size, e.g. its mean training loss)."""
    if not _world.active or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / _world.size for k, v in zip(values, t.tolist(), strict=True)}


class _SumAcross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's part
        return grad


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, differentiably: the backward pass sends each rank the gradient of
    every rank's loss with respect to its part (plain synchronous all-reduces both ways; torch's
    torch.distributed.nn.functional is deprecated). One process: t."""
    return _SumAcross.apply(t) if _world.active else t


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(_world.size)]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        return grad[_world.rank * ctx.rows:(_world.rank + 1) * ctx.rows]


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Every rank's (equal-sized) batch concatenated along dim 0 in rank order, differentiably:
    a loss that is not a mean over its batch (batch Dice, a masked mean) is then computed on the
    whole global batch on every rank, exactly as one process computes it, and the backward pass
    sends each rank the gradient for its own rows (times the world size, which
    DistributedDataParallel's averaging divides out). One process: t."""
    return _GatherBatch.apply(t) if _world.active else t


def wrap(model: nn.Module, **kwargs) -> nn.Module:
    """The model as DistributedDataParallel in a job (gradients averaged over the ranks during
    backward), the model itself in one process. Parameters that do not require gradients (a frozen
    stage) are left out by DDP."""
    if not _world.active:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # buffers (batch-norm statistics) are the same on every rank: no broadcast before each forward
    # (torch >= 2.12 names this forward_sync_buffers; broadcast_buffers before)
    no_sync_buffers = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")
    return DistributedDataParallel(model, **{no_sync_buffers: False}, **kwargs)


def no_sync(model: nn.Module):
    """Accumulate gradients without averaging them (all but the last of several backward passes
    per step); a no-op outside DistributedDataParallel."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch: each rank's sums
    are added up across the ranks (differentiably), as torch's SyncBatchNorm does on GPUs only.
    Same parameters and buffers as BatchNorm2d (checkpoints and models are unchanged); in one
    process, or in eval mode, it is BatchNorm2d exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world.active):
            return super().forward(x)
        x = x.float()  # statistics in fp32 under bf16 autocast too, as BatchNorm2d's own kernel keeps them
        dims = [0, 2, 3]
        count = sum_across(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = sum_across(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = sum_across((centred * centred).sum(dims)) / count  # biased: what normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def global_batch_norm(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch the model's BatchNorm2d layers to GlobalBatchNorm2d (on) or back (off; before
    scripting or saving a model), in place: the class alone changes, the weights stay."""
    for module in model.modules():
        if on and type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
        elif not on and type(module) is GlobalBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model

