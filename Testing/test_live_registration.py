"""What the Slicer module runs, without Slicer: fiducial alignment, live registration in this
process and through the real service over loopback (same results, latest frame only, errors
reported without stopping), background training with progress and cancel."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import matrix_to_affine, rotation_matrix
from deepnav.progress import BackgroundTask, Cancelled
from MRUSFusionLib import fields
from MRUSFusionLib import igtl_messages as msgs
from MRUSFusionLib.alignment import prealign, rigid_from_fiducials
from MRUSFusionLib.live import LocalRegistration, RemoteRegistration
from MRUSFusionLib.registration import register
from MRUSFusionLib.service import FusionProcessor, FusionService


def known_rigid(angles_deg=(4.0, -6.0, 9.0), shift=(12.0, -7.0, 5.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(np.deg2rad(angles_deg))
    m[:3, 3] = shift
    return m


def test_fiducials_recover_a_known_rigid_transform(patient):
    truth = known_rigid()
    mr_points = patient.landmarks_lps
    us_points = mr_points @ truth[:3, :3].T + truth[:3, 3]
    noisy = us_points + np.random.default_rng(0).normal(0, 0.5, us_points.shape)
    alignment = rigid_from_fiducials(mr_points, noisy)
    assert alignment.fre_mm < 1.0
    exact = rigid_from_fiducials(mr_points, us_points)
    np.testing.assert_allclose(exact.matrix_lps, truth, atol=1e-6)
    np.testing.assert_allclose(fields.transform_points(exact.transform(), mr_points), us_points, atol=1e-6)


@pytest.mark.parametrize("mr, us, message", [
    (np.zeros((3, 3)), np.zeros((4, 3)), "in pairs"),
    (np.eye(3)[:2], np.eye(3)[:2], "at least 3"),
    (np.outer(np.arange(4), [10.0, 0, 0]), np.outer(np.arange(4), [0, 10.0, 0]), "on a line"),
    (np.array([[0, 0, np.nan], [10, 0, 0], [0, 10, 0]]), np.eye(3) * 10, "not a number"),
])
def test_bad_fiducials_are_refused_clearly(mr, us, message):
    with pytest.raises(InputError, match=message):
        rigid_from_fiducials(mr, us)


def test_prealigned_us_registers_as_the_us_through_the_alignment(patient, shipped_model):
    """Pre-aligning by geometry (what the module does) gives the network the same input as
    resampling through the transform, and its results, followed by the alignment, map MR points
    where `register(initial=...)` maps them."""
    us = patient.frames[0].image
    t = known_rigid((2.0, 1.0, -3.0), (6.0, 4.0, -5.0))
    moved = prealign(us, np.linalg.inv(t))  # a US that the alignment t brings back
    via_initial = register(shipped_model, patient.mr, moved, liver=patient.liver,
                           initial=matrix_to_affine(np.linalg.inv(t)), correct=False)
    via_geometry = register(shipped_model, patient.mr, prealign(moved, np.linalg.inv(t)), liver=patient.liver,
                            correct=False)
    np.testing.assert_allclose(via_geometry.pair.moving, via_initial.pair.moving, atol=1e-4)
    points = patient.landmarks_lps
    through_prealigned = fields.transform_points(via_geometry.transform(), points)
    to_original = through_prealigned @ np.linalg.inv(t)[:3, :3].T + np.linalg.inv(t)[:3, 3]
    np.testing.assert_allclose(to_original, via_initial.map_points_lps(points), atol=0.05)


def wait_for_result(live, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = live.poll()
        if result is not None:
            return result
        time.sleep(0.02)
    raise AssertionError(f"no result in {timeout_s} s: {live.stats()}")


def test_local_live_registration_is_the_registration(patient, shipped_model):
    frames = [f.image for f in patient.frames]
    with LocalRegistration(shipped_model, patient.mr, patient.liver) as live:
        assert live.ready.wait(60)
        for us in frames:  # back to back: the first may be taken, the second waits or replaces
            live.submit(us)
        live.submit(frames[0])
        results = [wait_for_result(live)]
        while live.stats()["frames_completed"] + live.stats()["frames_dropped"] < 3:
            time.sleep(0.05)
        time.sleep(0.2)
        results += [r for r in [live.poll()] if r is not None]
        deadline = time.monotonic() + 10  # quality is computed after the result is out (not delaying it)
        while not live.stats()["quality"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = live.stats()
    assert stats["frames_submitted"] == 3 and stats["frames_dropped"] >= 1  # registration takes >> a submit
    assert stats["frames_completed"] + stats["frames_dropped"] == 3
    assert stats["latency_s"] > 0 and "cpu" in stats["device"]
    assert {"mind_before", "mind_after", "folding_percent"} <= set(stats["quality"])
    last = results[-1]  # the newest result is the last frame submitted
    direct = register(shipped_model, patient.mr, frames[0], liver=patient.liver, correct=False)
    np.testing.assert_allclose(sitk.GetArrayFromImage(last.field_lps()),
                               sitk.GetArrayFromImage(fields.displacement_to_lps_image(direct.disp_ijk, direct.grid)),
                               atol=1e-4)
    np.testing.assert_allclose(last.rigid_to_parent_ras, msgs.rigid_to_parent_ras(direct.rigid_transform()), atol=1e-6)
    assert last.warped.same_grid(direct.grid) and last.warped.array.dtype == np.uint8


def test_the_client_shows_the_corrected_result_last_with_the_corrections_confidence(patient, shipped_model):
    """With a correcting service, the newest result the client holds after a frame is the corrected
    one (on the registration region, not the network's grid), and the figures shown beside it are
    the correction's: MIND-SSC before and after, the inlier share, the distance from the network,
    the folding, the flags."""
    us = patient.frames[0].image
    processor = FusionProcessor(shipped_model, patient.mr, patient.liver, correct=True)
    with FusionService(processor, port=0) as service, RemoteRegistration("127.0.0.1", service.port) as live:
        live.submit(us)
        results, deadline = [], time.monotonic() + 180
        while (not results or results[-1].report.get("stage") != "corrected") and time.monotonic() < deadline:
            result = live.poll()
            results += [result] if result is not None else []
            time.sleep(0.05)
        quality = live.stats()["quality"]
    assert [r.report["stage"] for r in results][-1] == "corrected"
    corrected = results[-1]
    assert not corrected.warped.same_grid(processor.grid)  # the region that follows the US
    c = corrected.report["correction"]
    assert quality["stage"] == "corrected" and quality["flags"] == c["flags"]
    assert quality["mind_ssc_after"] <= quality["mind_ssc_before"] and 0.0 <= quality["inlier_share"] <= 1.0
    assert quality["network_disagreement_mm"] == c["network_disagreement_mm"]
    # folding: the network's field where the corrected map composes with it, none from the coarse alignment
    assert quality["folding_percent"] == c["folding_percent"] and 0.0 <= c["folding_percent"] < 100.0
    if c["start"] == "coarse":
        assert c["folding_percent"] == 0.0


def test_a_bad_frame_is_reported_and_the_next_one_registered(patient, shipped_model):
    with LocalRegistration(shipped_model, patient.mr, patient.liver) as live:
        far = patient.frames[0].image
        far = far.with_array(far.array)
        far.origin = far.origin + 1000.0
        live.submit(far)
        deadline = time.monotonic() + 60
        while live.stats()["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "does not overlap" in live.stats()["last_error"]
        live.submit(patient.frames[1].image)
        assert wait_for_result(live) is not None
        assert live.stats()["last_error"] is None


def test_service_mode_gives_what_in_process_gives(patient, shipped_model):
    us = patient.frames[1].image
    direct = register(shipped_model, patient.mr, us, liver=patient.liver, correct=False)
    with FusionService(FusionProcessor(shipped_model, patient.mr, patient.liver), port=0) as service, \
            RemoteRegistration("127.0.0.1", service.port) as live:
        live.submit(us)
        result = wait_for_result(live)
        far = us.with_array(us.array)
        far.origin = far.origin + 1000.0
        live.submit(far)
        deadline = time.monotonic() + 30
        while live.stats()["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        error = live.stats()["last_error"]
        live.submit(us)
        again = wait_for_result(live)
        stats = live.stats()
    assert error is not None and "does not overlap" in error
    assert again is not None and stats["frames_completed"] == 2
    assert "cpu" in stats["device"] and "service at 127.0.0.1" in stats["device"]
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.field_lps()),
                               sitk.GetArrayFromImage(fields.displacement_to_lps_image(direct.disp_ijk, direct.grid)),
                               atol=1e-4)
    # the service read the US's geometry as float32 (OpenIGTLink): its network saw a grid 1e-5 mm off
    np.testing.assert_allclose(result.rigid_to_parent_ras, msgs.rigid_to_parent_ras(direct.rigid_transform()), atol=1e-4)
    # the field stays as it came off the wire (RAS float32, the form MRML takes) until it is shown
    assert result.field_ras.dtype == np.float32 and result.field_grid.same_grid(direct.grid)
    assert result.warped.same_grid(direct.grid)
    # uint8 rounding of two float runs may differ by one grey level
    np.testing.assert_allclose(result.warped.array, msgs.intensity_to_uint8(direct.warped), atol=1)
    assert result.latency_s > 0 and "timings_s" in result.report


def test_service_mode_refuses_a_missing_service_clearly():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers there
        with pytest.raises(InputError, match="deepnav fusion serve"):
            RemoteRegistration("127.0.0.1", port, timeout_s=1.0)


def test_background_task_reports_progress_and_cancels():
    def work(progress, cancel):
        for step in range(1000):
            progress(step / 1000, f"step {step}")
            cancel.raise_if_cancelled()
            time.sleep(0.005)
        return "finished"

    task = BackgroundTask(work)
    time.sleep(0.1)
    assert 0 < task.fraction < 1 and task.message.startswith("step")
    task.cancel()
    with pytest.raises(Cancelled):
        task.result(timeout=5)
    assert task.done
    assert BackgroundTask(lambda progress, cancel: 42).result(timeout=5) == 42
