"""The command line works on real files and fails with one clear line on bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepnav.cli import main
from deepnav.imaging import read_volume, write_volume
from deepnav.torch_runtime import pick_device


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
    code = main(["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(patient_dir / "us_00.nrrd"),
                 "--liver", str(patient_dir / "mr_liver.nrrd"), "--device", "cpu", "--out", str(tmp_path / "reg")])
    assert code == 0
    out = tmp_path / "reg" / "us_00"  # one folder per US volume, named after it, even for one
    assert [p.name for p in (tmp_path / "reg").iterdir()] == ["us_00"]
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
    """The US moved by d and --initial "x -> x + d" (MR -> US) give the network the very same input,
    so the written transforms must be the plain run's followed by that translation: an --initial
    that is ignored (or folded in the wrong way round) moves every point by about d."""
    d = np.array([25.0, -15.0, 10.0])  # mm, LPS
    us = read_volume(patient_dir / "us_00.nrrd")
    us.origin = us.origin + d  # every US voxel now sits d further along
    write_volume(us, tmp_path / "moved" / "us_00.nrrd")  # the same file name as the plain one
    sitk.WriteTransform(sitk.TranslationTransform(3, d.tolist()), str(tmp_path / "initial.tfm"))
    common = ["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--liver", str(patient_dir / "mr_liver.nrrd"),
              "--fast", "--device", "cpu"]
    assert main(common + ["--us", str(patient_dir / "us_00.nrrd"), "--out", str(tmp_path / "plain")]) == 0
    # two volumes sharing a name: one folder each, in the order given
    assert main(common + ["--us", str(patient_dir / "us_00.nrrd"), str(tmp_path / "moved" / "us_00.nrrd"),
                          "--initial", str(tmp_path / "initial.tfm"), "--out", str(tmp_path / "initial")]) == 0
    assert sorted(p.name for p in (tmp_path / "initial").iterdir()) == ["us_00", "us_00_2"]
    initial = tmp_path / "initial" / "us_00_2"
    report = json.loads((initial / "registration.json").read_text())
    assert report["stage"] == "network" and report["folding_percent"] < 1.0
    assert report["us"] == str(tmp_path / "moved" / "us_00.nrrd")
    # MR points across the registration grid (the field's), where the written field is defined
    field = sitk.ReadImage(str(initial / "field.nrrd"))
    points = [field.TransformContinuousIndexToPhysicalPoint(ijk) for ijk in
              np.random.default_rng(0).uniform(0, np.array(field.GetSize()) - 1, (20, 3)).tolist()]
    for name in ("transform.h5", "rigid.tfm"):
        plain = sitk.ReadTransform(str(tmp_path / "plain" / "us_00" / name))
        with_initial = sitk.ReadTransform(str(initial / name))
        for x in points:
            np.testing.assert_allclose(with_initial.TransformPoint(x), np.array(plain.TransformPoint(x)) + d, atol=0.05,
                                       err_msg=name)


def test_missing_file_is_one_clear_line(tmp_path, capsys):
    code = main(["fusion", "register", "--mr", str(tmp_path / "none.nrrd"), "--us", str(tmp_path / "none.nrrd"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "MR file not found" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


# Every command that writes, with its output at OUT (a folder) or inside it (a file); its inputs
# may be missing: the output is checked first, before any input is read or model loaded.
WRITING_COMMANDS = {
    "fusion phantom": ["fusion", "phantom", "--out", "OUT"],
    "fusion train": ["fusion", "train", "--synthetic", "3", "--out", "OUT"],
    "fusion register": ["fusion", "register", "--mr", "mr.nrrd", "--us", "us.nrrd", "--out", "OUT"],
    "fusion demo": ["fusion", "demo", "--out", "OUT"],
    "fusion bench-stream": ["fusion", "bench-stream", "--json", "OUT/stream.json"],
    "fusion evaluate": ["fusion", "evaluate", "--json", "OUT/eval.json"],
    "liver simulate": ["liver", "simulate", "--cases", "1", "--out", "OUT"],
    "liver train": ["liver", "train", "data", "--out", "OUT"],
    "liver segment": ["liver", "segment", "--phase", "venous=ct.nii.gz", "--out", "OUT"],
    "liver evaluate": ["liver", "evaluate", "--cases", "1", "--json", "OUT/eval.json"],
    "liver register": ["liver", "register", "--reference", "a.nii.gz", "--moving", "b.nii.gz", "--out", "OUT/t.tfm"],
    "fetal measure": ["fetal", "measure", "FetalBiometry/Resources/Samples/279_HC.png", "--pixel-size", "0.1",
                      "--json", "OUT/m.json"],
    "fetal train": ["fetal", "train", "--data", "hc18", "--out", "OUT"],
    "fetal evaluate": ["fetal", "evaluate", "--data", "hc18", "--json", "OUT/m.json"],
}


@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # the fetal sample image is named relative to the repository
    blocker = tmp_path / "a file"
    blocker.write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permissions; sysfs takes no new file from anyone
        read_only = Path("/sys")
    for out, why in ((blocker / "out", "is a file, not a folder"), (read_only, "")):
        argv = [a.replace("OUT", str(out)) for a in WRITING_COMMANDS[command]]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("deepnav: error: cannot write to the ") and why in err, (argv, err)
        assert "\n" not in err


def test_a_device_torch_cannot_use_is_one_clear_line(patient_dir, tmp_path, capsys):
    argv = ["fusion", "register", "--mr", str(patient_dir / "mr.nrrd"), "--us", str(patient_dir / "us_00.nrrd"),
            "--fast", "--out", str(tmp_path / "o"), "--device"]
    assert main(argv + ["tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown device 'tpu'" in err and "gpu" in err and "\n" not in err
    if torch.cuda.is_available():  # "gpu" is TotalSegmentator's spelling of cuda
        assert pick_device("gpu") == pick_device("cuda")
    else:
        for name in ("cuda", "gpu", "GPU"):
            assert main(argv + [name]) == 2
            err = capsys.readouterr().err.strip()
            assert "torch sees none" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_a_truncated_input_is_refused_not_zero_filled(patient_dir, tmp_path, capsys):
    mr = read_volume(patient_dir / "mr.nrrd")
    data = write_volume(mr, tmp_path / "mr.nii.gz").read_bytes()
    (tmp_path / "mr.nii.gz").write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    code = main(["fusion", "register", "--mr", str(tmp_path / "mr.nii.gz"), "--us", str(patient_dir / "us_00.nrrd"),
                 "--fast", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("deepnav: error: MR") and "truncated or corrupt" in err.splitlines()[-1]
    assert not (tmp_path / "o").exists()


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
