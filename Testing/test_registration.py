"""An initial alignment (e.g. from paired fiducials) is folded into every transform written."""

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MRUSFusionLib.fields import displacement_transform
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.networks import Cascade
from MRUSFusionLib.registration import register


def test_with_an_identity_network_the_result_is_the_initial_transform(patient, tmp_path):
    identity_net = LoadedModel(Cascade().eval(), {}, torch.device("cpu"), Path("identity"))  # zero heads
    initial = sitk.Euler3DTransform((-50.0, 0.0, 0.0), 0.05, -0.03, 0.08, (3.0, -2.0, 4.0))
    result = register(identity_net, patient.mr, patient.frames[0].image, liver=patient.liver, initial=initial,
                      correct=False)
    paths = result.write(tmp_path)
    points = result.grid.index_to_lps(np.array([[10, 20, 30], [64, 64, 64], [100, 90, 80]]))
    expected = np.array([initial.TransformPoint(tuple(p)) for p in points])
    field = displacement_transform(sitk.ReadImage(str(paths["field"])))
    for transform in (sitk.ReadTransform(str(paths["rigid"])), sitk.ReadTransform(str(paths["composite"])), field):
        got = np.array([transform.TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(got, expected, atol=1e-3)
