"""Hostile and long load on the fusion service, from outside over loopback: what
`benchmarks/fusion_service_reliability.py` runs at full size against a `deepnav fusion serve`
process, and `Testing/test_service_reliability.py` in short against a service in the test.

- `dribble`: clients whose header announces a ~1 GiB IMAGE (its own fields agreeing, so no size
  check refuses it) and who then send one byte at a time: what they cost, and when they are cut.
- `fuzz`: malformed messages of every kind, valid frames between them. Those the stream survives
  (bad CRC, unknown type, bad, 2D and NaN images, an IMAGE whose fields contradict its size, a
  short TRANSFORM) go on one connection and each must be answered by an error STATUS; those that
  break the stream (random bytes, a malformed header, a body beyond the limit, a truncated body, a
  gigabyte announced and then abandoned) each get a fresh connection that leaves at once. Every
  valid frame, on the first connection, must be answered with its report.
- `soak`: many valid frames on one connection at a set rate (the simulated scanner), with the
  service's resident memory, descriptors and threads sampled throughout.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import numpy as np

from deepnav.imaging import Volume
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_REPORT
from MRUSFusionLib.igtl_transport import HEADER, IMAGE_HEAD, MAX_BODY_BYTES, Connection, MessageReader, crc64, encode
from MRUSFusionLib.scanner import latency_summary, stream
from MRUSFusionLib.stream_benchmark import ProcessSampler, _trend, process_figures

IN_SYNC_KINDS = ("bad_crc", "unknown_type", "bad_scalar_type", "image_2d", "image_nan", "image_components",
                 "image_size_lie", "short_transform")
BREAKING_KINDS = ("random_bytes", "malformed_header", "beyond_limit", "truncated_body", "gigabyte_then_leave")


def _raw(mtype: str, body: bytes, device: str = "US", *, body_size: int | None = None, crc: int | None = None) -> bytes:
    """A header (version 1) and body as they go on the wire, any field of it a lie if asked."""
    header = HEADER.pack(1, mtype.encode(), device.encode(), 0, 0, len(body) if body_size is None else body_size,
                         crc64(body) if crc is None else crc)
    return header + body


def _image(array: np.ndarray, geometry: Volume) -> bytes:
    return b"".join(encode(msgs.volume_to_image(array, geometry, "US", time.time())))


def gigabyte_image_head() -> bytes:
    """A header and image header announcing a uint8 IMAGE of 1024 x 1024 x 1023 voxels: just under
    the 1 GiB limit, its fields agreeing with its size."""
    size = (1024, 1024, 1023)
    # version 1, one component, uint8, little-endian, RAS; unit axes, centre 0; the whole volume
    head = IMAGE_HEAD.pack(1, 1, 3, 2, 1, *size, *np.eye(3).ravel(), 0.0, 0.0, 0.0, 0, 0, 0, *size)
    body_size = IMAGE_HEAD.size + int(np.prod(size))
    assert body_size <= MAX_BODY_BYTES
    return HEADER.pack(1, b"IMAGE", b"US", 0, 0, body_size, 0) + head


def fuzz_message(kind: str, rng: np.random.Generator, geometry: Volume) -> bytes:
    """One malformed message of `kind` (IN_SYNC_KINDS or BREAKING_KINDS), small images on
    `geometry`'s axes."""
    small = rng.integers(0, 255, (8, 8, 8), dtype=np.uint8)
    if kind == "bad_crc":
        data = bytearray(_image(small, geometry))
        data[50] ^= 0xFF  # the header's CRC field
        return bytes(data)
    if kind == "unknown_type":
        return _raw("X" + "".join(rng.choice(list("ABCDEFGH"), 6)), rng.bytes(int(rng.integers(0, 300))))
    if kind == "bad_scalar_type":
        body = bytearray(_image(small, geometry)[HEADER.size:])
        body[3] = 12  # no OpenIGTLink scalar type
        return _raw("IMAGE", bytes(body))
    if kind == "image_2d":
        return _image(small[:1], geometry)
    if kind == "image_nan":
        array = small.astype(np.float32)
        array[tuple(rng.integers(0, 8, 3))] = np.nan
        return _image(array, geometry)
    if kind == "image_components":
        return _image(np.repeat(small[..., None], 3, axis=-1), geometry)
    if kind == "image_size_lie":  # fields say 1000^3 voxels, the body (and its header) 512
        body = bytearray(_image(small, geometry)[HEADER.size:])
        body[6:12] = struct.pack(">HHH", 1000, 1000, 1000)
        return _raw("IMAGE", bytes(body))
    if kind == "short_transform":
        return _raw("TRANSFORM", rng.bytes(int(rng.integers(0, 40))))
    if kind == "random_bytes":
        return rng.bytes(int(rng.integers(1, 400)))
    if kind == "malformed_header":
        return struct.pack(">H", int(rng.integers(3, 65535))) + rng.bytes(56)
    if kind == "beyond_limit":
        return _raw("IMAGE", b"", body_size=int(rng.integers(MAX_BODY_BYTES + 1, 1 << 62)))
    if kind == "truncated_body":
        data = _image(small, geometry)
        return data[: int(rng.integers(HEADER.size, len(data)))]
    if kind == "gigabyte_then_leave":
        return gigabyte_image_head() + rng.bytes(int(rng.integers(0, 4096)))
    raise ValueError(kind)


def _is_answer(m) -> bool:
    return getattr(m, "message_type", "") == "STATUS" or getattr(m, "device_name", "") == DEVICE_REPORT


def fuzz(host: str, port: int, valid: Volume, *, messages: int, valid_every: int, seed: int = 0,
         alive: Callable[[], bool] = lambda: True, answer_timeout_s: float = 10.0,
         frame_timeout_s: float = 60.0, log=lambda text: None) -> dict:
    """`messages` malformed messages, half of them of the kinds the stream survives, with a valid
    frame after every `valid_every`. A service that stops (`alive()` false) ends the run: a crash."""
    rng = np.random.default_rng(seed)
    reader = MessageReader(Connection.connect(host, port))
    counts = {"status_expected": 0, "status_answered": 0, "valid_sent": 0, "valid_answered": 0,
              "fresh_connections": 0, "crashes": 0, "reconnects": 0}
    by_kind = dict.fromkeys(IN_SYNC_KINDS + BREAKING_KINDS, 0)
    failures: list[str] = []
    t0 = time.perf_counter()

    def ask(data: bytes, is_frame: bool) -> bool:
        """Send on the main connection and wait for its answer; a lost connection is replaced."""
        nonlocal reader
        try:
            reader.conn.send_buffers([data])
            got = reader.wait_for(_is_answer, frame_timeout_s if is_frame else answer_timeout_s)
        except Exception as exc:  # no answer in time, or the connection went: both are failures
            failures.append(f"{'valid frame' if is_frame else 'message'}: {type(exc).__name__}: {str(exc)[:200]}")
            counts["reconnects"] += 1
            reader.close()
            reader = MessageReader(Connection.connect(host, port))
            return False
        last = got[-1]
        return (getattr(last, "device_name", "") == DEVICE_REPORT) if is_frame else \
            (last.message_type == "STATUS" and last.code != msgs.STATUS_OK)

    try:
        for n in range(messages):
            if n % valid_every == valid_every - 1:
                counts["valid_sent"] += 1
                counts["valid_answered"] += ask(_image(valid.array, valid), is_frame=True)
            kinds = IN_SYNC_KINDS if n % 2 == 0 else BREAKING_KINDS
            kind = kinds[int(rng.integers(len(kinds)))]
            by_kind[kind] += 1
            data = fuzz_message(kind, rng, valid)
            if kind in IN_SYNC_KINDS:
                counts["status_expected"] += 1
                counts["status_answered"] += ask(data, is_frame=False)
            else:
                counts["fresh_connections"] += 1
                try:
                    with socket.create_connection((host, port), timeout=5) as sock:
                        sock.sendall(data)
                except OSError:
                    pass  # refused, reset: the service may close on garbage before it has all of it
            if n % 200 == 0 or n == messages - 1:
                if not alive():
                    counts["crashes"] += 1
                    failures.append(f"the service stopped after {n + 1} messages")
                    break
                log(f"fuzz: {n + 1} of {messages} messages, {counts['valid_answered']} of {counts['valid_sent']} "
                    f"valid frames answered")
        # the last word: a valid frame after all of it
        counts["valid_sent"] += 1
        counts["valid_answered"] += ask(_image(valid.array, valid), is_frame=True)
    finally:
        reader.close()
    return {"messages": messages, "valid_every": valid_every, "seed": seed, **counts, "by_kind": by_kind,
            "duration_s": time.perf_counter() - t0, "failures": failures[:20]}


def dribble(host: str, port: int, *, clients: int, pid: int | None = None, byte_every_s: float = 1.0,
            hold_s: float = 30.0) -> dict:
    """`clients` connections that each announce a ~1 GiB IMAGE and then send one byte every
    `byte_every_s`, until the service cuts them or `hold_s` passes. The service's resident memory
    (process `pid`, this one by default) before and at its highest meanwhile."""
    before = process_figures(pid)["rss_mb"]
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(clients)]
    t0 = time.monotonic()
    cut_after: list[float | None] = [None] * clients
    peak = before
    try:
        for sock in socks:
            sock.sendall(gigabyte_image_head())
            sock.setblocking(False)
        while time.monotonic() - t0 < hold_s and None in cut_after:
            for i, sock in enumerate(socks):
                if cut_after[i] is not None:
                    continue
                try:
                    sock.send(b"\0")
                    if sock.recv(65536) == b"":  # closed (a STATUS may come first)
                        cut_after[i] = time.monotonic() - t0
                except BlockingIOError:
                    pass
                except OSError:
                    cut_after[i] = time.monotonic() - t0
            deadline = time.monotonic() + byte_every_s
            while time.monotonic() < deadline:
                peak = max(peak, process_figures(pid)["rss_mb"])
                time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()
    return {"clients": clients, "announced_bytes_each": HEADER.unpack(gigabyte_image_head()[:HEADER.size])[5],
            "byte_every_s": byte_every_s, "rss_before_mb": before, "rss_peak_mb": peak, "growth_mb": peak - before,
            "cut_after_s": cut_after}


def soak(host: str, port: int, volume: Volume, *, frames: int, rate_hz: float, pid: int | None = None,
         sample_every_s: float = 0.5) -> dict:
    """`frames` valid frames on one connection at `rate_hz`: latency, answered and dropped frames,
    and the service's (process `pid`'s) memory by quarter, descriptors and threads."""
    with ProcessSampler(pid, sample_every_s) as sampler:
        run = stream(host, port, [volume], count=frames, rate_hz=rate_hz)
    summary = latency_summary(run)
    summary.pop("stages_s")
    return {**summary, "frames_answered": summary.pop("frames_completed"), "trend": _trend(run),
            "process": sampler.summary()}
