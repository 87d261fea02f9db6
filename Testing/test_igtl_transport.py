"""OpenIGTLink framing and message conversions, against pyigtl's own packing and parsing."""

from __future__ import annotations

import socket
import time

import numpy as np
import pyigtl
import pytest
import SimpleITK as sitk
from pyigtl.messages import CRC64

from conftest import oblique_volume, smooth_image
from deepnav.errors import InputError
from deepnav.imaging import LPS_TO_RAS
from MRUSFusionLib import fields
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_transport import HEADER_SIZE, Connection, MessageReader, ProtocolError, crc64, encode, wire_timestamp
from MRUSFusionLib.mailbox import LatestFrameMailbox
from MRUSFusionLib.service import EchoProcessor, FusionService


def test_crc_is_pyigtl_crc64():
    data = np.random.default_rng(0).bytes(100_003)
    assert crc64(data) == CRC64(data)
    assert crc64(b"") == CRC64(b"")


def test_our_encoding_is_what_pyigtl_packs():
    """Same bytes as pyigtl's pack() (header version 1), so any pyigtl peer reads us."""
    volume = oblique_volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    message = msgs.volume_to_image(volume.array, volume, "US", 1_700_000_000.25)
    header, body = encode(message)
    assert header + body == message.pack()
    parsed = pyigtl.MessageBase.parse_header(header)
    again = pyigtl.ImageMessage()
    again.unpack(parsed, body)
    np.testing.assert_array_equal(again.image, volume.array)


@pytest.fixture()
def pair():
    """Two ends of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    yield Connection(a), Connection(b)
    a.close()
    b.close()


def test_pyigtl_packed_messages_are_received(pair):
    sender, receiver = pair
    sender.send_buffers([pyigtl.TransformMessage(np.diag([1.0, 2.0, 3.0, 1.0]), device_name="T").pack()])
    message, fields_ = receiver.receive()
    assert message.message_type == "TRANSFORM" and message.device_name == "T"
    np.testing.assert_allclose(message.matrix, np.diag([1.0, 2.0, 3.0, 1.0]))


def test_status_round_trip(pair):
    sender, receiver = pair
    sender.send(msgs.StatusMessage(9, "CRC mismatch", error_name="DeepNavError", device_name="US"))
    message, _ = receiver.receive()
    assert (message.message_type, message.code, message.text, message.error_name) == \
        ("STATUS", 9, "CRC mismatch", "DeepNavError")


@pytest.mark.parametrize("kind", ["IMAGE", "TRANSFORM", "STATUS", "STRING"])
def test_a_corrupted_body_of_any_message_type_is_rejected_and_the_next_one_read(pair, kind):
    """The CRC covers every message type, not only the volumes: a flipped bit in a TRANSFORM's
    matrix would move the US as surely as one in an IMAGE's voxels."""
    volume = oblique_volume(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6))
    message = {"IMAGE": lambda: msgs.volume_to_image(volume.array, volume, "US", 1.0),
               "TRANSFORM": lambda: pyigtl.TransformMessage(np.diag([1.0, 2.0, 3.0, 1.0]), device_name="T"),
               "STATUS": lambda: msgs.StatusMessage(1, "ok", device_name="S"),
               "STRING": lambda: pyigtl.StringMessage("{}", device_name="R")}[kind]()
    sender, receiver = pair
    header, body = encode(message)
    corrupted = bytearray(body)
    corrupted[len(corrupted) // 2] ^= 0x01  # one bit, in transit; the header's CRC is the sender's
    sender.send_buffers([header, bytes(corrupted)])
    sender.send(msgs.StatusMessage(1, "next", device_name="N"))
    with pytest.raises(ProtocolError, match=f"{kind} message .*CRC mismatch") as caught:
        receiver.receive()
    assert not caught.value.fatal  # only that message is dropped
    assert receiver.receive()[0].text == "next"


def test_timestamps_survive_the_header(pair):
    sender, receiver = pair
    stamp = time.time()
    sender.send(pyigtl.StringMessage("x", device_name="S", timestamp=stamp))
    _, fields_ = receiver.receive()
    assert fields_["timestamp"] == wire_timestamp(stamp)
    assert abs(fields_["timestamp"] - stamp) < 1e-6


@pytest.mark.parametrize("system", ["ras", "lps"])
def test_image_geometry_read_in_either_coordinate_system(system):
    volume = oblique_volume(smooth_image((6, 7, 8)))
    matrix = volume.ijk_to_ras() if system == "ras" else volume.ijk_to_lps()
    message = pyigtl.ImageMessage(volume.array, ijk_to_world_matrix=matrix, world_coordinate_system=system)
    header, body = encode(message)
    parsed = pyigtl.ImageMessage()
    parsed.unpack(pyigtl.MessageBase.parse_header(header), body)
    back = msgs.image_to_volume(parsed)
    # OpenIGTLink carries geometry as float32
    np.testing.assert_allclose(back.origin, volume.origin, atol=2e-5)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    np.testing.assert_array_equal(back.array, volume.array)


def test_non_volumes_are_rejected_clearly():
    volume = oblique_volume(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(InputError, match="2D"):
        msgs.image_to_volume(msgs.volume_to_image(volume.array, volume, "US", 0.0))
    vector = oblique_volume(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="3 components"):
        msgs.image_to_volume(msgs.volume_to_image(np.zeros((4, 4, 4, 3), np.uint8), vector, "US", 0.0))


def test_displacement_image_is_the_lps_field_in_ras():
    grid = oblique_volume(np.zeros((5, 6, 7), np.float32), spacing=(1.0, 1.5, 2.0))
    disp_ijk = np.random.default_rng(1).normal(0, 2, (3, 5, 6, 7)).astype(np.float32)
    message = msgs.displacement_to_image(disp_ijk, grid, "F", 0.0)
    lps = sitk.GetArrayFromImage(fields.displacement_to_lps_image(disp_ijk, grid))
    np.testing.assert_allclose(message.image, lps * np.array([-1, -1, 1]), atol=1e-4)
    back = msgs.image_to_field(message)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), lps, atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), grid.origin, atol=1e-4)


def test_rigid_to_parent_matrix_of_a_quarter_turn_written_by_hand():
    """MR -> US (LPS): a quarter turn about S, then t = (10, -5, 3) mm. Slicer's to-parent matrix
    takes US points back: x_mr = R^T (x_us - t); in RAS (x and y negated) R^T keeps its form and
    the translation -R^T t = (5, 10, -3) LPS becomes (-5, -10, -3)."""
    quarter_turn = [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # x -> y, y -> -x (row-major)
    rigid = sitk.AffineTransform(quarter_turn, (10.0, -5.0, 3.0), (0.0, 0.0, 0.0))
    expected = np.array([[0.0, 1.0, 0.0, -5.0],
                         [-1.0, 0.0, 0.0, -10.0],
                         [0.0, 0.0, 1.0, -3.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(msgs.rigid_to_parent_ras(rigid), expected, atol=1e-12)


def test_rigid_transform_message_moves_the_us_onto_the_mr():
    """Our rigid (MR point -> US point, LPS) sent as Slicer's RAS to-parent matrix maps US
    points (RAS) back to MR points (RAS)."""
    rigid = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.1, -0.2, 0.3, (4.0, -7.0, 12.0))
    affine = sitk.AffineTransform(rigid.GetMatrix(), rigid.GetTranslation(), rigid.GetCenter())
    to_parent = msgs.rigid_to_parent_ras(affine)
    mr_lps = np.array([[12.0, -30.0, 55.0], [-40.0, 8.0, -3.0]])
    us_lps = fields.transform_points(affine, mr_lps)
    us_ras = np.c_[us_lps, np.ones(2)] @ LPS_TO_RAS.T
    np.testing.assert_allclose((us_ras @ to_parent.T)[:, :3], mr_lps * [-1, -1, 1], atol=1e-9)


@pytest.mark.parametrize("shape,dtype", [((256, 256, 256), np.uint8), ((288, 256, 256), np.float32)])
def test_large_volumes_go_both_ways(shape, dtype):
    """16 MB and 75 MB volumes (where pyigtl's own transport times out) echo back intact (the echo's
    latency is measured by `deepnav fusion bench-stream`, not asserted here)."""
    rng = np.random.default_rng(2)
    array = rng.integers(0, 255, shape).astype(dtype)
    volume = oblique_volume(array, spacing=(0.4, 0.4, 0.4))
    with FusionService(EchoProcessor(), port=0) as service:
        reader = MessageReader(Connection.connect("127.0.0.1", service.port))
        try:
            reader.conn.send(msgs.volume_to_image(array, volume, "US", time.time()))
            got = reader.wait_for(lambda m: m.device_name == "DeepNavReport", 60)
        finally:
            reader.close()
    echo = msgs.image_to_volume(next(m for m in got if m.device_name == "DeepNavEcho"))
    np.testing.assert_array_equal(echo.array, array)
    np.testing.assert_allclose(echo.origin, volume.origin, atol=1e-4)


def test_header_size_is_the_protocols():
    assert HEADER_SIZE == 58


def test_mailbox_keeps_only_the_latest_frame_per_peer():
    a, b = object(), object()
    box = LatestFrameMailbox()

    def frame(session, n):
        from MRUSFusionLib.service import Frame
        return Frame(None, "US", float(n), 0.0, session, {})

    replaced = [box.put(id(a), frame(a, n)) for n in range(3)]
    replaced += [box.put(id(b), frame(b, 10)), box.put(id(a), frame(a, 3))]
    assert replaced == [False, True, True, False, True]
    first, second = box.take(0.1), box.take(0.1)
    assert (first.session, first.timestamp) == (a, 3.0)  # a waited longest; its newest frame
    assert (second.session, second.timestamp) == (b, 10.0)
    assert box.take(0.01) is None
    assert box.dropped == 3


def test_an_image_whose_fields_contradict_its_size_is_skipped_without_storing_it(pair):
    """The IMAGE's dimensions arrive first: a body that contradicts them is read through a scratch
    buffer (256 MB pass, resident memory hardly moves), rejected, and the stream stays in sync."""
    import threading

    from MRUSFusionLib.igtl_transport import HEADER, ProtocolError
    from MRUSFusionLib.stream_benchmark import ProcessSampler

    sender, receiver = pair
    volume = oblique_volume(np.zeros((8, 8, 8), np.uint8))
    _, body = encode(msgs.volume_to_image(volume.array, volume, "US", 0.0))
    size = 256 << 20
    header = HEADER.pack(1, b"IMAGE", b"US", 0, 0, size, 0)

    def send():
        sender.send_buffers([header, body, bytes(size - len(body))])
        sender.send(pyigtl.StringMessage("after", device_name="S"))

    thread = threading.Thread(target=send)
    with ProcessSampler(period_s=0.01) as memory:
        thread.start()
        with pytest.raises(ProtocolError, match="malformed IMAGE .*-byte body") as error:
            receiver.receive()
        thread.join()
    assert not error.value.fatal
    assert memory.summary()["peak_mb"] - memory.samples[0][1]["rss_mb"] < 64
    message, _ = receiver.receive()
    assert message.string == "after"
