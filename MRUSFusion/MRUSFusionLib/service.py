"""`deepnav fusion serve`: the OpenIGTLink fusion service.

Threads: one accepts connections (or one connects out, `--connect`), one reader per peer turns
bytes into frames, one worker registers frames, and one more runs the slower second stage (the
correction; not with `--fast`) so that it never holds up the next frame's first result. Between
readers and worker, and between worker and second stage, sits a latest-frame-only mailbox: a frame
that arrives while an older one from the same peer is still waiting replaces it (and is counted as
dropped), so results never lag behind the probe. A second stage promised (`more_coming`) but
replaced before it started does not come; the newer frame's does. Each
result goes back on the connection the frame came from: the warped US, the rigid TRANSFORM,
the displacement field, and last a STRING report (its arrival marks the frame complete).
Nothing a peer sends can stop the service: a bad message is answered with a STATUS (where the
stream is still in sync) or ends that one connection, and the worker survives any frame. At most
`max_clients` peers are served at once (one reader thread each); more are refused with a STATUS.
The accept loop outlives any failure to accept (out of descriptors, a peer gone first): it backs
off and tries again until the service stops.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from deepnav.errors import InputError
from deepnav.imaging import Volume, require_contrast, require_finite
from deepnav.torch_runtime import describe_device
from MRUSFusionLib import fields
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_ECHO, DEVICE_FIELD, DEVICE_REPORT, DEVICE_RIGID, DEVICE_WARPED
from MRUSFusionLib.igtl_transport import Connection, ConnectionClosed, ProtocolError
from MRUSFusionLib.mailbox import LatestFrameMailbox
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.preprocess import fusion_grid, prepare_fixed
from MRUSFusionLib.registration import MRSideCache, Registration, correct_result, register

log = logging.getLogger("deepnav.fusion.service")

DEFAULT_PORT = 18944
# a scanner (or PLUS), Slicer and a few monitoring clients; each costs a reader thread and a socket
DEFAULT_MAX_CLIENTS = 8
_ACCEPT_BACKOFF_S = (0.05, 1.0)  # first and longest wait after a failed accept


@dataclasses.dataclass
class Frame:
    volume: Volume
    device: str
    timestamp: float  # the source's timestamp (header), echoed in every answer
    received_at: float  # time.perf_counter() when it was complete
    session: Session
    geometry: dict  # what arrived (size, type, LPS geometry, voxel sum), reported back


@dataclasses.dataclass
class Outcome:
    messages: list  # sent back at once
    timings_s: dict
    quality: Callable[[], dict] | None = None  # figures computed after the messages are out
    stage: str = "network"  # what these results are, said in the report
    follow_up: Callable[[], Outcome] | None = None  # a better result of the same frame, sent next


class FrameProcessor(Protocol):
    name: str
    device: str  # where the work runs, as shown to the user (e.g. "cuda:0 (NVIDIA H100)")

    def warm_up(self) -> None: ...

    def process(self, frame: Frame) -> Outcome: ...


class FusionProcessor:
    """Registers each US frame to the MR with the cascade. The MR's share of preprocessing
    (grid, resampling, normalisation) is done once, not per frame. With `correct`, the
    correction stage follows each frame's network result as a second result of the same frame."""

    name = "fusion"

    def __init__(self, model: LoadedModel, mr: Volume, liver: Volume | None = None, correct: bool = False):
        require_finite(mr, "MR")
        require_contrast(mr, "MR")
        self.model, self.mr, self.liver, self.correct = model, mr, liver, correct
        self.device = describe_device(model.device)
        self.grid = fusion_grid(mr, liver)
        self.fixed = prepare_fixed(mr, self.grid)
        self.mr_side = MRSideCache()  # the correction's MR features, reused while the frames' region holds

    def register(self, us: Volume) -> Registration:
        """The network's result on the service's fixed grid (the MR prepared once)."""
        return register(self.model, self.mr, us, grid=self.grid, fixed=self.fixed, correct=False)

    def warm_up(self) -> None:
        """Two passes on the MR against itself: allocations, kernels and caches are done here,
        not on the first frame a surgeon sees."""
        for _ in range(2):
            self.register(self.mr)

    def process(self, frame: Frame) -> Outcome:
        result = self.register(frame.volume)
        t0 = time.perf_counter()
        ts = frame.timestamp
        messages = [
            msgs.volume_to_image(msgs.intensity_to_uint8(result.warped), result.grid, DEVICE_WARPED, ts),
            msgs.transform_message(msgs.rigid_to_parent_ras(result.rigid_transform()), DEVICE_RIGID, ts),
            msgs.displacement_to_image(result.disp_ijk, result.grid, DEVICE_FIELD, ts),
        ]
        follow_up = (lambda: self._corrected(frame, result)) if self.correct else None
        return Outcome(messages, dict(result.timings, encode=time.perf_counter() - t0), result.quality,
                       follow_up=follow_up)

    def _corrected(self, frame: Frame, result: Registration) -> Outcome:
        """The correction stage on the frame's registration region: warped US and field there."""
        t0 = time.perf_counter()
        c = correct_result(result, self.mr, frame.volume, liver=self.liver, mr_side=self.mr_side)
        t1 = time.perf_counter()
        region, ts, transform = c.region, frame.timestamp, result.transform()
        messages = [
            msgs.volume_to_image(msgs.intensity_to_uint8(c.warped), region, DEVICE_WARPED, ts),
            msgs.transform_message(msgs.rigid_to_parent_ras(result.rigid_transform()), DEVICE_RIGID, ts),
            msgs.field_image_to_message(fields.transform_to_field(transform, region), region, DEVICE_FIELD, ts),
        ]
        timings = {**{f"correction_{k}": v for k, v in c.timings.items()}, "correction": t1 - t0,
                   "encode": time.perf_counter() - t1}
        return Outcome(messages, timings, lambda: {"correction": c.report}, stage="corrected")


class EchoProcessor:
    """Sends each frame straight back (device DeepNavEcho): the transport alone, for benchmarks."""

    name = "echo"
    device = "none (echo)"

    def warm_up(self) -> None:
        pass

    def process(self, frame: Frame) -> Outcome:
        v = frame.volume
        return Outcome([msgs.volume_to_image(v.array, v, DEVICE_ECHO, frame.timestamp)], {})


class Session:
    """One connected peer: its connection and the frames it sent, received, dropped."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.frames_received = 0
        self.frames_dropped = 0

    @property
    def closed(self) -> bool:
        return self.conn.closed.is_set()

    def send(self, messages: list) -> None:
        for message in messages:
            self.conn.send(message)


class FusionService:
    def __init__(self, processor: FrameProcessor, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 devices: tuple[str, ...] | None = None, connect: tuple[str, int] | None = None,
                 stall_timeout_s: float = 5.0, max_frames: int | None = None, max_clients: int = DEFAULT_MAX_CLIENTS):
        self.processor = processor
        self.host, self.port = host, port
        self.devices = set(devices) if devices else None  # None: any device name
        self.connect_to = connect
        self.stall_timeout_s = stall_timeout_s
        self.max_frames = max_frames
        self.max_clients = max_clients
        self.clients_refused = 0
        self.stopped = threading.Event()
        self.mailbox = LatestFrameMailbox()
        self.follow_ups = LatestFrameMailbox()  # (frame, outcome, frame id): second stages to run
        self.frames_processed = 0
        self.errors = 0
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._core: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> FusionService:
        if self.connect_to is None:
            self._listener = socket.create_server((self.host, self.port), reuse_port=False)
            self._listener.settimeout(0.25)
            self.port = self._listener.getsockname()[1]  # port 0 asks the system for a free one
            self._core.append(self._spawn(self._accept_loop, "igtl-accept"))
            log.info("serving OpenIGTLink on %s:%d with %s", self.host, self.port, self.processor.name)
        else:
            self._core.append(self._spawn(self._connect_loop, "igtl-connect"))
        self._core.append(self._spawn(self._work_loop, "fusion-worker"))
        self._core.append(self._spawn(self._follow_up_loop, "fusion-second-stage"))
        return self

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        """Stop and wait for every thread; sockets closed."""
        self.stop()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.conn.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def wait(self, duration_s: float | None = None) -> None:
        """Block until stopped (signal, max_frames) or `duration_s` has passed."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not self.stopped.wait(0.2):
            if deadline is not None and time.monotonic() > deadline:
                self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def stats(self) -> dict:
        with self._lock:
            connected = len(self._sessions)
        return {"frames_processed": self.frames_processed, "frames_dropped": self.mailbox.dropped,
                "errors": self.errors, "clients": connected, "clients_refused": self.clients_refused}

    @property
    def alive(self) -> bool:
        """The accepting (or connecting) thread and both workers are running."""
        return len(self._core) == 3 and all(t.is_alive() for t in self._core)

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]  # readers of gone peers leave
        return thread

    # -- connections -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        backoff, failures = _ACCEPT_BACKOFF_S[0], 0
        while not self.stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.stopped.is_set():  # close() closed the listener
                    break
                # out of descriptors (EMFILE, ENFILE), a peer that left first (ECONNABORTED), no
                # buffers (ENOBUFS)...: all pass. The waiting connection stays queued, so accept
                # would fail again at once: back off instead of spinning, and say it once a streak
                failures += 1
                if failures == 1:
                    log.warning("cannot accept connections (%s); retrying until it works", exc)
                self.stopped.wait(backoff)
                backoff = min(2 * backoff, _ACCEPT_BACKOFF_S[1])
                continue
            if failures:
                log.warning("accepting connections again after %d failed attempts", failures)
                backoff, failures = _ACCEPT_BACKOFF_S[0], 0
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Serve a new peer with its own reader thread, or refuse it when `max_clients` are served."""
        try:
            conn = Connection(sock, stall_timeout_s=self.stall_timeout_s)
        except OSError as exc:  # it left between accept and here
            log.info("client left before it was served (%s)", exc)
            sock.close()
            return
        session = Session(conn)
        with self._lock:
            full = len(self._sessions) >= self.max_clients
            if not full:
                self._sessions.add(session)
        if full:
            self.clients_refused += 1
            text = f"refused client {conn.peer}: {self.max_clients} clients are connected, the limit (--max-clients)"
            log.warning(text)
            try:  # a new socket's send buffer is empty: a short STATUS does not block this loop
                conn.send(msgs.error_status(text, "DeepNav", time.time(), code=6))  # 6: busy
            except ConnectionClosed:
                pass
            conn.close()
            return
        log.info("client %s connected", conn.peer)
        try:
            self._spawn(self._read_loop, f"igtl-read-{conn.peer}", session)
        except RuntimeError as exc:  # the system has no thread for it
            log.warning("client %s dropped: %s", conn.peer, exc)
            with self._lock:
                self._sessions.discard(session)
            conn.close()

    def _connect_loop(self) -> None:
        """Connect out to a US source (as Slicer connects to PLUS); reconnect when it drops."""
        host, port = self.connect_to
        while not self.stopped.is_set():
            try:
                conn = Connection.connect(host, port, stall_timeout_s=self.stall_timeout_s)
            except OSError as exc:
                log.warning("cannot connect to %s:%d (%s); retrying", host, port, exc)
                self.stopped.wait(1.0)
                continue
            log.info("connected to US source %s:%d", host, port)
            session = Session(conn)
            with self._lock:
                self._sessions.add(session)
            self._read_loop(session)
            self.stopped.wait(0.5)

    def _read_loop(self, session: Session) -> None:
        """Serve one registered session until it ends; then it leaves the registry."""
        try:
            while not self.stopped.is_set():
                try:
                    message, fields = session.conn.receive(self.stopped)
                    t_done = time.perf_counter()
                except ConnectionClosed as exc:
                    log.info("client %s: %s", session.conn.peer, exc)
                    return
                except ProtocolError as exc:
                    self._reject(session, str(exc), exc.device, time.time(), code=exc.status_code)
                    if exc.fatal:
                        return
                    continue
                self._accept_message(session, message, fields, t_done)
        finally:
            with self._lock:
                self._sessions.discard(session)
            session.conn.close()

    def _accept_message(self, session: Session, message, fields: dict, t_done: float) -> None:
        if message.message_type != "IMAGE":
            log.debug("client %s: ignoring %s %r", session.conn.peer, message.message_type, message.device_name)
            return
        if self.devices is not None and message.device_name not in self.devices:
            log.info("client %s: ignoring IMAGE from device %r (serving %s)", session.conn.peer,
                     message.device_name, sorted(self.devices))
            return
        try:
            volume = msgs.image_to_volume(message)
            if volume.array.dtype.kind == "f":
                require_finite(volume, f"US volume {message.device_name!r}")
        except InputError as exc:
            self._reject(session, str(exc), message.device_name, fields["timestamp"])
            return
        session.frames_received += 1
        frame = Frame(volume, message.device_name, fields["timestamp"], t_done, session, _geometry(volume))
        if self.mailbox.put(id(session), frame):
            session.frames_dropped += 1

    def _reject(self, session: Session, text: str, device: str, timestamp: float, code: int = msgs.STATUS_ERROR) -> None:
        """Log a clear message and answer with an error STATUS while the peer still listens."""
        self.errors += 1
        log.warning("client %s: %s", session.conn.peer, text)
        try:
            session.conn.send(msgs.error_status(text, device or "DeepNav", timestamp, code))
        except ConnectionClosed:
            pass

    # -- registration ------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self.stopped.is_set():
            frame = self.mailbox.take(timeout=0.25)
            if frame is None:
                continue
            if frame.session.closed:
                continue
            self._handle(frame)
            if self.max_frames is not None and self.frames_processed >= self.max_frames:
                log.info("processed %d frames: stopping", self.frames_processed)
                self.stop()

    def _handle(self, frame: Frame) -> None:
        t_start = time.perf_counter()
        try:
            outcome = self.processor.process(frame)
        except InputError as exc:
            self._reject(frame.session, f"frame from {frame.device!r}: {exc}", frame.device, frame.timestamp)
            return
        except Exception as exc:  # a frame must never take the service down
            log.exception("frame from %r failed", frame.device)
            self._reject(frame.session, f"frame from {frame.device!r} failed: {type(exc).__name__}: {exc}",
                         frame.device, frame.timestamp)
            return
        self.frames_processed += 1
        frame_id = self.frames_processed
        # a better result of the same frame follows unless a newer frame is already waiting:
        # latest-frame-only holds for the second stage as well
        more = outcome.follow_up is not None and not self.mailbox.waiting(id(frame.session))
        if self._send(frame, outcome, frame_id, t_start, more) and more:
            self.follow_ups.put(id(frame.session), (frame, outcome, frame_id))

    def _follow_up_loop(self) -> None:
        """The second stage of frames whose first result has gone, newest per peer."""
        while not self.stopped.is_set():
            item = self.follow_ups.take(timeout=0.25)
            if item is None:
                continue
            frame, first, frame_id = item
            if frame.session.closed:
                continue
            t_start = time.perf_counter()
            try:
                outcome = first.follow_up()
            except Exception as exc:  # the first result stands; say why the second did not come
                log.exception("follow-up of frame %d failed", frame_id)
                self._reject(frame.session, f"frame {frame_id}: the {first.stage} result is all there is "
                             f"({type(exc).__name__}: {exc})", frame.device, frame.timestamp, msgs.STATUS_ERROR)
                continue
            self._send(frame, outcome, frame_id, t_start, more=False)

    def _send(self, frame: Frame, outcome: Outcome, frame_id: int, t_start: float, more: bool) -> bool:
        """The outcome's messages, then its report; False when the client has gone."""
        try:
            t_processed = time.perf_counter()
            frame.session.send(outcome.messages)
            t_sent = time.perf_counter()
            # quality figures do not delay the images: they follow in the report
            quality = outcome.quality() if outcome.quality is not None else {}
            timings = {"queue_wait": t_start - frame.received_at, **outcome.timings_s, "send": t_sent - t_processed,
                       "quality": time.perf_counter() - t_sent}
            report = {"frame_id": frame_id, "device": frame.device, "stage": outcome.stage, "more_coming": more,
                      "source_timestamp": frame.timestamp, "timings_s": _rounded(timings),
                      "results_sent_s": round(t_sent - frame.received_at, 5), **quality,
                      "frames_received": frame.session.frames_received,
                      "frames_dropped": frame.session.frames_dropped,
                      "input": frame.geometry, "processor": self.processor.name,
                      "compute_device": self.processor.device}
            frame.session.send([msgs.report_message(report, DEVICE_REPORT, frame.timestamp)])
            return True
        except ConnectionClosed as exc:
            log.info("client %s left before its result was sent (%s)", frame.session.conn.peer, exc)
            return False


def _rounded(timings: dict) -> dict:
    return {k: round(float(v), 5) for k, v in timings.items()}


def _geometry(volume: Volume) -> dict:
    """What arrived, in LPS mm: so that a client can check its volume came through intact."""
    return {"size_ijk": list(volume.size_ijk), "dtype": str(volume.array.dtype),
            "spacing": volume.spacing.tolist(), "origin_lps": volume.origin.tolist(),
            "direction_lps": volume.direction.ravel().tolist(), "sum": float(np.sum(volume.array, dtype=np.float64))}
