"""OpenIGTLink framing over a TCP socket: pyigtl's message formats, our own transport.

pyigtl 0.3.4 packs and parses message bodies well, and we use it for that (`_pack_content`,
`unpack`). Its transport is not usable for volumes (pyigtl/comm.py of 0.3.4, in the venv or at
https://github.com/lassoan/pyigtl/blob/master/pyigtl/comm.py): a hard-coded 10 ms socket timeout
(`settimeout(0.01)`) makes `sendall` of a multi-MB image fail, the receive path grows the body
with `body += chunk` (quadratic), and its CRC64 (crcmod, ~0.4 GB/s) costs 40 ms per 16 MB each
way. Here:
- the body is received with `recv_into` into a buffer that grows (doubling) as its bytes arrive:
  memory follows what came, not what a header claims (a 58-byte header claiming 1 GiB used to
  buy a 1 GiB buffer at once); an IMAGE's size is checked against its own fields (dimensions,
  scalar type, components) as soon as they arrive, and a body that contradicts them is skipped
  through a small scratch buffer, never stored;
- each message, either way, has a pace: no pause longer than the stall timeout, and after that
  grace an average of at least MIN_RATE_BYTES_PER_S, so a message of n bytes is done within
  stall + n / rate (a stall timer alone restarts on every byte: one byte a second held a
  connection, and its buffer, for ever);
- sends loop over `socket.send`, never a short total timeout;
- header and body go out as two buffers (no concatenation of a 75 MB body with its header);
- the CRC is the same CRC-64/ECMA-182 from `fastcrc` (SIMD, ~20 GB/s; equality tested).
We always send header version 1 (protocol v2), which every peer reads, including Debian's
reference C++ library 1.11; we read header versions 1 and 2.
"""

from __future__ import annotations

import math
import queue
import socket
import struct
import threading
import time
from collections.abc import Sequence

import fastcrc
import numpy as np
import pyigtl

from MRUSFusionLib.igtl_messages import StatusMessage

HEADER = struct.Struct(">H12s20sIIQQ")  # version, type, device, seconds, fraction, body size, CRC64
HEADER_SIZE = HEADER.size  # 58
MAX_BODY_BYTES = 1 << 30  # 1 GiB: a 65535-wide IMAGE is legal but nothing we serve comes near this
STALL_TIMEOUT_S = 5.0  # a message that stops arriving (or leaving) for this long is abandoned
# after the stall timeout's grace a message must average this rate: a 75 MB volume may take 80 s
# (loopback does ~1 GB/s, a slow hospital network ~10 MB/s); a dribbler is cut after the grace
MIN_RATE_BYTES_PER_S = 1 << 20
FIRST_BUFFER_BYTES = 1 << 20  # a body's buffer starts at this (or the body's size) and doubles as bytes arrive
_SCRATCH_BYTES = 1 << 16  # what a skipped body is read through
_POLL_S = 0.25  # how often a waiting reader looks at its stop flag
# an IMAGE body starts (after header version 2's extended header) with this 72-byte image header:
# version, components, scalar type, endianness, coordinates, size ijk, 12 floats of matrix,
# subvolume offset and size (the voxels that follow are the subvolume's)
IMAGE_HEAD = struct.Struct(">HBBBBHHH12fHHHHHH")
EXTENDED_HEAD = struct.Struct(">HHII")  # header version 2: its size, metadata header and body sizes, message id


def crc64(data) -> int:
    """CRC-64/ECMA-182 (polynomial 0x42F0E1EBA9EA3693, no reflection), as OpenIGTLink uses."""
    return fastcrc.crc64.ecma_182(data)


class ProtocolError(Exception):
    """A message that breaks the protocol. `fatal`: the byte stream can no longer be trusted
    (bad header, stalled or truncated body) and the connection must close; otherwise the message
    was read whole and only it is rejected."""

    def __init__(self, message: str, *, fatal: bool, device: str = "", status_code: int = 2):
        super().__init__(message)
        self.fatal = fatal
        self.device = device
        self.status_code = status_code  # OpenIGTLink STATUS code for the answer (2: unknown error)


class ConnectionClosed(Exception):
    """The peer closed the connection (between messages, or in the middle of one)."""


def _timestamp_fields(timestamp: float) -> tuple[int, int]:
    seconds = int(timestamp)
    fraction = min(int(round((timestamp - seconds) * 2**32)), 2**32 - 1)  # 1/2^32 s units
    return seconds, fraction


def encode(message: pyigtl.MessageBase) -> list:
    """Header and body of a message as two buffers (header version 1, no metadata)."""
    body = message._pack_content()  # pyigtl's body format; its pack() would add a slow CRC and copies
    seconds, fraction = _timestamp_fields(message.timestamp)
    header = HEADER.pack(1, message.message_type.encode("ascii"), message.device_name.encode("utf-8")[:20],
                         seconds, fraction, len(body), crc64(body))
    return [header, body]


def parse_header(raw: bytes, max_body_bytes: int = MAX_BODY_BYTES) -> dict:
    """The 58-byte header as pyigtl's header-fields dict; ProtocolError(fatal) if it is not one."""
    version, mtype, device, seconds, fraction, body_size, crc = HEADER.unpack(raw)
    try:
        message_type = mtype.rstrip(b"\0").decode("ascii")
        device_name = device.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("malformed header: type or device name is not text", fatal=True) from None
    if version not in (1, 2) or not message_type or not message_type.isprintable():
        raise ProtocolError(f"malformed header: version {version}, type {message_type!r}", fatal=True)
    if body_size > max_body_bytes:
        raise ProtocolError(f"{message_type} message announces a {body_size}-byte body, above the "
                            f"{max_body_bytes}-byte limit", fatal=True, device=device_name, status_code=8)
    return {"header_version": version, "message_type": message_type, "device_name": device_name,
            "timestamp": seconds + fraction / 2**32, "body_size": body_size, "crc": crc}


def image_body_size(prefix, header_version: int) -> int | None:
    """The body size an IMAGE's own fields make (extended header, image header, voxels, metadata),
    from the body's first bytes; None while too few of them have arrived. ValueError for a scalar
    type OpenIGTLink does not have."""
    extended = metadata = 0
    if header_version > 1:
        if len(prefix) < EXTENDED_HEAD.size:
            return None
        extended, metadata_head, metadata_body, _ = EXTENDED_HEAD.unpack_from(prefix)
        metadata = metadata_head + metadata_body
    if len(prefix) < extended + IMAGE_HEAD.size:
        return None
    head = IMAGE_HEAD.unpack_from(prefix, extended)
    components, scalar_type, subvolume_size = head[1], head[2], head[23:26]
    if scalar_type not in pyigtl.ImageMessage.scalar_types:
        raise ValueError(f"scalar type {scalar_type} is not an OpenIGTLink one")
    voxel_bytes = np.dtype(pyigtl.ImageMessage.scalar_types[scalar_type]).itemsize * components
    return extended + IMAGE_HEAD.size + voxel_bytes * math.prod(subvolume_size) + metadata


def _image_size_problem(prefix, fields: dict) -> tuple[bool, str | None]:
    """Whether an IMAGE body's first bytes hold its fields, and what is wrong with its announced size."""
    try:
        expected = image_body_size(prefix, fields["header_version"])
    except ValueError as exc:
        return True, str(exc)
    if expected is None:
        return False, None
    size = fields["body_size"]
    return True, None if expected == size else f"its fields make a {expected}-byte body, the header announces {size}"


class _Pace:
    """The clock of one message on the wire, from its first byte: it may not pause for longer than
    `stall_s`, and after that grace it must average `min_rate` bytes/s."""

    def __init__(self, stall_s: float, min_rate: float, total: int):
        self.stall_s, self.min_rate, self.total = stall_s, min_rate, total
        self.done = 0
        self.started = self.last = None  # monotonic times of the first and the latest bytes

    def progress(self, n: int) -> str | None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.last, self.done = now, self.done + n
        return self.problem(now)

    def problem(self, now: float | None = None) -> str | None:
        """Why the message must be abandoned, or None (always None before its first byte: a quiet
        peer between messages is allowed)."""
        if self.started is None:
            return None
        now = time.monotonic() if now is None else now
        if now - self.last > self.stall_s:
            return f"message stalled: {self.done} of {self.total} bytes, then nothing for {self.stall_s:.1f} s"
        elapsed = now - self.started
        if self.done < self.min_rate * (elapsed - self.stall_s):
            return (f"message too slow: {self.done} of {self.total} bytes in {elapsed:.1f} s, below the minimum "
                    f"of {self.min_rate / 2**20:.2f} MiB/s after {self.stall_s:.1f} s")
        return None


class Connection:
    """One OpenIGTLink peer. `receive` is for one reader thread; `send` may be called from any
    thread (a lock keeps messages whole)."""

    def __init__(self, sock: socket.socket, *, stall_timeout_s: float = STALL_TIMEOUT_S,
                 max_body_bytes: int = MAX_BODY_BYTES, min_rate_bytes_per_s: float = MIN_RATE_BYTES_PER_S):
        self.sock = sock
        self.sock.settimeout(_POLL_S)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # small messages (TRANSFORM, STATUS) must not wait for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stall_timeout_s = stall_timeout_s
        self.max_body_bytes = max_body_bytes
        self.min_rate = min_rate_bytes_per_s
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        try:
            peer = sock.getpeername()
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        except OSError:
            self.peer = "?"

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float = 5.0, **kwargs) -> Connection:
        return cls(socket.create_connection((host, port), timeout=timeout_s), **kwargs)

    # -- receiving ---------------------------------------------------------------------------
    def _recv(self, view: memoryview, stop: threading.Event | None, pace: _Pace) -> int:
        """Some bytes (at least one) into `view`, within the message's pace."""
        while True:
            if stop is not None and stop.is_set():
                raise ConnectionClosed("stopping")
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:
                n = None
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None
            if n == 0:
                raise ConnectionClosed("peer closed the connection" +
                                       (f" after {pace.done} of {pace.total} bytes of a message" if pace.done else ""))
            problem = pace.problem() if n is None else pace.progress(n)
            if problem:
                raise ProtocolError(problem, fatal=True, status_code=7)  # 7: time-out
            if n:
                return n

    def _fill(self, view: memoryview, stop: threading.Event | None, pace: _Pace) -> None:
        got = 0
        while got < len(view):
            got += self._recv(view[got:], stop, pace)

    def _receive_body(self, fields: dict, stop: threading.Event | None, pace: _Pace) -> bytearray:
        """The body, in a buffer that grows as it arrives. An IMAGE whose own fields contradict
        the announced size is read through a scratch buffer and rejected (the stream stays in sync)."""
        size, device = fields["body_size"], fields["device_name"]
        body = bytearray(min(size, FIRST_BUFFER_BYTES))
        got = 0
        checked = fields["message_type"] != "IMAGE"  # an IMAGE's size is checked once its fields are in
        while got < size:
            if got == len(body):
                body.extend(bytes(min(size, 2 * len(body)) - len(body)))  # no view of it is left: resizable
            got += self._recv(memoryview(body)[got:], stop, pace)
            if not checked:
                checked, problem = _image_size_problem(memoryview(body)[:got], fields)
                if problem:
                    del body
                    self._skip(size - got, stop, pace)
                    raise ProtocolError(f"malformed IMAGE body from {device!r} ({problem})", fatal=False,
                                        device=device)
        return body

    def _skip(self, n: int, stop: threading.Event | None, pace: _Pace) -> None:
        """Read `n` bytes through a small scratch buffer: a rejected body costs no memory."""
        scratch = memoryview(bytearray(min(_SCRATCH_BYTES, n)))
        while n > 0:
            n -= self._recv(scratch[:n], stop, pace)

    def receive(self, stop: threading.Event | None = None) -> tuple[pyigtl.MessageBase, dict]:
        """The next message and its header fields. Raises ConnectionClosed, or ProtocolError:
        non-fatal ones (bad CRC, unknown type, malformed body) leave the stream in sync."""
        raw = bytearray(HEADER_SIZE)
        pace = _Pace(self.stall_timeout_s, self.min_rate, HEADER_SIZE)
        self._fill(memoryview(raw), stop, pace)
        fields = parse_header(bytes(raw), self.max_body_bytes)
        pace.total += fields["body_size"]
        body = self._receive_body(fields, stop, pace)
        device, mtype = fields["device_name"], fields["message_type"]
        if crc64(body) != fields["crc"]:
            raise ProtocolError(f"{mtype} message from {device!r}: CRC mismatch (corrupted body)", fatal=False,
                                device=device, status_code=9)
        message = MESSAGE_TYPES[mtype]() if mtype in MESSAGE_TYPES else None
        if message is None:
            raise ProtocolError(f"unknown message type {mtype!r} from {device!r} (ignored)", fatal=False,
                                device=device, status_code=12)
        try:
            # a memoryview lets pyigtl wrap IMAGE voxels without copying them; its other
            # parsers call bytes methods (.decode) on the body
            message.unpack(fields, memoryview(body) if mtype == "IMAGE" else body)
        except Exception as exc:  # pyigtl raises struct.error, ValueError, KeyError, NotImplementedError...
            raise ProtocolError(f"malformed {mtype} body from {device!r} ({type(exc).__name__}: {exc})",
                                fatal=False, device=device) from None
        return message, fields

    # -- sending -----------------------------------------------------------------------------
    def send(self, message: pyigtl.MessageBase) -> None:
        self.send_buffers(encode(message))

    def send_buffers(self, buffers: Sequence) -> None:
        """One message's buffers, whole, within its pace (a peer that reads too slowly is dropped:
        it would hold the worker that sends to it)."""
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        with self._send_lock:
            pace = _Pace(self.stall_timeout_s, self.min_rate, sum(len(v) for v in views))
            pace.started = pace.last = time.monotonic()
            for view in views:
                self._send_all(view, pace)

    def _send_all(self, view: memoryview, pace: _Pace) -> None:
        sent = 0
        while sent < len(view):
            try:
                n = self.sock.send(view[sent:])
            except TimeoutError:
                n = 0
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None
            sent += n
            problem = pace.progress(n) if n else pace.problem()
            if problem:
                raise ConnectionClosed(f"peer reads too slowly: {problem}")

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# The message types we parse; STATUS is ours (pyigtl lacks it), the rest are pyigtl's.
MESSAGE_TYPES = {"IMAGE": pyigtl.ImageMessage, "TRANSFORM": pyigtl.TransformMessage,
                 "STRING": pyigtl.StringMessage, "POINT": pyigtl.PointMessage,
                 "POSITION": pyigtl.PositionMessage, "STATUS": StatusMessage}


def wire_timestamp(timestamp: float) -> float:
    """The value a receiver decodes from `timestamp` (the header keeps 1/2^32 s units)."""
    seconds, fraction = _timestamp_fields(timestamp)
    return seconds + fraction / 2**32


def match_timestamp(by_time: dict[float, object], timestamp: float):
    """What an answer belongs to, by the timestamp the service echoes on it (sent timestamps as
    `wire_timestamp` gives them, as keys); re-encoding can move a timestamp by ~1e-7 s."""
    item = by_time.get(timestamp)
    if item is None and by_time:
        nearest = min(by_time, key=lambda t: abs(t - timestamp))
        item = by_time[nearest] if abs(nearest - timestamp) < 1e-4 else None
    return item


class MessageReader:
    """A client's reader thread: every message (or non-fatal ProtocolError) from the peer goes
    into `queue` as (message, arrival perf_counter); None marks the end of the connection."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"igtl-client-{conn.peer}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message, _ = self.conn.receive(self._stop)
            except ConnectionClosed:
                break
            except ProtocolError as exc:
                self.queue.put((exc, time.perf_counter()))
                if exc.fatal:
                    break
                continue
            self.queue.put((message, time.perf_counter()))
        self.queue.put(None)

    def wait_for(self, predicate, timeout_s: float) -> list:
        """Messages received until one satisfies `predicate` (included last); TimeoutError if none
        does in time, ConnectionClosed if the peer left first."""
        seen, deadline = [], time.monotonic() + timeout_s
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no matching message in {timeout_s} s; got {[_describe(m) for m, _ in seen]}") from None
            if item is None:
                self.queue.put(None)  # keep the end marker for later calls
                raise ConnectionClosed(f"connection closed; got {[_describe(m) for m, _ in seen]}")
            seen.append(item)
            if predicate(item[0]):
                return [m for m, _ in seen]

    def close(self) -> None:
        self._stop.set()
        self.conn.close()
        self._thread.join(timeout=5)


def _describe(message) -> str:
    if isinstance(message, Exception):
        return f"error: {message}"
    return f"{message.message_type}:{message.device_name}"
