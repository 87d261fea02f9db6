"""The OpenIGTLink fusion service over real loopback sockets with the shipped model: what it
sends back, latest-frame-only, and that nothing a peer sends stops it serving the next frame."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pyigtl
import pytest

from conftest import ROOT
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.fields import displacement_transform, transform_points
from MRUSFusionLib.igtl_messages import DEVICE_FIELD, DEVICE_REPORT, DEVICE_RIGID, DEVICE_WARPED
from MRUSFusionLib.igtl_transport import HEADER, Connection, MessageReader, crc64, encode
from MRUSFusionLib.service import EchoProcessor, FusionProcessor, FusionService

STALL_S = 0.5


@pytest.fixture(scope="module")
def processor(patient, shipped_model):
    return FusionProcessor(shipped_model, patient.mr, patient.liver)


@pytest.fixture(scope="module")
def service(processor):
    with FusionService(processor, port=0, stall_timeout_s=STALL_S) as svc:
        yield svc


@pytest.fixture()
def client(service):
    reader = MessageReader(Connection.connect("127.0.0.1", service.port))
    yield reader
    reader.close()


def is_report(m):
    return getattr(m, "device_name", "") == DEVICE_REPORT


def is_status(m):
    return getattr(m, "message_type", "") == "STATUS"


def us_message(patient, timestamp=None, array=None, device="US"):
    us = patient.frames[0].image
    return msgs.volume_to_image(us.array if array is None else array, us, device,
                                time.time() if timestamp is None else timestamp)


def raw_message(mtype: str, body: bytes, device="US", crc=None, body_size=None) -> bytes:
    header = HEADER.pack(1, mtype.encode(), device.encode(), 0, 0, len(body) if body_size is None else body_size,
                         crc64(body) if crc is None else crc)
    return header + body


def assert_serves(service, patient, reader=None):
    """A good frame (on `reader`, or a new connection) gets its full answer."""
    own = reader is None
    reader = reader or MessageReader(Connection.connect("127.0.0.1", service.port))
    try:
        stamp = time.time()
        reader.conn.send(us_message(patient, stamp))
        got = reader.wait_for(lambda m: is_report(m) or is_status(m), 30)
    finally:
        if own:
            reader.close()
    assert is_report(got[-1]), [getattr(m, "text", m) for m in got]
    report = json.loads(got[-1].string)
    assert report["source_timestamp"] == pytest.approx(stamp, abs=1e-6)
    return got


# -- what comes back -------------------------------------------------------------------------

def test_results_are_the_registration_in_slicer_conventions(service, processor, patient, client):
    got = assert_serves(service, patient, client)
    by_device = {m.device_name: m for m in got}
    assert {DEVICE_WARPED, DEVICE_RIGID, DEVICE_FIELD, DEVICE_REPORT} <= set(by_device)
    local = processor.register(patient.frames[0].image)  # the same registration, in process

    warped = msgs.image_to_volume(by_device[DEVICE_WARPED])
    np.testing.assert_allclose(warped.ijk_to_lps(), local.grid.ijk_to_lps(), atol=1e-4)
    assert np.abs(warped.array.astype(float) - msgs.intensity_to_uint8(local.warped)).max() <= 1

    np.testing.assert_allclose(by_device[DEVICE_RIGID].matrix, msgs.rigid_to_parent_ras(local.rigid_transform()),
                               atol=1e-4)
    # the received field maps the MR landmarks where the in-process registration does
    field = displacement_transform(msgs.image_to_field(by_device[DEVICE_FIELD]))
    np.testing.assert_allclose(transform_points(field, patient.landmarks_lps),
                               local.map_points_lps(patient.landmarks_lps), atol=1e-3)

    report = json.loads(by_device[DEVICE_REPORT].string)
    assert {"preprocess", "network", "encode", "send", "queue_wait"} <= set(report["timings_s"])
    assert report["folding_percent"] < 0.1 and 0 < report["mind_after"] < 1
    us = patient.frames[0].image
    assert report["input"]["size_ijk"] == list(us.size_ijk)
    np.testing.assert_allclose(report["input"]["origin_lps"], us.origin, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_other_scalar_types_register_alike(service, patient, client, dtype):
    us = patient.frames[0].image.array
    client.conn.send(us_message(patient, array=us.astype(dtype)))
    got = client.wait_for(lambda m: is_report(m) or is_status(m), 30)
    assert is_report(got[-1])
    assert json.loads(got[-1].string)["input"]["dtype"] == np.dtype(dtype).name


def test_only_the_latest_waiting_frame_is_registered(service, patient, client):
    stamps = [time.time() + n for n in range(5)]
    for stamp in stamps:  # back to back: faster than any registration
        client.conn.send(us_message(patient, stamp))
    got = client.wait_for(lambda m: is_report(m) and json.loads(m.string)["source_timestamp"] ==
                          pytest.approx(stamps[-1], abs=1e-6), 60)
    reports = [json.loads(m.string) for m in got if is_report(m)]
    assert len(reports) < len(stamps)  # some were replaced while the worker was busy
    assert reports[-1]["frames_dropped"] == len(stamps) - len(reports)


def test_two_clients_each_get_their_own_results(service, patient):
    results = {}

    def run(name):
        results[name] = assert_serves(service, patient)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {"a", "b"}


# -- bad input and faults --------------------------------------------------------------------

def error_status(reader, timeout=10):
    got = reader.wait_for(lambda m: is_status(m) or is_report(m), timeout)
    assert is_status(got[-1]), "expected an error STATUS"
    assert got[-1].code != msgs.STATUS_OK
    return got[-1]


def test_wrong_crc_is_answered_and_the_connection_keeps_serving(service, patient, client):
    header, body = encode(us_message(patient))
    client.conn.send_buffers([header[:-8] + struct.pack(">Q", 12345), body])
    assert "CRC" in error_status(client).text
    assert_serves(service, patient, client)


def test_unknown_message_type_is_answered(service, patient, client):
    client.conn.send_buffers([raw_message("NOSUCHTYPE", b"12345")])
    assert "unknown message type" in error_status(client).text
    assert_serves(service, patient, client)


@pytest.mark.parametrize("case,expect", [
    ("scalar_type", "malformed IMAGE"), ("components", "components"), ("2d", "2D"),
    ("nan", "NaN"), ("no_overlap", "does not overlap"), ("short_voxels", "malformed IMAGE"),
    ("constant", "no contrast"),
])
def test_bad_images_are_answered(service, patient, client, case, expect):
    us = patient.frames[0].image
    if case == "nan":
        array = us.array.astype(np.float32)
        array[5, 5, 5] = np.nan
        message = us_message(patient, array=array)
    elif case == "components":
        message = msgs.volume_to_image(np.repeat(us.array[..., None], 3, axis=-1), us, "US", time.time())
    elif case == "2d":
        message = msgs.volume_to_image(us.array[:1], us, "US", time.time())
    elif case == "constant":
        message = us_message(patient, array=np.where(us.array > 0, 9, 0).astype(us.array.dtype))
    elif case == "no_overlap":
        far = us.with_array(us.array)
        far.origin = far.origin + 1000.0
        message = msgs.volume_to_image(far.array, far, "US", time.time())
    else:
        message = us_message(patient)
    header, body = encode(message)
    if case == "scalar_type":
        body = body[:3] + bytes([12]) + body[4:]  # 12 is no OpenIGTLink scalar type
    if case == "short_voxels":
        body = body[:-100]
    client.conn.send_buffers([raw_message("IMAGE", body)])
    assert expect in error_status(client, 30).text
    assert_serves(service, patient, client)


def test_malformed_header_ends_that_connection_only(service, patient, client):
    client.conn.send_buffers([struct.pack(">H", 77) + b"\xff" * 56])
    assert "malformed header" in error_status(client).text
    with pytest.raises(Exception, match="closed"):
        client.wait_for(lambda m: False, 5)
    assert_serves(service, patient)  # on a new connection


def test_body_far_larger_than_what_follows_times_out(service, patient, client):
    client.conn.send_buffers([raw_message("IMAGE", b"\0" * 1000, body_size=10_000_000)])
    # answered (the wait is only there to end the test); how long a stalled or dribbling client
    # holds on is measured by benchmarks/fusion_service_reliability.py, not asserted here
    status = error_status(client, timeout=10)
    assert "stalled" in status.text
    assert_serves(service, patient)


def test_announced_body_beyond_the_limit_is_refused_at_once(service, patient, client):
    client.conn.send_buffers([raw_message("IMAGE", b"", body_size=1 << 40)])
    assert "limit" in error_status(client).text
    assert_serves(service, patient)


def test_client_leaving_mid_message(service, patient):
    header, body = encode(us_message(patient))
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(header + body[: len(body) // 2])
    assert_serves(service, patient)


def test_silent_client_does_not_block_others(service, patient):
    with socket.create_connection(("127.0.0.1", service.port)):
        time.sleep(STALL_S * 2)  # idle longer than the stall timeout: allowed, and harmless
        assert_serves(service, patient)


def test_random_bytes_never_stop_the_service(service, patient):
    """A bounded fuzz loop: random garbage, and valid headers with random bodies."""
    rng = np.random.default_rng(7)
    types = ["IMAGE", "TRANSFORM", "STRING", "STATUS", "POINT", "POSITION", "XYZ"]
    for n in range(40):
        if n % 2:
            payload = rng.bytes(int(rng.integers(1, 400)))
        else:
            body = rng.bytes(int(rng.integers(0, 300)))
            payload = raw_message(types[n % len(types)], body)
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(payload)
    assert_serves(service, patient)
    assert service.stats()["errors"] > 0
    assert service.alive


def test_memory_is_flat_over_many_large_frames():
    """Forty 16 MB volumes through the echo service: resident memory does not grow by frame."""
    from MRUSFusionLib.stream_benchmark import _rss_mb

    array = np.random.default_rng(3).integers(0, 255, (256, 256, 256), dtype=np.uint8)
    from conftest import oblique_volume
    volume = oblique_volume(array)
    with FusionService(EchoProcessor(), port=0) as service:
        reader = MessageReader(Connection.connect("127.0.0.1", service.port))
        try:
            def one():
                reader.conn.send(msgs.volume_to_image(array, volume, "US", time.time()))
                reader.wait_for(is_report, 30)
            for _ in range(5):
                one()
            before = _rss_mb()
            for _ in range(40):
                one()
            growth = _rss_mb() - before
        finally:
            reader.close()
    assert growth < 100, f"resident memory grew by {growth:.0f} MB over 40 frames of 16 MB"


def test_connect_mode_reaches_a_us_source(processor, patient):
    """`--connect`: the service dials a US source (as Slicer dials PLUS) and answers on that line."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        host, port = server.getsockname()
        with FusionService(processor, connect=(host, port)):
            server.settimeout(10)
            sock, _ = server.accept()
            reader = MessageReader(Connection(sock))
            try:
                reader.conn.send(us_message(patient))
                got = reader.wait_for(lambda m: is_report(m) or is_status(m), 30)
            finally:
                reader.close()
    assert is_report(got[-1]) and any(m.device_name == DEVICE_FIELD for m in got)


def test_max_frames_stops_the_service(processor, patient):
    with FusionService(processor, port=0, max_frames=1) as service:
        assert_serves(service, patient)
        assert service.stopped.wait(5)


def test_serve_command_stops_cleanly_on_sigterm():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "deepnav.cli", "fusion", "serve", "--echo", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = Connection.connect("127.0.0.1", port)
                break
            except OSError:
                time.sleep(0.2)
        reader = MessageReader(conn)
        volume_array = np.zeros((4, 5, 6), np.uint8)
        from conftest import oblique_volume
        reader.conn.send(msgs.volume_to_image(volume_array, oblique_volume(volume_array), "US", time.time()))
        reader.wait_for(is_report, 10)
        reader.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "1 frames registered" in out


# -- the corrected result of a frame, after the network's ------------------------------------

def test_a_correcting_service_sends_the_corrected_result_after_the_network_one(patient, shipped_model):
    """Two sets of results for one frame, in order: the network's (report stage "network",
    more_coming) then the corrected one (stage "corrected") on the registration region, whose
    field maps points where the in-process correction does; a frame with a newer one waiting
    gets no correction (latest-frame-only holds for the second stage)."""
    from MRUSFusionLib.registration import register

    processor = FusionProcessor(shipped_model, patient.mr, patient.liver, correct=True)
    with FusionService(processor, port=0) as service:
        reader = MessageReader(Connection.connect("127.0.0.1", service.port))
        try:
            stamp = time.time()
            reader.conn.send(us_message(patient, stamp))
            first = reader.wait_for(is_report, 60)
            second = reader.wait_for(is_report, 120)
            # two frames back to back: the first's correction gives way to the second frame
            stamps = (time.time() + 1.0, time.time() + 2.0)
            for s in stamps:
                reader.conn.send(us_message(patient, s))
            later = []
            while not later or json.loads(later[-1].string)["stage"] != "corrected":
                later += [m for m in reader.wait_for(is_report, 120) if is_report(m)]
        finally:
            reader.close()
    network, corrected = json.loads(first[-1].string), json.loads(second[-1].string)
    assert (network["stage"], network["more_coming"]) == ("network", True)
    assert (corrected["stage"], corrected["more_coming"]) == ("corrected", False)
    assert corrected["frame_id"] == network["frame_id"] and corrected["correction"]["mind_ssc_after"] <= \
        corrected["correction"]["mind_ssc_before"]
    by_device = {m.device_name: m for m in second}
    header, body = encode(us_message(patient))
    parsed = pyigtl.ImageMessage()
    parsed.unpack(pyigtl.MessageBase.parse_header(header), body)
    # the US as the service read it (OpenIGTLink carries its geometry as float32: 1e-5 mm off, and
    # the correction's path from two such inputs may differ by ~0.1 mm)
    local = register(shipped_model, patient.mr, msgs.image_to_volume(parsed), liver=patient.liver)
    field = displacement_transform(msgs.image_to_field(by_device[DEVICE_FIELD]))
    points = patient.landmarks_lps[:6]
    np.testing.assert_allclose(transform_points(field, points), transform_points(local.transform(), points), atol=0.05)
    warped = msgs.image_to_volume(by_device[DEVICE_WARPED])
    assert warped.same_grid(local.correction.region)
    reports = [json.loads(m.string) for m in later]
    assert [r["source_timestamp"] for r in reports if r["stage"] == "corrected"] == [pytest.approx(stamps[1], abs=1e-6)]
    assert all(not r["more_coming"] for r in reports if r["source_timestamp"] == pytest.approx(stamps[0], abs=1e-6))


def test_the_second_stage_never_holds_up_the_next_frames_first_result(patient, shipped_model):
    """The correction (seconds) runs beside the network (a fraction of a second): a frame sent
    once the previous frame's network result is back gets its own network result before that
    previous frame's corrected one (one worker for both made it wait for the whole correction)."""
    processor = FusionProcessor(shipped_model, patient.mr, patient.liver, correct=True)
    with FusionService(processor, port=0) as service:
        reader = MessageReader(Connection.connect("127.0.0.1", service.port))
        try:
            stamps = (time.time(), time.time() + 1.0)
            reader.conn.send(us_message(patient, stamps[0]))
            reader.wait_for(is_report, 60)  # the first frame's network result
            reader.conn.send(us_message(patient, stamps[1]))
            reports = []
            while len([r for r in reports if r["stage"] == "corrected"]) < 2:
                reports += [json.loads(m.string) for m in reader.wait_for(is_report, 120) if is_report(m)]
        finally:
            reader.close()
    order = [(r["stage"], stamps.index(min(stamps, key=lambda s: abs(s - r["source_timestamp"])))) for r in reports]
    assert order[0] == ("network", 1), order  # the second frame's network result came first ...
    assert order.index(("corrected", 0)) > 0 and ("corrected", 1) in order  # ... and both corrections came
