"""The shipped model registers an unseen synthetic patient, and its exported transform is the
network's warp: SimpleITK resampling the original US through transform.h5 gives the same image."""

import numpy as np
import pytest

from MRUSFusionLib.fields import resample_with
from MRUSFusionLib.registration import register


@pytest.fixture(scope="module")
def result(patient, shipped_model):
    frame = patient.frames[-1]  # end of the half breathing cycle: the largest deformation
    return register(shipped_model, patient.mr, frame.image, liver=patient.liver), frame


def test_shipped_model_reduces_landmark_error(patient, result):
    reg, frame = result
    before = np.linalg.norm(patient.landmarks_lps - frame.landmarks_lps, axis=1)
    after = np.linalg.norm(reg.map_points_lps(patient.landmarks_lps) - frame.landmarks_lps, axis=1)
    assert np.median(after) < 0.6 * np.median(before)
    assert reg.folding_percent() < 0.1


def test_written_transform_reproduces_the_networks_warp_on_the_original_us(result, tmp_path):
    reg, frame = result
    paths = reg.write(tmp_path)
    import SimpleITK as sitk

    for key in ("composite", "field"):
        transform = sitk.ReadTransform(str(paths["composite"])) if key == "composite" else \
            sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(paths["field"])), sitk.sitkVectorFloat64))
        resampled = resample_with(transform, frame.image.with_array(frame.image.array.astype(np.float32)), reg.grid)
        inside = (reg.pair.fov > 0) & (resampled > 0)
        # the network warps the normalised US in the grid; compare shapes, not units: correlation
        corr = np.corrcoef(resampled[inside], reg.warped[inside])[0, 1]
        assert corr > 0.95, key


def test_quality_figures_show_improvement(result):
    q = result[0].quality()
    assert q["mind_after"] < q["mind_before"]
