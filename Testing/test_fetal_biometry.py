"""FetalBiometry: ellipse geometry, crops and fusion, measurement, de-identification, image IO,
scoring and training, on synthetic images made here (HC18 itself is for benchmarks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from FetalBiometryLib import crops
from FetalBiometryLib.deidentify import deidentify
from FetalBiometryLib.ellipse import Ellipse, fit_ellipse
from FetalBiometryLib.evaluation import score_case
from FetalBiometryLib.hc18 import find_cases, reference_ellipse, split_by_subject
from FetalBiometryLib.image_io import check_pixel_size, read_image_2d
from FetalBiometryLib.measure import measure
from FetalBiometryLib.pipeline import measure_image
from scipy import integrate, ndimage

from deepnav.errors import InputError

HEAD = Ellipse(400.0, 260.0, 180.0, 140.0, 0.4)


def soft_probability(ellipse: Ellipse, shape, edge_px: float = 1.5) -> np.ndarray:
    """A smooth probability that is 0.5 exactly on the ellipse (signed distance, logistic)."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    c, s = math.cos(ellipse.angle), math.sin(ellipse.angle)
    u, v = (x - ellipse.cx) * c + (y - ellipse.cy) * s, -(x - ellipse.cx) * s + (y - ellipse.cy) * c
    r = np.sqrt((u / ellipse.a) ** 2 + (v / ellipse.b) ** 2)
    approx_distance = (1 - r) * min(ellipse.a, ellipse.b)
    return (1 / (1 + np.exp(-approx_distance / edge_px))).astype(np.float32)


def arc_length(e: Ellipse) -> float:
    """The ellipse's perimeter by numerical integration of its arc length: the reference for
    Ellipse.perimeter (Ramanujan's formula) and for every HC expected below, so that no expected
    value is computed by the code under test."""
    return integrate.quad(lambda t: math.hypot(e.a * math.sin(t), e.b * math.cos(t)), 0, 2 * math.pi)[0]


@pytest.mark.parametrize("a,b", [(100.0, 60.0), (180.0, 140.0), (60.0, 100.0), (100.0, 50.0), (5.0, 5.0)])  # head-like shapes
def test_ramanujan_perimeter_matches_the_integral(a, b):
    e = Ellipse(0, 0, a, b, 0.7)
    assert e.perimeter() == pytest.approx(arc_length(e), rel=1e-8)


def test_fit_recovers_a_noisy_ellipse():
    points = HEAD.outline(400) + np.random.default_rng(0).normal(0, 0.5, (400, 2))
    fit = fit_ellipse(points)
    assert (fit.cx, fit.cy, fit.a, fit.b) == pytest.approx((HEAD.cx, HEAD.cy, HEAD.a, HEAD.b), abs=0.3)
    assert fit.angle == pytest.approx(HEAD.angle, abs=0.01)
    assert fit.filled((520, 800)).sum() == pytest.approx(math.pi * HEAD.a * HEAD.b, rel=0.01)
    assert fit_ellipse(np.zeros((3, 2))) is None


def test_crop_layout_keeps_the_aspect_ratio_and_covers_the_image():
    layout = crops.layout_for((540, 800))
    assert layout.work_hw[0] / layout.work_hw[1] == pytest.approx(540 / 800, abs=0.01)
    assert layout.crop_hw[0] <= crops.CANVAS_HW[0] and layout.crop_hw[1] <= crops.CANVAS_HW[1]
    work = torch.rand(1, 1, *layout.work_hw)
    batch = crops.crops_of(work, layout)
    assert batch.shape == (4, 1, *crops.CANVAS_HW)
    # every pixel is seen by at least one crop, and fusing the crops gives the image back
    torch.testing.assert_close(crops.fuse(batch, layout), work[0, 0])


def test_fused_map_returns_to_the_original_grid_without_shift():
    """A probability computed at working resolution and brought back lands where it was."""
    shape = (540, 800)
    layout = crops.layout_for(shape)
    prob = torch.from_numpy(soft_probability(HEAD, shape, edge_px=4))[None, None]
    back = crops.to_original(crops.to_working(prob, layout)[0, 0], layout)
    m = measure(back, 0.1)
    assert (m.ellipse_px.cx, m.ellipse_px.cy) == pytest.approx((HEAD.cx, HEAD.cy), abs=0.3)
    assert m.hc_mm == pytest.approx(arc_length(HEAD) * 0.1, rel=0.003)


def test_mirrored_crops_keep_their_padding_and_undo_themselves():
    layout = crops.layout_for((540, 800))
    batch = crops.crops_of(torch.rand(1, 1, *layout.work_hw), layout)
    h, w = layout.crop_hw
    flipped = crops.mirrored(batch, layout)
    assert torch.equal(flipped[..., :h, 0], batch[..., :h, w - 1])  # the crop's own columns swap ends
    assert not flipped[..., :, w:].any() and not flipped[..., h:, :].any()  # the padding stays right and bottom
    assert torch.equal(crops.mirrored(flipped, layout), batch)


def test_a_mirrored_image_gets_the_mirrored_probability():
    """With each crop averaged with its mirror image, any network (here one random, lopsided
    convolution) gives a mirrored image the mirror of the image's head map: no left-right
    preference is left, and the crops and their mirrors are put back where they came from."""
    from FetalBiometryLib.segment import HeadSegmenter

    torch.manual_seed(0)
    segmenter = HeadSegmenter.from_module(torch.nn.Conv2d(1, 1, 7, padding=3))
    image = np.random.default_rng(1).uniform(0, 255, (270, 400)).astype(np.float32)
    flipped = image[:, ::-1].copy()
    np.testing.assert_allclose(segmenter.probability(flipped), segmenter.probability(image)[:, ::-1], atol=1e-5)
    plain = np.abs(segmenter.probability(flipped, mirror=False) - segmenter.probability(image, mirror=False)[:, ::-1])
    assert plain.max() > 0.05  # without the mirror the network's lopsidedness shows


def test_the_ellipse_follows_the_sharp_edge_where_part_of_the_outline_is_blurred():
    """Where the skull is shadowed the network's edge is blurred and its 0.5 level wanders off;
    the fit keeps to the sharp part of the outline."""
    shape, pixel_mm = (540, 800), 0.1
    sharp = soft_probability(HEAD, shape, edge_px=1.0)
    # a sixth of the outline (right of the head) blurred and pushed out by 8 px: a shadowed sector
    bulge = Ellipse(HEAD.cx, HEAD.cy, HEAD.a + 8, HEAD.b + 8, HEAD.angle)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    sector = np.abs(np.angle((x - HEAD.cx) + 1j * (y - HEAD.cy))) < math.pi / 6
    probability = np.where(sector, soft_probability(bulge, shape, edge_px=6.0), sharp)
    fitted = measure(probability, pixel_mm)
    everything = measure(probability, pixel_mm, edge_sharpness=0.0)
    truth = arc_length(HEAD) * pixel_mm
    assert abs(fitted.hc_mm - truth) < 0.3 * abs(everything.hc_mm - truth)
    assert fitted.hc_mm == pytest.approx(truth, abs=0.5)
    # on a clean outline the choice changes nothing
    assert measure(sharp, pixel_mm).hc_mm == pytest.approx(measure(sharp, pixel_mm, edge_sharpness=0.0).hc_mm, abs=0.05)


def test_measurement_of_a_known_head():
    pixel_mm = 0.12
    m = measure(soft_probability(HEAD, (540, 800)), pixel_mm)
    assert m.hc_mm == pytest.approx(arc_length(HEAD) * pixel_mm, rel=0.002)
    assert (m.ofd_mm, m.bpd_mm) == pytest.approx((2 * HEAD.a * pixel_mm, 2 * HEAD.b * pixel_mm), rel=0.005)
    assert m.contour_length_mm == pytest.approx(m.hc_mm, rel=0.01)
    # the spec's pixel count over-estimates a smooth perimeter (4/pi for a 4-connected chain)
    assert 1.15 < m.pixel_count_hc_mm / m.hc_mm < 1.35
    assert m.confident and not m.flags


def test_head_cut_by_the_border_is_flagged_and_nothing_is_made_up():
    cut = Ellipse(120.0, 260.0, 180.0, 140.0, 0.0)
    m = measure(soft_probability(cut, (540, 800)), 0.1)
    assert any("border" in f for f in m.flags) and not m.confident
    empty = measure(np.zeros((540, 800), np.float32), 0.1)
    assert empty.hc_mm is None and "no fetal head" in empty.reason


def test_burned_in_text_is_removed_and_the_skull_kept():
    rng = np.random.default_rng(1)
    image = rng.uniform(40, 90, (540, 800)).astype(np.float32)
    image[:40] = 0  # the dark margin scanners write on
    skull = ndimage.binary_dilation(HEAD.filled((540, 800))) & ~ndimage.binary_erosion(HEAD.filled((540, 800)), iterations=4)
    image[skull] = 230
    text = np.zeros_like(image, bool)
    for k in range(12):  # a line of glyphs: "DOE^JANE 1984"
        text[10:22, 30 + 14 * k:38 + 14 * k] = True
    image[text] = 250
    cut = Ellipse(30.0, 300.0, 60.0, 40.0, 0.0)  # a bright structure reaching in from the left border
    ring = ndimage.binary_dilation(cut.filled((540, 800))) & ~cut.filled((540, 800))
    image[ring] = 240
    clean, blanked = deidentify(image)
    assert np.all(clean[text] == 0) and blanked >= text.sum()
    np.testing.assert_array_equal(clean[skull], image[skull])
    np.testing.assert_array_equal(clean[ring], image[ring])


def test_image_reading(tmp_path):
    grey = (np.random.default_rng(2).uniform(0, 255, (60, 80))).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, -1), isVector=True), str(tmp_path / "grey_rgb.png"))
    read = read_image_2d(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read.pixels, grey)
    assert read.notes == []  # grey stored as RGB is grey: no "converted to luminance" note
    colour = np.stack([grey, grey // 2, grey // 3], -1).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "colour.png"))
    assert "luminance" in read_image_2d(tmp_path / "colour.png").notes[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 4)), str(tmp_path / "cine.nrrd"))
    with pytest.raises(InputError, match="4 frames"):
        read_image_2d(tmp_path / "cine.nrrd")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        read_image_2d(tmp_path / "not_an_image.png")
    for bad in (None, 0.0, -0.1, 5.0, float("nan")):
        with pytest.raises(InputError):
            check_pixel_size(bad, "x.png")
    assert check_pixel_size(0.1, "x.png") == 0.1


def test_dicom_pixel_spacing_is_read(tmp_path):
    image = sitk.GetImageFromArray((np.random.default_rng(3).uniform(0, 255, (64, 96))).astype(np.uint8))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image.SetMetaData("0028|0030", "0.137\\0.137")
    image.SetMetaData("0008|0060", "US")
    writer.SetFileName(str(tmp_path / "frame.dcm"))
    writer.Execute(image)
    assert read_image_2d(tmp_path / "frame.dcm").pixel_mm == pytest.approx(0.137)


class OracleSegmenter:
    """Returns a given probability map: isolates the scoring from the network."""

    device = torch.device("cpu")

    def __init__(self, probability):
        self.probability_map = probability

    def probability(self, pixels):
        return self.probability_map


def write_hc18_like(folder, n: int, rng) -> dict[str, Ellipse]:
    """n synthetic HC18-style images: a bright ring on speckle, its outline annotation, a CSV."""
    (folder / "training_set").mkdir(parents=True)
    rows, truths = ["filename,pixel size(mm),head circumference (mm)"], {}
    for k in range(n):
        e = Ellipse(rng.uniform(300, 500), rng.uniform(220, 320), rng.uniform(120, 190), rng.uniform(90, 120),
                    rng.uniform(0, math.pi))
        filled = e.filled((540, 800))
        image = rng.uniform(20, 70, (540, 800))
        image[filled] = rng.uniform(50, 110, int(filled.sum()))
        image[ndimage.binary_dilation(filled, iterations=5) & ~filled] = 220
        outline = filled & ~ndimage.binary_erosion(filled)
        name = f"{k // 2:03d}_{'2' if k % 2 else ''}HC.png"
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.uint8)), str(folder / "training_set" / name))
        sitk.WriteImage(sitk.GetImageFromArray((outline * 255).astype(np.uint8)),
                        str(folder / "training_set" / name.replace(".png", "_Annotation.png")))
        pixel = rng.uniform(0.08, 0.2)
        rows.append(f"{name},{pixel},{arc_length(e) * pixel:.2f}")
        truths[name] = e
    (folder / "training_set_pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    return truths


def test_hc18_reading_split_and_scoring(tmp_path):
    truths = write_hc18_like(tmp_path, 8, np.random.default_rng(4))
    cases = find_cases(tmp_path)
    assert len(cases) == 8
    train, val = split_by_subject(cases, 0.25, seed=0)
    assert not {c.subject for c in train} & {c.subject for c in val} and len(val) == 2
    ref = reference_ellipse(cases[0].annotation)
    assert ref.perimeter() * cases[0].pixel_mm == pytest.approx(cases[0].hc_mm, abs=0.5)
    row = score_case(OracleSegmenter(soft_probability(truths[cases[0].image.name], (540, 800))), cases[0])
    assert abs(row["hc_diff_mm"]) < 0.5 and row["dice"] > 0.99 and row["hausdorff_mm"] < 0.3
    assert row["pixel_count_hc_diff_mm"] > 0.1 * row["hc_ref_mm"]  # the spec's method over-estimates


def test_blank_and_broken_images_are_not_measured():
    segmenter = OracleSegmenter(np.zeros((540, 800), np.float32))
    with pytest.raises(InputError, match="blank"):
        measure_image(segmenter, np.full((540, 800), 17.0, np.float32), 0.1)
    with pytest.raises(InputError, match="NaN"):
        measure_image(segmenter, np.full((540, 800), np.nan, np.float32), 0.1)
    noise = np.random.default_rng(5).uniform(0, 255, (540, 800)).astype(np.float32)
    assert measure_image(segmenter, noise, 0.1).measurement.hc_mm is None


def test_training_runs_resumes_and_records_its_split(tmp_path):
    from FetalBiometryLib.segment import HeadSegmenter
    from FetalBiometryLib.training import TrainConfig, train

    write_hc18_like(tmp_path / "data", 6, np.random.default_rng(6))
    cases = find_cases(tmp_path / "data")
    train_cases, val_cases = split_by_subject(cases, 0.34, seed=0)
    config = TrainConfig(epochs=1, batch=2, width=4)
    train(train_cases, val_cases, tmp_path / "run", config, progress=lambda *a: None)
    config.epochs = 2
    _, info = train(train_cases, val_cases, tmp_path / "run", config, resume=True, progress=lambda *a: None,
                    metadata={"split": {"validation_subjects": sorted({c.subject for c in val_cases})}})
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    loaded = HeadSegmenter.load(info["model"], "cpu")
    assert loaded.metadata["split"]["validation_subjects"] and loaded.metadata["config"]["width"] == 4
    assert loaded.probability(np.zeros((540, 800), np.float32)).shape == (540, 800)


def test_warm_restarts_cycle_the_learning_rate_from_full_to_nothing():
    from FetalBiometryLib.training import cosine_factor

    total = 300
    one = [cosine_factor(s, total) for s in range(total)]
    assert one[0] == 1.0 and one[150] == pytest.approx(0.5) and one[-1] < 1e-3  # the single cosine, as before
    assert np.all(np.diff(one) <= 0)
    three = [cosine_factor(s, total, 3) for s in range(total)]
    assert [three[s] for s in (0, 100, 200)] == [1.0, 1.0, 1.0]  # each cycle restarts at the full rate
    assert max(three[99], three[199], three[299]) < 1e-3 and three[50] == pytest.approx(0.5)
    assert cosine_factor(total, total, 3) == 0.0


def test_the_boundary_term_weighs_an_error_at_the_edge_more_than_one_inside():
    from FetalBiometryLib.training import boundary_band, loss_fn

    y, x = np.mgrid[0:64, 0:64]
    target = torch.from_numpy(((x - 32) ** 2 + (y - 32) ** 2 < 20 ** 2).astype(np.float32))[None, None]
    band = boundary_band(target, 3)
    distance = np.abs(np.hypot(x - 32, y - 32) - 20)
    assert band[0, 0][torch.from_numpy(distance < 1.5)].min() == 1  # along the edge
    assert band[0, 0][torch.from_numpy(distance > 5)].max() == 0  # deep inside and far out
    logits = (target * 2 - 1) * 6
    at_edge, inside = logits.clone(), logits.clone()
    ring = torch.from_numpy((distance < 1.0) & (np.hypot(x - 32, y - 32) < 20))[None, None]
    at_edge[ring] = -6  # the same number of wrong pixels, on the edge's inner side ...
    middle = np.flatnonzero(np.hypot(x - 32, y - 32) < 12)[: int(ring.sum())]
    deep = torch.zeros(64 * 64, dtype=torch.bool)
    deep[middle] = True
    deep = deep.view(1, 1, 64, 64)
    inside[deep] = -6  # ... or in the middle
    assert int(ring.sum()) == int(deep.sum()) > 50
    plain = loss_fn(at_edge, target) / loss_fn(inside, target)
    weighted = loss_fn(at_edge, target, 3.0, 3) / loss_fn(inside, target, 3.0, 3)
    assert plain == pytest.approx(1.0, rel=0.05) and weighted > 1.5 * plain


def test_fine_tuning_starts_from_a_model_keeps_the_last_epoch_and_saves_each_cycle(tmp_path):
    from FetalBiometryLib.network import HeadNet
    from FetalBiometryLib.segment import HeadSegmenter, save
    from FetalBiometryLib.training import TrainConfig, train

    write_hc18_like(tmp_path / "data", 6, np.random.default_rng(7))
    train_cases, val_cases = split_by_subject(find_cases(tmp_path / "data"), 0.34, seed=0)
    torch.manual_seed(3)
    start = save(HeadNet(4).eval(), tmp_path / "start.pt")
    config = TrainConfig(epochs=2, batch=2, width=4, lr=0.0, init=str(start), restarts=2, val_every=0, keep="last",
                         boundary_weight=2.0)
    _, info = train(train_cases, val_cases, tmp_path / "run", config, progress=lambda *a: None)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and not any("hc_mae_mm" in h for h in history)  # never validated
    assert info["best"]["epoch"] == 1  # the last epoch, not a choice made on the validation images
    started = HeadSegmenter.load(start, "cpu").module.state_dict()
    for name in ("cycle1.pt", "cycle2.pt", "model.pt"):
        weights = HeadSegmenter.load(tmp_path / "run" / name, "cpu").module.state_dict()
        # learning rate 0: the convolutions are the starting model's (batch-norm statistics move)
        assert all(torch.equal(weights[k], started[k]) for k in weights if k.endswith("0.weight"))


def test_the_working_scale_is_the_models_own_and_an_old_file_keeps_the_default(tmp_path):
    from FetalBiometryLib.network import HeadNet
    from FetalBiometryLib.segment import MODEL_FORMAT, MODEL_VERSION, HeadSegmenter, save
    from FetalBiometryLib.training import TrainConfig, prepare, sample_batch, train

    from deepnav import model_files

    write_hc18_like(tmp_path / "data", 6, np.random.default_rng(8))
    train_cases, val_cases = split_by_subject(find_cases(tmp_path / "data"), 0.34, seed=0)
    start = save(HeadNet(4).eval(), tmp_path / "start.pt")  # trained at the default scale ...
    config = TrainConfig(epochs=1, batch=2, width=4, init=str(start), val_every=0, keep="last", canvas_hw=(64, 96))
    _, info = train(train_cases, val_cases, tmp_path / "run", config, progress=lambda *a: None)
    loaded = HeadSegmenter.load(info["model"], "cpu")  # ... fine-tuned at another (fully convolutional)
    assert loaded.metadata["canvas_hw"] == [64, 96] and loaded.metadata["config"]["canvas_hw"] == [64, 96]
    probabilities, layout = loaded.crop_probabilities(np.zeros((540, 800), np.float32))
    assert probabilities.shape == (4, 1, 64, 96)
    # the image scaled so that a 0.9 crop fits 64x96: f = min(64 / (0.9 * 540), 96 / (0.9 * 800))
    assert layout.work_hw == (71, 105) and layout.crop_hw == (64, 94)
    assert loaded.probability(np.zeros((540, 800), np.float32)).shape == (540, 800)
    x, y = sample_batch([prepare(c, (64, 96)) for c in train_cases], config, np.random.default_rng(0))
    assert x.shape == y.shape == (2, 1, 64, 96)
    with pytest.raises(InputError, match="--canvas 64x96"):  # a checkpoint resumes at its own scale only
        train(train_cases, val_cases, tmp_path / "run", TrainConfig(epochs=2, batch=2, width=4), resume=True,
              progress=lambda *a: None)

    # a model file written before the scale was stored: no canvas_hw, measured at the default 176x256 (800x540 at 284x192)
    old = model_files.save_torchscript(HeadNet(4), tmp_path / "old.pt", {"format": MODEL_FORMAT, "version": MODEL_VERSION,
                                                                         "width": 4, "crop_fraction": crops.Q})
    segmenter = HeadSegmenter.load(old, "cpu")
    probabilities, layout = segmenter.crop_probabilities(np.zeros((540, 800), np.float32))
    assert segmenter.canvas_hw == crops.CANVAS_HW == (176, 256)
    assert probabilities.shape == (4, 1, 176, 256) and layout.work_hw == (192, 284)


@pytest.mark.parametrize("given,expected", [("248x360", (248, 360)), ((176, 256), (176, 256)), ([8, 16], (8, 16))])
def test_a_canvas_is_two_multiples_of_eight(given, expected):
    assert crops.check_canvas(given) == expected


@pytest.mark.parametrize("bad", ["250x360", "248", "0x360", "ax8", (248, 360, 1)])
def test_a_canvas_that_the_network_cannot_take_is_refused(bad):
    with pytest.raises(ValueError, match="canvas"):
        crops.check_canvas(bad)


def test_an_ensemble_is_one_model_file_giving_the_mean_probability(tmp_path):
    from FetalBiometryLib.network import HeadEnsemble, HeadNet
    from FetalBiometryLib.segment import HeadSegmenter, save

    torch.manual_seed(4)
    nets = [HeadNet(4).eval(), HeadNet(4).eval()]
    path = save(HeadEnsemble(nets), tmp_path / "ensemble.pt", {"split": {"validation_subjects": ["1"]}})
    loaded = HeadSegmenter.load(path, "cpu")
    x = torch.rand(2, 1, 176, 256)
    with torch.no_grad():
        expected = (torch.sigmoid(nets[0](x)) + torch.sigmoid(nets[1](x))) / 2
        got = torch.sigmoid(loaded.module(x))
    assert torch.allclose(got, expected, atol=1e-5)
    assert loaded.probability(np.zeros((540, 800), np.float32)).shape == (540, 800)


def _caption(picture: np.ndarray, image_rows: int) -> np.ndarray:
    return picture[image_rows:]


def test_a_rejected_image_shows_why_on_its_picture():
    from FetalBiometryLib.measure import Measurement
    from FetalBiometryLib.overlay import CAPTION_BACKGROUND, VERMILLION, caption_lines, overlay_picture
    from FetalBiometryLib.pipeline import Result

    pixels = np.random.default_rng(0).random((300, 400)).astype(np.float32)
    result = Result(Measurement(None, reason="no fetal head found"), np.zeros_like(pixels), pixels, 0)
    assert caption_lines(result, 0.1, 400)[0] == ("NOT MEASURED: no fetal head found", VERMILLION)
    picture = overlay_picture(result, 0.1)
    caption = _caption(picture, 300)
    first_line = caption[:24].reshape(-1, 3).astype(int)
    # the reason's text is drawn in vermillion over the caption's background
    reddish = (first_line[:, 0] > first_line[:, 2] + 80) & (np.abs(first_line - CAPTION_BACKGROUND).sum(1) > 60)
    assert picture.shape[1] == 400 and reddish.sum() > 100


def test_the_scale_bar_is_a_round_length_at_most_a_quarter_of_the_picture():
    from FetalBiometryLib.overlay import scale_bar_mm

    # 0.1 mm pixels, 800 wide: a quarter is 200 px = 20 mm; 0.25 mm pixels, 540 wide: 135 px = 33.75 mm -> 20
    assert scale_bar_mm(0.1, 800) == 20 and scale_bar_mm(0.25, 540) == 20 and scale_bar_mm(0.05, 100) == 1
    assert scale_bar_mm(1.0, 2) is None  # not even 1 mm fits


def test_train_refuses_a_canvas_the_network_cannot_take_before_reading_data(tmp_path, capsys):
    from deepnav.cli import main

    code = main(["fetal", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--canvas", "250x360"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--canvas" in err and "multiples of 8" in err
