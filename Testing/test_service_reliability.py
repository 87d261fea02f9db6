"""The fusion service under hostile and long load, over real loopback sockets: headers that claim a
gigabyte and then dribble, more clients than it serves, no descriptors left to accept with, a
fuzz run and a soak (short versions of benchmarks/fusion_service_reliability.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, oblique_volume
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_REPORT
from MRUSFusionLib.igtl_transport import Connection, MessageReader
from MRUSFusionLib.service import EchoProcessor, FusionService
from MRUSFusionLib.service_stress import dribble, fuzz, soak

STALL_S = 0.5


@pytest.fixture()
def volume():
    return oblique_volume(np.random.default_rng(0).integers(0, 255, (48, 40, 32), dtype=np.uint8))


def is_answer(m):
    return getattr(m, "message_type", "") == "STATUS" or getattr(m, "device_name", "") == DEVICE_REPORT


def answered(port: int, volume, timeout_s: float = 10.0) -> bool:
    """A valid frame on a new connection gets its report."""
    reader = MessageReader(Connection.connect("127.0.0.1", port))
    try:
        reader.conn.send(msgs.volume_to_image(volume.array, volume, "US", time.time()))
        return reader.wait_for(is_answer, timeout_s)[-1].device_name == DEVICE_REPORT
    finally:
        reader.close()


def test_headers_claiming_a_gigabyte_cost_what_arrives_and_are_cut(volume):
    """Three clients announce a 1 GiB IMAGE (fields agreeing) and send a byte every 0.2 s: the
    service's memory follows the bytes that came (it used to allocate each gigabyte at once), and
    the minimum rate cuts them soon after the stall timeout's grace (a stall timer alone restarts
    on every byte)."""
    with FusionService(EchoProcessor(), port=0, stall_timeout_s=STALL_S) as service:
        result = dribble("127.0.0.1", service.port, clients=3, byte_every_s=0.2, hold_s=20)
        assert answered(service.port, volume)
    assert result["growth_mb"] < 64, result
    assert all(t is not None and t < 10 for t in result["cut_after_s"]), result


def test_clients_beyond_the_limit_are_refused_with_a_status_and_cost_no_thread(volume):
    with FusionService(EchoProcessor(), port=0, max_clients=2) as service:
        served = [MessageReader(Connection.connect("127.0.0.1", service.port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 10
            while service.stats()["clients"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [MessageReader(Connection.connect("127.0.0.1", service.port)) for _ in range(10)]
            for reader in refused:
                status = reader.wait_for(is_answer, 10)[-1]
                assert status.message_type == "STATUS" and "refused" in status.text and "--max-clients" in status.text
                with pytest.raises(Exception, match="closed"):
                    reader.wait_for(lambda m: False, 5)
                reader.close()
            readers = [t for t in threading.enumerate() if t.name.startswith("igtl-read")]
            assert len(readers) == 2
            assert service.stats()["clients_refused"] == 10
            # a served peer that leaves makes room for the next
            served[0].conn.send(msgs.volume_to_image(volume.array, volume, "US", time.time()))
            assert served[0].wait_for(is_answer, 10)[-1].device_name == DEVICE_REPORT
            served.pop(0).close()
            deadline = time.monotonic() + 10
            while service.stats()["clients"] > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert answered(service.port, volume)
        finally:
            for reader in served:
                reader.close()


# The service in a process of its own whose descriptors run out: its accept fails with EMFILE
# while a client waits in the listen queue; then the descriptors come back.
_EXHAUSTED_SERVICE = textwrap.dedent("""
    import logging, os, resource, sys
    sys.path[:0] = [{root!r}, {root!r} + "/MRUSFusion"]
    from MRUSFusionLib.service import EchoProcessor, FusionService
    logging.basicConfig(level=logging.INFO)
    with FusionService(EchoProcessor(), port=0) as service:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print(service.port, flush=True)
        sys.stdin.readline()  # a client is waiting to be accepted
        for fd in hog:
            os.close(fd)
        print("released", flush=True)
        sys.stdin.readline()
""")


def test_the_accept_loop_survives_running_out_of_descriptors(volume):
    proc = subprocess.Popen([sys.executable, "-c", _EXHAUSTED_SERVICE.format(root=str(ROOT))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        reader = MessageReader(Connection.connect("127.0.0.1", port))  # queued: nothing to accept it with
        try:
            reader.conn.send(msgs.volume_to_image(volume.array, volume, "US", time.time()))
            time.sleep(1.5)  # accept fails, again and again
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "released"
            got = reader.wait_for(is_answer, 10)  # within 10 s of the descriptors coming back
        finally:
            reader.close()
        assert got[-1].device_name == DEVICE_REPORT
        assert answered(port, volume)
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "cannot accept connections" in err and "Too many open files" in err, err
    assert proc.returncode == 0, err


def test_a_short_fuzz_run_never_stops_the_service_and_every_valid_frame_is_answered(volume):
    with FusionService(EchoProcessor(), port=0, stall_timeout_s=STALL_S) as service:
        result = fuzz("127.0.0.1", service.port, volume, messages=400, valid_every=50, seed=3,
                      alive=lambda: service.alive)
        assert service.alive
    assert result["crashes"] == 0 and result["failures"] == [], result
    assert result["status_answered"] == result["status_expected"] > 150
    assert result["valid_answered"] == result["valid_sent"] == 9
    assert all(n > 0 for n in result["by_kind"].values()), result["by_kind"]


def test_a_short_soak_answers_every_frame_with_flat_memory_descriptors_and_threads(volume):
    with FusionService(EchoProcessor(), port=0) as service:
        result = soak("127.0.0.1", service.port, volume, frames=80, rate_hz=40, sample_every_s=0.05)
    assert result["frames_answered"] + result["dropped_frames"] == 80 and result["errors"] == 0
    process = result["process"]
    assert abs(process["growth_q2_to_q4_mb"]) < 50, process
    assert process["descriptors"]["max"] <= process["descriptors"]["start"] + 4, process
    assert process["threads"]["max"] <= process["threads"]["start"] + 4, process
