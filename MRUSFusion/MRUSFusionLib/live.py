"""Live registration for an interactive host (the Slicer module): US frames go in from the GUI
thread, results come out to be polled on the GUI thread, and the registration runs in between,
either on a worker thread in this process (`LocalRegistration`) or in a `deepnav fusion serve`
service over OpenIGTLink, for example on a GPU machine (`RemoteRegistration`, which needs no
torch in this process).

The GUI never waits: `submit` only leaves the frame in a latest-frame-only mailbox (a frame that
arrives while an older one still waits replaces it, counted as dropped) and `poll` only takes
the newest finished result, if any. Both back ends give the same `LiveResult`, in the forms that
Slicer's nodes take.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import queue
import threading
import time

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import Volume
from MRUSFusionLib import fields
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_FIELD, DEVICE_REPORT, DEVICE_RIGID, DEVICE_WARPED
from MRUSFusionLib.igtl_transport import (
    Connection,
    ConnectionClosed,
    MessageReader,
    ProtocolError,
    match_timestamp,
    wire_timestamp,
)
from MRUSFusionLib.mailbox import LatestFrameMailbox

log = logging.getLogger("deepnav.fusion.live")

US_DEVICE = "DeepNavUS"  # the device name frames are sent under in service mode
_FRAME = "frame"  # the one mailbox key: a live host has one US source


def confidence(report: dict) -> dict:
    """What a surgeon reads beside the newest result, from its report: the network's MIND distance
    before and after and its folding, or, for a corrected result (a service's default; not with
    --fast), the correction's MIND-SSC before and after, the inlier share of its robust fit,
    its distance from the network's answer, its folding and its flags."""
    if report.get("stage") == "corrected" and isinstance(report.get("correction"), dict):
        c = report["correction"]
        keys = ("mind_ssc_before", "mind_ssc_after", "inlier_share", "network_disagreement_mm", "folding_percent", "flags")
        return {"stage": "corrected", **{k: c[k] for k in keys if k in c}}
    figures = {k: report[k] for k in ("mind_before", "mind_after", "folding_percent") if k in report}
    return {"stage": "network", **figures} if figures else {}


@dataclasses.dataclass
class LiveResult:
    warped: Volume  # the US warped onto the MR, uint8, on the 128^3 fusion grid or, corrected, the registration region (LPS)
    rigid_to_parent_ras: np.ndarray  # 4x4: the rigid stage as Slicer's to-parent matrix (US -> MR, RAS)
    field_ras: np.ndarray  # the whole registration, phi(x) - x, (k, j, i, 3) float32 RAS mm, resampling
    field_grid: Volume  # convention (MR -> US), on this grid (LPS geometry): as sent, as MRML takes it
    report: dict  # timings_s, device, and the service's frame counts in service mode
    latency_s: float  # from `submit` to the result being ready to show

    def field_lps(self) -> sitk.Image:
        """The field as an ITK displacement image (LPS vectors and geometry), for files and checks."""
        return fields.ras_vectors_to_lps_image(self.field_ras, self.field_grid)


class LiveRegistration:
    """What both back ends share: the two mailboxes and the figures shown to the user."""

    device = ""

    def __init__(self):
        self._frames = LatestFrameMailbox()
        self._results = LatestFrameMailbox()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._done_at: collections.deque[float] = collections.deque(maxlen=20)
        self._latencies: collections.deque[float] = collections.deque(maxlen=20)
        self.submitted = 0
        self.completed = 0
        self.remote_dropped = 0
        self.quality: dict = {}
        self.last_error: str | None = None

    def submit(self, us: Volume) -> None:
        """Hand a US frame over (already copied out of the GUI's buffers); returns at once."""
        self.submitted += 1
        self._frames.put(_FRAME, (us, time.perf_counter()))

    def poll(self) -> LiveResult | None:
        """The newest result not yet taken, or None; never blocks."""
        return self._results.take(0)

    def stats(self) -> dict:
        """Frame rate and latency over the last 20 results, frame counts, device, quality."""
        done, latencies = list(self._done_at), list(self._latencies)
        rate = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0
        return {"device": self.device, "frames_submitted": self.submitted, "frames_completed": self.completed,
                "frames_dropped": self._frames.dropped + self._results.dropped + self.remote_dropped,
                "frame_rate_hz": rate, "latency_s": float(np.median(latencies)) if latencies else None,
                "quality": dict(self.quality), "last_error": self.last_error}

    def close(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _publish(self, result: LiveResult) -> None:
        self.completed += 1
        self.last_error = None
        self._done_at.append(time.perf_counter())
        self._latencies.append(result.latency_s)
        self._results.put(_FRAME, result)  # an untaken older result is replaced, not queued


class LocalRegistration(LiveRegistration):
    """Registers on a worker thread of this process with a loaded cascade (CPU or GPU). The MR's
    share of preprocessing is done once (`FusionProcessor`), warm-up runs on the worker."""

    def __init__(self, model, mr: Volume, liver: Volume | None = None):
        from MRUSFusionLib.service import FusionProcessor  # torch: only this back end needs it

        super().__init__()
        self.processor = FusionProcessor(model, mr, liver)
        self.device = self.processor.device
        self.ready = threading.Event()
        self._spawn(self._work, "fusion-live-worker")

    def _work(self) -> None:
        self.processor.warm_up()
        self.ready.set()
        while not self._stopped.is_set():
            item = self._frames.take(timeout=0.25)
            if item is None:
                continue
            us, submitted_at = item
            try:
                result = self.processor.register(us)
                live = LiveResult(
                    warped=result.grid.with_array(msgs.intensity_to_uint8(result.warped)),
                    rigid_to_parent_ras=msgs.rigid_to_parent_ras(result.rigid_transform()),
                    field_ras=fields.displacement_to_ras_vectors(result.disp_ijk, result.grid), field_grid=result.grid,
                    report={"timings_s": result.timings, "compute_device": self.device},
                    latency_s=time.perf_counter() - submitted_at)
            except InputError as exc:
                self.last_error = str(exc)
                continue
            except Exception as exc:  # a frame must not end live registration
                log.exception("live registration failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self._publish(live)
            self.quality = result.quality()  # after the result is out: it does not delay the display


class RemoteRegistration(LiveRegistration):
    """Sends frames to a `deepnav fusion serve` service and assembles what comes back (warped US,
    rigid TRANSFORM, field, then the STRING report that completes a frame). A sender thread
    keeps the GUI thread off the socket; a receiver thread turns messages into results."""

    def __init__(self, host: str, port: int, *, device_name: str = US_DEVICE, timeout_s: float = 5.0):
        super().__init__()
        try:
            self.conn = Connection.connect(host, port, timeout_s=timeout_s)
        except OSError as exc:
            raise InputError(f"cannot reach the fusion service at {host}:{port} ({exc}): "
                             "is `deepnav fusion serve` running there?") from exc
        self.address = f"{host}:{port}"
        self.device = f"service at {self.address}"
        self.device_name = device_name
        self._pending: dict[float, dict] = {}  # wire timestamp -> what has arrived for that frame
        self._lock = threading.Lock()
        self._reader = MessageReader(self.conn)
        self._spawn(self._send, "fusion-live-sender")
        self._spawn(self._receive, "fusion-live-receiver")

    def close(self) -> None:
        self._stopped.set()
        self._reader.close()
        super().close()

    def _send(self) -> None:
        while not self._stopped.is_set():
            item = self._frames.take(timeout=0.25)
            if item is None:
                continue
            us, submitted_at = item
            stamp = time.time()
            with self._lock:
                self._pending = {k: v for k, v in self._pending.items() if stamp - k < 60}  # answers that never came
                self._pending[wire_timestamp(stamp)] = {"submitted_at": submitted_at}
            try:
                self.conn.send(msgs.volume_to_image(us.array, us, self.device_name, stamp))
            except (ConnectionClosed, OSError) as exc:
                self.last_error = f"the fusion service at {self.address} is gone ({exc})"
                return

    def _receive(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self._reader.queue.get(timeout=0.25)
            except queue.Empty:
                continue
            if item is None:
                if not self._stopped.is_set():
                    self.last_error = f"the fusion service at {self.address} closed the connection"
                return
            message, arrived = item
            if isinstance(message, ProtocolError):
                self.last_error = f"bad message from the service: {message}"
                continue
            try:
                self._take(message, arrived)
            except InputError as exc:
                self.last_error = f"bad result from the service: {exc}"

    def _take(self, message, arrived: float) -> None:
        if message.message_type == "STATUS":
            self.last_error = message.text
            return
        with self._lock:
            entry = match_timestamp(self._pending, message.timestamp)
        if entry is None:
            return
        kind = (message.message_type, message.device_name)
        if kind == ("IMAGE", DEVICE_WARPED):
            entry["warped"], entry["results_at"] = msgs.image_to_volume(message, "warped US"), arrived
        elif kind == ("TRANSFORM", DEVICE_RIGID):
            entry["rigid"] = np.asarray(message.matrix, dtype=np.float64)
        elif kind == ("IMAGE", DEVICE_FIELD):
            entry["field"], entry["results_at"] = msgs.image_to_ras_field(message), arrived
        elif kind == ("STRING", DEVICE_REPORT):
            report = json.loads(message.string)
            with self._lock:
                # done with this frame unless its corrected result follows; older frames are done too
                self._pending = {k: v for k, v in self._pending.items()
                                 if (report.get("more_coming") if v is entry else k > message.timestamp)}
            self.device = f"{report.get('compute_device', '?')} (service at {self.address})"
            self.remote_dropped = int(report.get("frames_dropped", 0))
            self.quality = confidence(report)
            if all(k in entry for k in ("warped", "rigid", "field")):
                self._publish(LiveResult(entry["warped"], entry["rigid"], *entry["field"], report,
                                         entry["results_at"] - entry["submitted_at"]))
