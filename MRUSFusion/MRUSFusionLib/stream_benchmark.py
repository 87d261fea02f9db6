"""`deepnav fusion bench-stream`: the live path measured, fusion beside the transport alone.

For each volume size (cubic uint8, the probe's region of the synthetic patient resampled to
N^3) the service runs twice in this process: echoing each volume back (transport alone:
pack, CRC, loopback both ways, parse) and registering it (the real service). A simulated
scanner streams frames at a fixed rate over loopback OpenIGTLink. Reported per run:
end-to-end latency p50/p95 (send to report received), per-stage medians, throughput, dropped
frames, and resident memory (peak, and its growth over the second half: flat means no
per-frame leak), descriptors and threads; a latency trend over the run shows whether a backlog grows.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from deepnav.imaging import Volume, resample_to_grid
from deepnav.torch_runtime import machine_description
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.phantom import make_patient
from MRUSFusionLib.scanner import latency_summary, stream
from MRUSFusionLib.service import EchoProcessor, FusionProcessor, FusionService

BENCH_PATIENT_SEED = 42


def _rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), MB."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_figures(pid: int | None = None) -> dict:
    """Resident memory (MB), open descriptors and threads of a process (this one by default)."""
    base = f"/proc/{pid or 'self'}"
    with open(f"{base}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return {"rss_mb": _rss_mb(pid), "descriptors": len(os.listdir(f"{base}/fd")), "threads": threads}


class ProcessSampler:
    """Resident memory, descriptors and threads of a process (this one by default) every
    `period_s`, in a thread; a process that has ended stops the sampling."""

    def __init__(self, pid: int | None = None, period_s: float = 0.5):
        self.pid = pid
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), process_figures(self.pid)))
            except OSError:  # the process is gone
                return
            self._stop.wait(period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Memory: peak, and the median in each quarter of the run: the allocator breathes by some
        tens of MB; a per-frame leak would climb quarter after quarter (a 16 MB frame at 2 Hz:
        ~1.9 GB/min). Descriptors and threads: at the start, at most, at the end."""
        t = np.array([s[0] for s in self.samples])
        rss = np.array([s[1]["rss_mb"] for s in self.samples])
        quarter = np.minimum(((t - t[0]) / max(t[-1] - t[0], 1e-9) * 4).astype(int), 3)
        medians = [float(np.median(rss[quarter == q])) if np.any(quarter == q) else float("nan") for q in range(4)]
        ranges = [[float(rss[quarter == q].min()), float(rss[quarter == q].max())] if np.any(quarter == q) else []
                  for q in range(4)]
        counts = {name: [s[1][name] for s in self.samples] for name in ("descriptors", "threads")}
        return {"peak_mb": float(rss.max()), "start_mb": float(rss[0]), "end_mb": float(rss[-1]),
                "quarter_median_mb": medians, "quarter_range_mb": ranges,
                "growth_q2_to_q4_mb": medians[3] - medians[1],
                **{name: {"start": v[0], "max": max(v), "end": v[-1]} for name, v in counts.items()}}


def bench_volume(frame: Volume, size: int) -> Volume:
    """The US frame's region resampled to size^3 voxels (same extent, same axes), uint8."""
    extent = frame.spacing * (np.array(frame.size_ijk) - 1)
    spacing = extent / (size - 1)
    grid = Volume(np.zeros((size,) * 3, np.float32), spacing, frame.origin, frame.direction)
    values = resample_to_grid(frame.with_array(frame.array.astype(np.float32)), grid).array
    return grid.with_array(np.clip(np.round(values), 0, 255).astype(np.uint8))


def _trend(run) -> dict:
    """End-to-end latency in the first and last third of the run, and its slope: a growing
    backlog shows as a positive slope and a last third slower than the first."""
    done = [f for f in run.completed if f.end_to_end_s is not None]
    if len(done) < 6:
        return {}
    idx = np.array([f.index for f in done], float)
    e2e = np.array([f.end_to_end_s for f in done])
    third = len(done) // 3
    return {"first_third_p50_s": float(np.median(e2e[:third])), "last_third_p50_s": float(np.median(e2e[-third:])),
            "slope_s_per_100_frames": float(np.polyfit(idx, e2e, 1)[0] * 100)}


def run_benchmark(model: LoadedModel, *, frames: int = 300, rate_hz: float = 2.0, sizes=(128, 256),
                  correct: bool = False, log=print) -> dict:
    """Echo, fusion and (`correct`) fusion whose frames are followed by their corrected results,
    each streamed `frames` times per volume size."""
    patient = make_patient(BENCH_PATIENT_SEED, frames=1)
    runs = []
    fusion = FusionProcessor(model, patient.mr, patient.liver)
    fusion.warm_up()
    processors = [EchoProcessor(), fusion]
    if correct:
        corrected = FusionProcessor(model, patient.mr, patient.liver, correct=True)
        corrected.name = "fusion+correction"
        processors.append(corrected)
    for size in sizes:
        volume = bench_volume(patient.frames[0].image, size)
        for processor in processors:
            log(f"{size}^3 uint8 ({volume.array.nbytes / 2**20:.0f} MB), {processor.name}: "
                f"{frames} frames at {rate_hz:g} Hz")
            with ProcessSampler() as memory, FusionService(processor, port=0) as service:
                run = stream("127.0.0.1", service.port, [volume], count=frames, rate_hz=rate_hz)
            summary = latency_summary(run)
            runs.append({"size": size, "megabytes": volume.array.nbytes / 2**20, "mode": processor.name,
                         **summary, "stage_p50_s": {k: v["p50"] for k, v in summary.pop("stages_s").items()},
                         "trend": _trend(run), "memory": memory.summary()})
    return {"frames": frames, "rate_hz": rate_hz, "device": str(model.device), "model": str(model.path),
            "note": "service and scanner share one process (memory is theirs together); loopback TCP",
            "runs": runs, "machine": machine_description()}


def format_table(report: dict) -> str:
    head = (f"{'volume':>14s} {'mode':>17s} {'e2e p50':>9s} {'e2e p95':>9s} {'done':>5s} {'dropped':>8s} "
            f"{'Hz':>5s} {'trend/100':>10s} {'peak MB':>8s} {'Q2->Q4 MB':>10s}")
    lines = [head]
    for r in report["runs"]:
        e2e, trend, mem = r["end_to_end_s"], r["trend"], r["memory"]
        lines.append(f"{r['size']:>5d}^3 {r['megabytes']:5.0f}MB {r['mode']:>17s} {e2e['p50'] * 1000:7.0f}ms "
                     f"{e2e['p95'] * 1000:7.0f}ms {r['frames_completed']:5d} {r['dropped_frames']:8d} "
                     f"{r['throughput_hz']:5.2f} {trend.get('slope_s_per_100_frames', 0.0) * 1000:8.1f}ms "
                     f"{mem['peak_mb']:8.0f} {mem['growth_q2_to_q4_mb']:10.1f}")
    for r in report["runs"]:
        if r.get("corrected_frames"):
            c = r["corrected_end_to_end_s"]
            lines.append(f"{r['size']:>5d}^3 {r['mode']}: {r['corrected_frames']} of {r['frames_completed']} frames also "
                         f"corrected (the others had a newer frame waiting), send to corrected result "
                         f"p50 {c['p50']:.2f} s, p95 {c['p95']:.2f} s")
    lines.append(f"{report['frames']} frames at {report['rate_hz']:g} Hz on {report['device']}; "
                 "e2e = send to last result received; trend = slope of e2e over the run; "
                 "Q2->Q4 = median resident memory, last quarter minus second")
    return "\n".join(lines)
