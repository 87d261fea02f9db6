"""`--precision bf16` (deepnav.torch_runtime.autocast): one option, spelt the same by every
command that runs a network; bf16 inference of each shipped network stays close to fp32, and the
MR-US registration's geometry (rigid matrix, fields, written transform) stays fp32/fp64.

Tolerances, from the benchmark (benchmarks/mixed_precision.py) with margin: the fusion field
within 0.25 mm of fp32's (measured at most 0.065 mm on 3 unseen phantoms), the liver network's
class per voxel the same for >= 99% of a 96^3 window (the two precisions' lesion masks had Dice
0.998 with each other on 2 simulated studies), the fetal HC within 0.5 mm (measured at most
0.067 mm on 24 HC18 validation images). Each test also checks that bf16 did run (the outputs
are not fp32's bit for bit): a precision option that changed nothing would pass otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepnav.cli import build_parser
from deepnav.command_line import commands
from deepnav.errors import InputError
from deepnav.torch_runtime import PRECISIONS, autocast, forward_in

FIELD_TOLERANCE_MM = 0.25
LIVER_AGREEMENT = 0.99
HC_TOLERANCE_MM = 0.5


def test_every_command_that_takes_a_device_takes_the_same_precision_option():
    checked = 0
    for path, parser in commands(build_parser()):
        options = {s: a for a in parser._actions for s in a.option_strings}
        if "--device" not in options:
            assert "--precision" not in options, path
            continue
        precision = options["--precision"]
        assert tuple(precision.choices) == PRECISIONS and precision.default == "fp32", path
        checked += 1
    assert checked >= 12  # fusion train/register/serve/demo/bench-stream/evaluate, liver 3, fetal 3


def test_autocast_is_bf16_inside_and_forward_in_gives_fp32_back():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    out = forward_in("bf16", layer, x)
    assert out.dtype == torch.float32 and not torch.equal(out, layer(x))
    torch.testing.assert_close(out, layer(x), atol=0.05, rtol=0.02)
    with pytest.raises(InputError, match="unknown precision"):
        autocast("fp16", "cpu")


@pytest.fixture(scope="module")
def fusion_pair(patient):
    from MRUSFusionLib.preprocess import prepare_pair

    frame = patient.frames[0]
    return prepare_pair(patient.mr, frame.image, liver=patient.liver, mr_vessels=patient.vessels, us_vessels=frame.vessels)


def test_fusion_bf16_networks_leave_the_geometry_in_fp32_and_close_to_fp32(fusion_pair, shipped_model, tmp_path):
    from MRUSFusionLib.model_io import load_model
    from MRUSFusionLib.registration import register_pair

    bf16 = load_model(None, "cpu", "bf16")
    fixed, moving = (torch.from_numpy(a)[None, None] for a in (fusion_pair.fixed, fusion_pair.moving))
    out16, out32 = bf16(fixed, moving), shipped_model(fixed, moving)
    # warped US, composed field, rigid matrix, B-spline field: computed in fp32, not cast back afterwards
    assert [o.dtype for o in out16] == [torch.float32] * 4
    gap = (out16[1] - out32[1]).norm(dim=1)  # voxels of the 1 mm grid
    assert 0 < float(gap.max()) < FIELD_TOLERANCE_MM
    matrix_gap = (out16[2] - out32[2]).abs()  # rigid matrix: rotation part, then shift (voxels)
    assert float(matrix_gap[..., :3].max()) < 1e-3 and float(matrix_gap[..., 3].max()) < FIELD_TOLERANCE_MM
    # the written transforms: the field image in floating point, the same as fp32's within the tolerance
    written = {p: register_pair(m, fusion_pair).write(tmp_path / p) for p, m in (("bf16", bf16), ("fp32", shipped_model))}
    fields = {p: sitk.ReadImage(str(paths["field"])) for p, paths in written.items()}
    assert fields["bf16"].GetPixelID() in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    assert fields["bf16"].GetPixelID() == fields["fp32"].GetPixelID()
    a, b = (sitk.GetArrayFromImage(f) for f in (fields["bf16"], fields["fp32"]))
    assert 0 < np.linalg.norm(a - b, axis=-1).max() < FIELD_TOLERANCE_MM


def test_a_scripted_cascade_runs_in_fp32_whatever_its_networks_were_set_to(fusion_pair, shipped_model):
    """TorchScript cannot switch autocast by an attribute: a model saved from a bf16-trained
    cascade computes in fp32, as the file's loader expects."""
    cascade = shipped_model.eager().eval().set_precision("bf16")
    scripted = torch.jit.script(cascade)
    fixed, moving = (torch.from_numpy(a)[None, None] for a in (fusion_pair.fixed, fusion_pair.moving))
    with torch.no_grad():
        eager32 = cascade.set_precision("fp32")(fixed, moving)[1]
        assert torch.equal(scripted(fixed, moving)[1], eager32)


def test_liver_bf16_logits_give_the_fp32_classes():
    from LiverLesionSegLib.abdomen import synthetic_abdomen
    from LiverLesionSegLib.inference import ROI
    from LiverLesionSegLib.model_io import SHIPPED_MODEL, load_model
    from LiverLesionSegLib.simulator import simulate_case

    case = simulate_case(synthetic_abdomen(7), 7, phases=("arterial", "venous"), spacing=(1.5, 1.5, 1.5), motion=(0.0, 0.0),
                         lesions=(2, 2))
    models = {p: load_model(SHIPPED_MODEL, "cpu", precision=p) for p in PRECISIONS}
    normalised = models["fp32"].normalisation.apply({p: v.array.astype(np.float32) for p, v in case.phases.items()})
    k, j, i = (int(c) for c in np.mean(np.nonzero(case.liver.array), axis=1))  # a window on the liver
    starts = [min(max(c - ROI // 2, 0), n - ROI) for c, n in zip((k, j, i), normalised.shape[1:], strict=True)]
    window = normalised[:, starts[0]:starts[0] + ROI, starts[1]:starts[1] + ROI, starts[2]:starts[2] + ROI]
    x = torch.from_numpy(np.ascontiguousarray(window))[None]
    with torch.no_grad():
        logits = {p: m(x) for p, m in models.items()}
    assert logits["bf16"].dtype == torch.float32 and not torch.equal(logits["bf16"], logits["fp32"])
    classes = {p: v.argmax(1) for p, v in logits.items()}
    assert int((classes["fp32"] > 0).sum()) > 0.05 * classes["fp32"].numel()  # the window shows liver
    assert float((classes["bf16"] == classes["fp32"]).float().mean()) >= LIVER_AGREEMENT


def test_fetal_bf16_measures_the_fp32_head_circumference():
    from FetalBiometryLib.hc18 import read_pixel_sizes
    from FetalBiometryLib.image_io import read_image_2d
    from FetalBiometryLib.pipeline import measure_image
    from FetalBiometryLib.segment import SHIPPED_MODEL, HeadSegmenter
    from test_fetal_shipped_model import CSV, SAMPLES

    segmenters = {p: HeadSegmenter.load(SHIPPED_MODEL, "cpu", p) for p in PRECISIONS}
    for name, (pixel_mm, _) in sorted(read_pixel_sizes(CSV).items())[:2]:
        pixels = read_image_2d(SAMPLES / name).pixels
        probability = {p: s.probability(pixels) for p, s in segmenters.items()}
        assert probability["bf16"].dtype == np.float32 and not np.array_equal(probability["bf16"], probability["fp32"])
        hc = {p: measure_image(s, pixels, pixel_mm).measurement.hc_mm for p, s in segmenters.items()}
        assert abs(hc["bf16"] - hc["fp32"]) < HC_TOLERANCE_MM, (name, hc)


def test_bf16_training_follows_fp32_training_with_fp32_weights(tmp_path):
    """The fetal trainer (2 epochs on 8 small images) in bf16 and in fp32 from the same seed:
    fp32 weights and batch-norm statistics come out, the losses follow fp32's within 2% (bf16
    keeps 8 bits of mantissa; measured 0.1-0.3%), and they are not fp32's bit for bit."""
    from FetalBiometryLib.hc18 import find_cases, split_by_subject
    from FetalBiometryLib.training import TrainConfig, train
    from test_fetal_biometry import write_hc18_like

    from deepnav.progress import silent

    write_hc18_like(tmp_path / "data", 8, np.random.default_rng(6))
    train_cases, val_cases = split_by_subject(find_cases(tmp_path / "data"), 0.34, seed=0)
    runs = {}
    for precision in PRECISIONS:
        model, info = train(train_cases, val_cases, tmp_path / precision, TrainConfig(epochs=2, batch=2, width=4),
                            progress=silent, precision=precision)
        assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
        runs[precision] = [row["loss"] for row in info["history"]]
    assert runs["bf16"] != runs["fp32"]
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=0.02)
