"""Interoperability with the reference C++ OpenIGTLink library (Debian's libopenigtlink-dev 1.11,
which `.ci/run` installs): a small C++ US source sends a 3D IMAGE to the service and checks,
with the library's own parser and CRC, what comes back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from deepnav.imaging import Volume
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.igtl_messages import DEVICE_ECHO, DEVICE_FIELD, DEVICE_REPORT, DEVICE_RIGID, DEVICE_WARPED
from MRUSFusionLib.service import EchoProcessor, FusionProcessor, FusionService

INCLUDE = Path("/usr/include/openigtlink")
SOURCE = ROOT / "Testing" / "cpp" / "igtl_us_client.cxx"


@pytest.fixture(scope="module")
def cpp_client(tmp_path_factory) -> Path:
    if not (INCLUDE / "igtlImageMessage.h").exists():
        if os.environ.get("CI"):
            pytest.fail("libopenigtlink-dev is missing: .ci/run installs it with apt-get")
        pytest.skip("libopenigtlink-dev not installed (apt-get install libopenigtlink-dev)")
    binary = tmp_path_factory.mktemp("cpp") / "igtl_us_client"
    subprocess.run([shutil.which("g++") or "g++", "-O1", "-o", str(binary), str(SOURCE), f"-I{INCLUDE}",
                    "-lOpenIGTLink"], check=True, capture_output=True)
    return binary


def send_from_cpp(binary: Path, port: int, volume: Volume, tmp_path: Path) -> list[dict]:
    """Run the C++ client on `volume` (uint8); its printed answers, one dict per message."""
    raw = tmp_path / "us.raw"
    raw.write_bytes(np.ascontiguousarray(volume.array, np.uint8).tobytes())  # i fastest
    ras = volume.ijk_to_ras()
    normals = ras[:3, :3] / volume.spacing
    centre = ras @ np.r_[(np.array(volume.size_ijk) - 1) / 2.0, 1.0]
    args = [str(binary), "127.0.0.1", str(port), str(raw), *map(str, volume.size_ijk),
            *(f"{x:.9g}" for x in volume.spacing), *(f"{x:.9g}" for x in normals.T.ravel()),
            *(f"{x:.9g}" for x in centre[:3])]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


def geometry_of(answer: dict) -> np.ndarray:
    """IJK -> RAS matrix from what the C++ library decoded (normals, spacing, image centre)."""
    m = np.eye(4)
    m[:3, :3] = np.array(answer["normals"]).T * np.array(answer["spacing"])  # printed as rows t, s, n
    m[:3, 3] = np.array(answer["centre"]) - m[:3, :3] @ ((np.array(answer["size"]) - 1) / 2.0)
    return m


def test_echo_is_intact_for_the_reference_library(cpp_client, patient, tmp_path):
    us = patient.frames[0].image
    with FusionService(EchoProcessor(), port=0) as service:
        answers = send_from_cpp(cpp_client, service.port, us, tmp_path)
    echo = next(a for a in answers if a["device"] == DEVICE_ECHO)
    assert all(a["crc_ok"] for a in answers)
    assert echo["size"] == list(us.size_ijk) and echo["scalar_type"] == 3 and echo["coordinate"] == 1  # RAS
    np.testing.assert_allclose(geometry_of(echo), us.ijk_to_ras(), atol=1e-3)
    assert echo["sum"] == float(us.array.sum(dtype=np.int64))
    report = json.loads(next(a for a in answers if a["device"] == DEVICE_REPORT)["string"])
    np.testing.assert_allclose(report["input"]["origin_lps"], us.origin, atol=1e-3)  # what we decoded of theirs
    np.testing.assert_allclose(np.reshape(report["input"]["direction_lps"], (3, 3)), us.direction, atol=1e-6)


def test_fusion_results_read_by_the_reference_library(cpp_client, patient, shipped_model, tmp_path):
    us = patient.frames[0].image
    processor = FusionProcessor(shipped_model, patient.mr, patient.liver)
    with FusionService(processor, port=0) as service:
        answers = send_from_cpp(cpp_client, service.port, us, tmp_path)
    by_device = {a["device"]: a for a in answers}
    assert {DEVICE_WARPED, DEVICE_RIGID, DEVICE_FIELD, DEVICE_REPORT} <= set(by_device), answers
    assert all(a["crc_ok"] for a in answers)
    local = processor.register(us)

    warped = by_device[DEVICE_WARPED]
    assert warped["size"] == [128, 128, 128] and warped["scalar_type"] == 3 and warped["components"] == 1
    np.testing.assert_allclose(geometry_of(warped), local.grid.ijk_to_ras(), atol=1e-3)
    expected = float(msgs.intensity_to_uint8(local.warped).sum(dtype=np.int64))
    assert abs(warped["sum"] - expected) <= 1e-4 * expected

    field = by_device[DEVICE_FIELD]
    assert field["components"] == 3 and field["scalar_type"] == 10  # float32
    np.testing.assert_allclose(geometry_of(field), local.grid.ijk_to_ras(), atol=1e-3)

    np.testing.assert_allclose(by_device[DEVICE_RIGID]["matrix"], msgs.rigid_to_parent_ras(local.rigid_transform()),
                               atol=1e-4)
