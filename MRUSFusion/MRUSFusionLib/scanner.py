"""A simulated 3D US scanner: streams volumes to the fusion service over OpenIGTLink at a set
rate, as a real scanner (or PLUS) would, and collects what comes back.

Each frame goes out with its own timestamp; the service echoes it on every answer, and its
STRING report comes last. End to end is from sending a frame to receiving its last result
message (what the surgeon sees: send, transport, queue, registration, results back); the
report, with quality figures computed after the results went out, follows. A service that
corrects sends a second set of results and a second report (stage "corrected") for the same
frame, unless a newer frame was waiting; its latency is measured the same way.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
from collections.abc import Callable, Sequence

from deepnav.imaging import Volume
from deepnav.statistics import spread
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_REPORT
from MRUSFusionLib.igtl_transport import Connection, MessageReader, ProtocolError, match_timestamp, wire_timestamp


@dataclasses.dataclass
class SentFrame:
    index: int  # position in the stream
    source: int  # which input volume
    timestamp: float  # as the receiver decodes it
    sent_at: float  # perf_counter before sending
    send_s: float = 0.0
    report: dict | None = None
    results_at: float | None = None  # perf_counter when the last result message (image, transform) arrived
    done_at: float | None = None  # perf_counter when the report (sent after the results) arrived
    error: str | None = None
    messages: dict = dataclasses.field(default_factory=dict)  # device -> newest message, for kept frames
    messages_stage: str = "network"  # the stage those messages are from
    corrected_report: dict | None = None  # the second result of the frame, when the service sends one
    corrected_results_at: float | None = None
    corrected_at: float | None = None

    @property
    def more_coming(self) -> bool:
        """The service said a corrected result of this frame follows, and it has not arrived."""
        return bool(self.report and self.report.get("more_coming")) and self.corrected_at is None

    @property
    def corrected_end_to_end_s(self) -> float | None:
        """Send to the corrected result received: when the display can show the corrected frame."""
        if self.corrected_at is None:
            return None
        return (self.corrected_results_at or self.corrected_at) - self.sent_at

    @property
    def end_to_end_s(self) -> float | None:
        """Send to the last result received: when the display can show this frame."""
        if self.done_at is None:
            return None
        return (self.results_at or self.done_at) - self.sent_at

    @property
    def report_s(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.sent_at


@dataclasses.dataclass
class StreamRun:
    frames: list[SentFrame]
    duration_s: float
    errors: list[str]

    @property
    def completed(self) -> list[SentFrame]:
        return [f for f in self.frames if f.report is not None]


def stream(host: str, port: int, volumes: Sequence[Volume], *, count: int, rate_hz: float,
           device: str = "US", keep: Callable[[int], bool] = lambda i: False, settle_s: float = 30.0,
           progress: Callable[[SentFrame], None] | None = None) -> StreamRun:
    """Send `count` frames cycling through `volumes` at `rate_hz`; wait (up to `settle_s`) for
    the answers to the last one. Frames the service dropped simply get no report."""
    conn = Connection.connect(host, port)
    reader = MessageReader(conn)
    frames: list[SentFrame] = []
    errors: list[str] = []
    by_time: dict[float, SentFrame] = {}
    t0 = time.perf_counter()

    def collect(block_s: float) -> None:
        deadline = time.perf_counter() + block_s
        while True:
            try:
                item = reader.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                return
            if item is None:
                reader.queue.put(None)
                return
            message, arrived = item
            if isinstance(message, ProtocolError):
                errors.append(str(message))
                continue
            frame = match_timestamp(by_time, message.timestamp)
            if message.message_type == "STATUS":
                errors.append(message.text)
                if frame is not None:
                    frame.error = message.text
            elif frame is None:
                continue
            elif message.message_type == "STRING" and message.device_name == DEVICE_REPORT:
                report = json.loads(message.string)
                if report.get("stage") == "corrected":
                    frame.corrected_report, frame.corrected_at = report, arrived
                else:
                    frame.report, frame.done_at = report, arrived
                    if progress:
                        progress(frame)
            else:
                second = frame.report is not None  # after the first report: the corrected stage
                if second:
                    frame.corrected_results_at = arrived
                else:
                    frame.results_at = arrived
                if keep(frame.index):
                    frame.messages[message.device_name] = message
                    frame.messages_stage = "corrected" if second else "network"

    try:
        for index in range(count):
            due = t0 + index / rate_hz
            collect(max(0.0, due - time.perf_counter()))
            source = index % len(volumes)
            volume = volumes[source]
            stamp = time.time()
            frame = SentFrame(index, source, wire_timestamp(stamp), time.perf_counter())
            frames.append(frame)
            by_time[frame.timestamp] = frame
            conn.send(msgs.volume_to_image(volume.array, volume, device, stamp))
            frame.send_s = time.perf_counter() - frame.sent_at
        # the last frame is never dropped (nothing replaces it): wait for its answer
        deadline = time.perf_counter() + settle_s
        while frames and (frames[-1].report is None or frames[-1].more_coming) and frames[-1].error is None \
                and time.perf_counter() < deadline:
            collect(0.2)
        collect(0.2)
    finally:
        reader.close()
    return StreamRun(frames, time.perf_counter() - t0, errors)


def percentiles(values: Sequence[float]) -> dict:
    s = spread(values)
    return {"p50": s["median"], "p95": s["p95"], "n": s["n"]}


def latency_summary(run: StreamRun) -> dict:
    """End-to-end and per-stage p50/p95 (s), frames sent/completed/dropped, throughput."""
    done = run.completed
    stages: dict[str, list[float]] = {}
    for f in done:
        for name, value in f.report["timings_s"].items():
            stages.setdefault(name, []).append(value)
    dropped = max((f.report["frames_dropped"] for f in done), default=0)
    return {"frames": len(run.frames), "frames_completed": len(done), "dropped_frames": dropped,
            "errors": len(run.errors), "duration_s": run.duration_s,
            "throughput_hz": len(done) / run.duration_s if run.duration_s > 0 else 0.0,
            "end_to_end_s": percentiles([f.end_to_end_s for f in done]),
            "corrected_frames": sum(f.corrected_at is not None for f in done),
            "corrected_end_to_end_s": percentiles([f.corrected_end_to_end_s for f in done if f.corrected_at is not None]),
            "report_s": percentiles([f.report_s for f in done]),
            "send_s": percentiles([f.send_s for f in run.frames]),
            "stages_s": {name: percentiles(v) for name, v in stages.items()}}
