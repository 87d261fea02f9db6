"""The fusion service as a child process (what MRUSFusion's live mode starts): results arrive as
in-process registration gives them, followed by the frame's corrected result; a failed start raises
the child's message, a killed service is reported while the host goes on, and close() ends it."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import write_volume
from MRUSFusionLib import fields
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.registration import register
from MRUSFusionLib.service_process import LocalServiceRegistration

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


def wait_for(condition, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_the_service_process_fuses_as_in_process_and_a_kill_is_reported(patient, shipped_model, tmp_path):
    mr, liver = write_volume(patient.mr, tmp_path / "mr.nrrd"), write_volume(patient.liver, tmp_path / "liver.nrrd")
    us = patient.frames[1].image
    live = LocalServiceRegistration(mr, liver, device="cpu", python=sys.executable)
    try:
        live.submit(us)
        result = wait_for(live.poll, timeout_s=120)
        direct = register(shipped_model, patient.mr, us, liver=patient.liver, correct=False)
        np.testing.assert_allclose(sitk.GetArrayFromImage(result.field_lps()), sitk.GetArrayFromImage(
            fields.displacement_to_lps_image(direct.disp_ijk, direct.grid)), atol=1e-4)
        # the service read the US's geometry as float32 (OpenIGTLink): its network saw a grid 1e-5 mm off
        np.testing.assert_allclose(result.rigid_to_parent_ras, msgs.rigid_to_parent_ras(direct.rigid_transform()),
                                   atol=1e-4)
        assert "cpu" in live.stats()["device"]
        assert result.report.get("stage", "network") == "network"
        # by default (no --fast) the same frame's corrected result follows, on its registration region
        corrected = wait_for(live.poll, timeout_s=180)
        assert corrected.report["stage"] == "corrected"
        assert not corrected.warped.same_grid(result.warped)

        os.kill(live.process.pid, signal.SIGKILL)
        error = wait_for(lambda: live.stats()["last_error"], timeout_s=10)
        assert "fusion service process stopped" in error and "SIGKILL" in error
    finally:
        live.close()
    assert live.process.done


def test_a_service_that_cannot_start_says_why(tmp_path):
    with pytest.raises(InputError, match="MR"):
        LocalServiceRegistration(tmp_path / "missing-mr.nrrd", device="cpu", python=sys.executable,
                                 ready_timeout_s=120)
