"""The shipped head model on the three bundled HC18 images (fetuses held out from its training):
`deepnav fetal measure` end to end, with the JSON the issue specifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT
from deepnav.cli import main

SAMPLES = ROOT / "FetalBiometry" / "Resources" / "Samples"
CSV = SAMPLES / "samples_pixel_size_and_HC.csv"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("fetal")
    images = sorted(SAMPLES.glob("*_HC.png"))
    code = main(["fetal", "measure", *map(str, images), "--pixel-size-csv", str(CSV), "--json", str(out / "m.json"),
                 "--overlay", str(out / "overlays"), "--device", "cpu"])
    assert code == 0
    return json.loads((out / "m.json").read_text()), out


def reference() -> dict[str, float]:
    rows = [line.split(",") for line in CSV.read_text().splitlines()[1:]]
    return {r[0]: float(r[2]) for r in rows}


def test_head_circumference_of_unseen_fetuses(measured):
    report, _ = measured
    ref = reference()
    assert {r["file"] for r in report["images"]} == set(ref)
    for row in report["images"]:
        # small (68 mm), middle (170 mm) and large (300 mm) heads, within 3% of the sonographer's ellipse
        assert row["hc_mm"] == pytest.approx(ref[row["file"]], rel=0.03), row
        assert row["bpd_mm"] < row["ofd_mm"]
        assert row["contour_length_mm"] == pytest.approx(row["hc_mm"], rel=0.05)


def test_json_carries_the_ellipse_in_pixels_and_mm(measured):
    report, _ = measured
    row = report["images"][0]
    assert set(row["ellipse_px"]) == {"cx", "cy", "a", "b", "angle_rad"}
    assert row["ellipse_px"]["a"] >= row["ellipse_px"]["b"]
    assert row["ellipse_mm"]["a"] == pytest.approx(row["ellipse_px"]["a"] * row["pixel_mm"])
    assert 0 < row["runtime_s"]


def test_overlays_show_the_measurement_in_colours_of_the_legend_with_a_caption(measured):
    from FetalBiometryLib.overlay import CAPTION_BACKGROUND, LEGEND

    report, out = measured
    picture = sitk.ReadImage(report["images"][0]["overlay"])
    assert picture.GetNumberOfComponentsPerPixel() == 3
    width, height = picture.GetSize()
    assert width == 800 and height > 540 + 3 * 24  # the 800 x 540 image, then the caption's lines
    rgb = sitk.GetArrayFromImage(picture)
    image, caption = rgb[:540].reshape(-1, 3), rgb[540:]
    for name, colour in LEGEND:  # each drawing is on the image in its legend colour
        assert (image == colour).all(axis=1).sum() > 100, name
    # the caption is written on (values, legend, scale bar), not left blank
    assert (np.abs(caption.astype(int) - CAPTION_BACKGROUND).sum(axis=2) > 200).sum() > 2000


def test_unmeasurable_inputs_say_why(tmp_path):
    blank = tmp_path / "blank.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((540, 800), 12, np.uint8)), str(blank))
    noise = tmp_path / "noise.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 40, (540, 800), dtype=np.uint8)),
                    str(noise))
    code = main(["fetal", "measure", str(blank), str(noise), str(SAMPLES / "279_HC.png"), "--json", str(tmp_path / "m.json"),
                 "--device", "cpu"])
    assert code == 3  # nothing measured: a batch script must not take this for success
    rows = {r["file"]: r for r in json.loads((tmp_path / "m.json").read_text())["images"]}
    assert rows["blank.png"]["hc_mm"] is None and "blank" in rows["blank.png"]["reason"]
    assert rows["noise.png"]["hc_mm"] is None and rows["noise.png"]["reason"]
    assert rows["279_HC.png"]["hc_mm"] is None and "pixel size" in rows["279_HC.png"]["reason"]


def test_a_missing_image_stops_the_batch_before_any_work(tmp_path, capsys):
    code = main(["fetal", "measure", str(SAMPLES / "279_HC.png"), str(tmp_path / "gone.png"), "--pixel-size", "0.1",
                 "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "1 of 2 images not found" in err and "gone.png" in err and "\n" not in err
    assert not (tmp_path / "m.json").exists()  # nothing measured, nothing written


@pytest.mark.parametrize("pixel_size", ["0", "-0.1", "nan", "50"])
def test_an_absurd_pixel_size_stops_the_batch_before_any_work(tmp_path, capsys, pixel_size):
    code = main(["fetal", "measure", str(SAMPLES / "279_HC.png"), "--pixel-size", pixel_size,
                 "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "absurd" in err and "\n" not in err
    assert not (tmp_path / "m.json").exists()


def test_an_image_the_csv_does_not_list_says_so(tmp_path):
    other = tmp_path / "other.png"
    other.write_bytes((SAMPLES / "006_HC.png").read_bytes())
    code = main(["fetal", "measure", str(SAMPLES / "279_HC.png"), str(other), "--pixel-size-csv", str(CSV),
                 "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    assert code == 0  # one of two measured
    rows = {r["file"]: r for r in json.loads((tmp_path / "m.json").read_text())["images"]}
    assert rows["279_HC.png"]["hc_mm"] is not None
    assert rows["other.png"]["hc_mm"] is None and f"not listed in {CSV}" in rows["other.png"]["reason"]


def test_two_images_with_one_name_keep_their_own_row_and_overlay(tmp_path, capsys):
    for folder, sample in (("a", "006_HC.png"), ("b", "777_HC.png")):  # different heads, same file name
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "head.png").write_bytes((SAMPLES / sample).read_bytes())
    inputs = [str(tmp_path / "a" / "head.png"), str(tmp_path / "b" / "head.png")]
    code = main(["fetal", "measure", *inputs, "--pixel-size", "0.1", "--json", str(tmp_path / "m.json"),
                 "--overlay", str(tmp_path / "overlays"), "--device", "cpu"])
    assert code == 0
    rows = json.loads((tmp_path / "m.json").read_text())["images"]
    assert [r["path"] for r in rows] == inputs
    assert rows[0]["hc_mm"] < rows[1]["hc_mm"]  # a small and a large head: each row is its own image
    overlays = [r["overlay"] for r in rows]
    assert len(set(overlays)) == 2 and all(Path(o).is_file() for o in overlays)
    first, second = (sitk.GetArrayFromImage(sitk.ReadImage(o)) for o in overlays)
    assert not np.array_equal(first, second)  # neither overwrote the other
    # the CSV gives pixel sizes by file name: it cannot tell these two apart, so the batch is refused
    capsys.readouterr()
    code = main(["fetal", "measure", *inputs, "--pixel-size-csv", str(CSV), "--json", str(tmp_path / "n.json"),
                 "--device", "cpu"])
    assert code == 2 and "share this name" in capsys.readouterr().err


def test_non_ultrasound_images_are_refused(tmp_path):
    """A CT-like slice (bright ring of bone around soft tissue) and a gradient: no head number."""
    y, x = np.mgrid[0:540, 0:800]
    r = np.hypot((x - 400) / 300, (y - 270) / 220)
    ct = np.where(r < 0.9, 110, 0) + np.where(np.abs(r - 0.9) < 0.03, 140, 0) + 20 * np.sin(x / 7.0)
    paths = []
    for name, array in (("ct.png", ct), ("gradient.png", np.tile(np.linspace(0, 255, 800), (540, 1)))):
        paths.append(tmp_path / name)
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(array, 0, 255).astype(np.uint8)), str(paths[-1]))
    code = main(["fetal", "measure", *map(str, paths), "--pixel-size", "0.1", "--json", str(tmp_path / "m.json"),
                 "--device", "cpu"])
    rows = json.loads((tmp_path / "m.json").read_text())["images"]
    for row in rows:
        assert row["hc_mm"] is None or not row["confident"], row
    assert code == (0 if any(row["hc_mm"] is not None for row in rows) else 3)
