"""LiverLesionSeg says when a result cannot be trusted: the plausibility verdict passes a true liver
and its lesions in every phase, and fails a "liver" that runs the length of the body, lesions in
bone or fat, and a plain series named a contrast phase; `deepnav liver segment` writes such a
result with "reliable": false and its reasons and exits with its own status."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from LiverLesionSegLib.abdomen import synthetic_abdomen
from LiverLesionSegLib.plausibility import EXIT_UNRELIABLE, LIVER_HU, LIVER_MAX_EXTENT_MM, assess, slab_warning
from LiverLesionSegLib.simulator import PHASES, simulate_case
from LiverLesionSegLib.statistics import lesion_statistics
from scipy import ndimage
from torch import nn

from deepnav.imaging import Volume, write_volume


@pytest.fixture(scope="module")
def study():
    """A simulated four-phase study whose phases are not moved (all on the reference grid), on a
    synthetic abdomen 90 mm taller than its liver (a whole-abdomen series)."""
    abdomen = synthetic_abdomen(3, below_mm=90.0)
    return simulate_case(abdomen, 3, phases=PHASES, field="ct", spacing=(3.0, 3.0, 3.0), motion=(0.0, 0.0))


def _verdict(study, liver: np.ndarray, lesions: np.ndarray, phases=PHASES):
    grid = study.liver
    hu = {p: study.phases[p].array.astype(np.float32) for p in phases}
    return assess(liver, lesions, grid, hu, lesion_statistics(lesions, grid, hu))


def test_the_true_liver_and_lesions_are_plausible_in_every_phase(study):
    verdict = _verdict(study, study.liver.array, study.lesions.array)
    assert verdict.reliable, verdict.reasons
    figures = verdict.figures
    assert 700 < figures["liver_volume_ml"] < 3000 and figures["liver_whole_in_series"]
    assert figures["liver_extent_mm"] < LIVER_MAX_EXTENT_MM
    assert all(LIVER_HU[p][0] <= figures["liver_mean_hu"][p] <= LIVER_HU[p][1] for p in PHASES)
    assert figures["lesion_count"] == len(study.lesion_list) > 0


def test_a_liver_down_the_whole_body_with_lesions_in_bone_and_fat_is_not_reliable(study):
    plain = study.phases["plain"].array
    body_soft = plain > -30  # muscle, organs, spine: what a lost network calls liver
    lesions = np.zeros(plain.shape, np.uint16)
    lesions[plain > 300] = 1  # the spine
    k, j, i = np.argwhere(ndimage.binary_erosion((plain < -60) & (plain > -200), iterations=3))[0]
    lesions[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 2  # a cube of fat
    verdict = _verdict(study, body_soft | (lesions > 0), lesions)
    assert not verdict.reliable
    text = "\n".join(verdict.reasons)
    assert "spans" in text and "mL" in text  # extent and volume beyond a liver's
    assert "(bone" in text and "(fat?)" in text  # lesions' HU outside what a phase allows
    assert verdict.figures["liver_extent_mm"] > LIVER_MAX_EXTENT_MM


def test_an_unenhanced_series_named_portal_venous_is_caught_by_the_livers_hu(study):
    """The true liver, but the plain phase's voxels given as the venous phase."""
    grid = study.liver
    hu = {"venous": study.phases["plain"].array.astype(np.float32)}
    verdict = assess(study.liver.array, np.zeros_like(study.lesions.array), grid, hu, [])
    assert not verdict.reliable
    assert any("venous" in r and "unenhanced" in r for r in verdict.reasons)


def test_a_localiser_that_keeps_the_whole_series_is_a_warning():
    assert "whole series" in slab_warning((0, 200, 200))
    assert slab_warning((40, 150, 200)) is None and slab_warning(None) is None


def test_segment_writes_an_implausible_result_as_not_reliable_and_exits_with_its_status(study, tmp_path, capsys):
    """A stand-in network that calls all soft tissue liver (as the shipped one did on a real plain
    CT named venous): the command still writes its result, says it is not reliable and why, and
    exits with EXIT_UNRELIABLE, not 0."""
    from test_liver_pipeline import VenousThreshold, threshold_model

    from deepnav import model_files
    from deepnav.cli import main

    model = threshold_model(tmp_path)
    soft_tissue = (20.0 - 100) / 50  # the stand-in's normalisation: mean 100, sd 50 HU
    model_files.save_torchscript(VenousThreshold(-9.0, -8.0, soft_tissue), model.path, model.record)
    plain = Volume.from_sitk(study.phases["plain"].to_sitk()[30:80, 25:65, :])  # full height, less width: fast
    venous = write_volume(plain, tmp_path / "plain_named_venous.nrrd")
    status = main(["liver", "segment", "--phase", f"venous={venous}", "--model", str(model.path), "--device", "cpu",
                   "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "lesions.json").read_text())
    assert status == EXIT_UNRELIABLE != 0
    assert record["reliable"] is False and record["reasons"]
    assert record["plausibility"]["liver_extent_mm"] > LIVER_MAX_EXTENT_MM
    out = capsys.readouterr().out
    assert all(f"not reliable: {r}" in out for r in record["reasons"]) and "NOT RELIABLE" in out


class VenousBand(nn.Module):
    """A stand-in localiser with a known answer: liver where the (normalised) venous phase is in a
    band, the portal venous liver's and the spleen's (the largest piece is the liver)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        liver = ((x[:, 2:3] > self.low) & (x[:, 2:3] < self.high)).float()
        # an opening cuts the thin rims in the band where brighter organs fade into fat
        liver = nn.functional.max_pool3d(-nn.functional.max_pool3d(-liver, 5, 1, 2), 5, 1, 2)
        return torch.cat([1 - liver, liver, 0 * liver], dim=1) * 10


def test_on_a_whole_abdomen_the_liver_is_kept_near_where_the_localiser_finds_it(study, tmp_path):
    """A lesion network that calls every soft tissue liver (as the shipped one did on a real plain
    whole abdomen) runs on a 270 mm series after a localiser that finds the liver: the liver found
    is the liver (and NEAR_LIVER_MM around it), not the body, and the result is plausible."""
    from LiverLesionSegLib.model_io import load_model
    from LiverLesionSegLib.pipeline import LOCALISE_ABOVE_MM, NEAR_LIVER_MM, segment_study
    from test_liver_pipeline import VenousThreshold, threshold_model

    from deepnav import model_files

    record = threshold_model(tmp_path).record  # normalisation: mean 100, sd 50 HU
    scale = lambda hu: (hu - 100.0) / 50.0  # noqa: E731
    lesion_path, localiser_path = tmp_path / "everything.pt", tmp_path / "band.pt"
    model_files.save_torchscript(VenousThreshold(-9.0, -8.0, scale(20.0)), lesion_path, record)
    model_files.save_torchscript(VenousBand(scale(85.0), scale(140.0)), localiser_path, record)
    venous = study.phases["venous"]
    assert venous.array.shape[0] * venous.spacing[2] > LOCALISE_ABOVE_MM
    result = segment_study(load_model(lesion_path, "cpu", localiser=localiser_path), {"venous": venous})
    truth, found = study.liver.array > 0, result.liver.array > 0
    distance = ndimage.distance_transform_edt(~truth, sampling=venous.spacing[::-1])
    assert np.mean(distance[found] <= NEAR_LIVER_MM + venous.spacing.max()) > 0.99  # nothing far from the liver
    assert (found & truth).sum() > 0.95 * truth.sum()  # and the liver itself kept
    assert result.plausibility.reliable, result.plausibility.reasons
