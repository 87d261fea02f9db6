"""The command line works on real files and fails with one clear line on bad input."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from deepnav.cli import main
from deepnav.imaging import read_volume, write_volume


@pytest.fixture(scope="module")
def patient_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("patient")
    assert main(["fusion", "phantom", "--seed", "6", "--frames", "1", "--out", str(out)]) == 0
    return out


def test_phantom_writes_a_readable_patient(patient_dir):
    index = json.loads((patient_dir / "patient.json").read_text())
    mr = read_volume(patient_dir / index["mr"])
    assert read_volume(patient_dir / index["mr_vessels"]).same_grid(mr)
    assert (patient_dir / index["frames"][0]["landmarks_us"]).exists()


def test_register_writes_transforms_that_simpleitk_loads(patient_dir, tmp_path):
    out = tmp_path / "reg"
    code = main(["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(patient_dir / "us_00.nrrd"),
                 "--liver", str(patient_dir / "mr_liver.nrrd"), "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "registration.json").read_text())
    assert report["stage"] == "corrected"  # network + correction by default
    assert report["network"]["folding_percent"] < 1.0 and report["timings_s"]["network"] > 0
    correction = report["correction"]
    assert correction["start"] in ("network", "coarse") and correction["mind_ssc_after"] <= correction["mind_ssc_before"]
    assert len(report["registration_region"]["size"]) == 3
    composite = sitk.ReadTransform(str(out / "transform.h5"))
    field = sitk.ReadImage(str(out / "field.nrrd"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    centre = field.TransformContinuousIndexToPhysicalPoint([63.5] * 3)
    moved = np.array(composite.TransformPoint(centre))
    assert np.linalg.norm(moved - centre) < 30  # a plausible displacement, in mm
    assert read_volume(out / "warped_us.nrrd").size_ijk == (128, 128, 128)
    picture = sitk.ReadImage(str(out / "overlay.png"))  # before / network / corrected, three orientations
    assert picture.GetNumberOfComponentsPerPixel() == 3 and picture.GetHeight() > picture.GetWidth() / 2


def test_register_with_an_initial_transform_composes_it(patient_dir, tmp_path):
    shift = sitk.TranslationTransform(3, (4.0, -3.0, 2.0))
    sitk.WriteTransform(shift, str(tmp_path / "initial.tfm"))
    out = tmp_path / "reg"
    assert main(["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(patient_dir / "us_00.nrrd"),
                 "--initial", str(tmp_path / "initial.tfm"), "--fast", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "transform.h5").exists()
    report = json.loads((out / "registration.json").read_text())
    assert report["stage"] == "network" and "correction" not in report and report["folding_percent"] < 1.0


def test_missing_file_is_one_clear_line(tmp_path, capsys):
    code = main(["fusion", "register", "--mr", str(tmp_path / "none.nrrd"), "--us", str(tmp_path / "none.nrrd"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "MR file not found" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_wrong_model_file_and_nan_volume_are_refused(patient_dir, tmp_path, capsys):
    bad_model = tmp_path / "model.pt"
    bad_model.write_bytes(b"\x00" * 100)
    code = main(["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(patient_dir / "us_00.nrrd"),
                 "--model", str(bad_model), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a torch model archive" in capsys.readouterr().err
    us = read_volume(patient_dir / "us_00.nrrd")
    nan_us = us.with_array(us.array.astype(np.float32))
    nan_us.array[5, 5, 5] = np.nan
    write_volume(nan_us, tmp_path / "nan.nrrd")
    code = main(["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(tmp_path / "nan.nrrd"),
                 "--device", "cpu", "--out", str(tmp_path / "o2")])
    assert code == 2 and "NaN" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_training_from_files_refuses_mismatched_labels(patient_dir, tmp_path, capsys):
    code = main(["fusion", "train", "--mr", str(patient_dir / "mr.nrrd"), "--mr-vessels", str(patient_dir / "mr_vessels.nrrd"),
                 "--us", str(patient_dir / "us_00.nrrd"), "--us-vessels", str(patient_dir / "mr_vessels.nrrd"),
                 "--out", str(tmp_path / "t")])
    assert code == 2 and "US vessel label does not match" in capsys.readouterr().err


def test_training_from_files_refuses_the_known_truth_term(patient_dir, tmp_path, capsys):
    code = main(["fusion", "train", "--mr", str(patient_dir / "mr.nrrd"), "--mr-vessels", str(patient_dir / "mr_vessels.nrrd"),
                 "--us", str(patient_dir / "us_00.nrrd"), "--us-vessels", str(patient_dir / "us_00_vessels.nrrd"),
                 "--landmark-weight", "0.1", "1", "--out", str(tmp_path / "t")])
    assert code == 2 and "--landmark-weight needs --synthetic" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_synthetic_training_writes_loadable_models_and_resumes(tmp_path):
    from MRUSFusionLib.model_io import load_model

    out = tmp_path / "model"
    common = ["fusion", "train", "--synthetic", "2", "--frames", "2", "--val-patients", "1", "--steps-per-epoch", "1",
              "--device", "cpu", "--out", str(out)]
    assert main(common + ["--rigid-epochs", "1", "--bspline-epochs", "0"]) == 0
    assert main(common + ["--rigid-epochs", "1", "--bspline-epochs", "1", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["rigid", "bspline"]
    for name in ("model.pt", "model.pt2"):
        model = load_model(out / name, "cpu")
        assert model.metadata["training"]["kind"] == "synthetic"
        assert len(model.metadata["training"]["patient_seeds"]) == 2


def test_live_demo_replays_files_over_openigtlink(patient_dir, tmp_path):
    """`demo --us`: the volumes stream through a real loopback service; the report has the
    latency figures, every volume's geometry came through intact, overlays are readable."""
    out = tmp_path / "demo"
    code = main(["fusion", "demo", "--us", str(patient_dir / "us_00.nrrd"), "--mr", str(patient_dir / "mr.nrrd"),
                 "--liver", str(patient_dir / "mr_liver.nrrd"), "--frames", "3", "--rate", "4", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 3 and report["frames_completed"] + report["dropped_frames"] == 3
    assert 0 < report["end_to_end_s"]["p50"] <= report["end_to_end_s"]["p95"]
    assert report["geometry_intact"] and report["errors"] == 0
    overlays = [r["overlay"] for r in report["per_frame"] if "overlay" in r]
    assert overlays and sitk.ReadImage(str(out / overlays[0])).GetNumberOfComponentsPerPixel() == 3
    assert "end to end" in (out / "report.md").read_text()


def test_the_shared_core_names_no_module_and_finds_them_as_slicer_lays_them_out(tmp_path, monkeypatch):
    """deepnav/cli.py imports no module's Lib: the commands register themselves (entry points when
    DeepNav is installed; inside Slicer, which installs nothing but puts each scripted module's
    folder on sys.path, any importable *Lib package with a cli that declares COMMAND)."""
    import importlib.metadata

    from conftest import ROOT
    from deepnav import cli

    source = (ROOT / "deepnav" / "cli.py").read_text()
    assert not any(name in source for name in ("MRUSFusion", "FetalBiometry", "LiverLesionSeg"))
    assert [m.COMMAND for m in cli.command_modules()] == ["fetal", "fusion", "liver"]  # installed: entry points

    plugin = tmp_path / "DemoToolLib"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    (plugin / "cli.py").write_text('COMMAND = "demo-tool"\nHELP = "a plug-in"\n\n'
                                   "def add_commands(parser):\n    parser.set_defaults(run=lambda args: 7)\n")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [])  # as inside Slicer
    for folder in (tmp_path, ROOT / "MRUSFusion", ROOT / "FetalBiometry", ROOT / "LiverLesionSeg"):
        monkeypatch.syspath_prepend(str(folder))
    assert [m.COMMAND for m in cli.command_modules()] == ["demo-tool", "fetal", "fusion", "liver"]
    assert main(["demo-tool"]) == 7
