"""TorchScript and torch.export files give the eager model's result; foreign files are refused."""

import json
import zipfile

import pytest
import torch

from deepnav import model_files
from deepnav.errors import InputError
from MRUSFusionLib import model_io
from MRUSFusionLib.networks import Cascade

TOLERANCE_VOXELS = 1e-4  # the stated tolerance between eager and exported models


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = Cascade().eval()
    with torch.no_grad():  # non-zero heads, so the comparison is not between two identities
        model.rigid.fc.weight.normal_(0, 1e-5)
        model.bspline.head.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(1, 1, 128, 128, 128, generator=g)
    moving = torch.rand(1, 1, 128, 128, 128, generator=g)
    return model, fixed, moving


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_exported_model_matches_eager(tmp_path, model_and_input, suffix):
    model, fixed, moving = model_and_input
    path = tmp_path / f"m{suffix}"
    save = model_io.save_torchscript if suffix == ".pt" else model_io.save_exported
    save(model, path, {"note": "test"})
    loaded = model_io.load_model(path, "cpu")
    assert loaded.metadata["format"] == model_io.MODEL_FORMAT and loaded.metadata["note"] == "test"
    with torch.no_grad():
        expected = model(fixed, moving)
    got = loaded(fixed, moving)
    assert expected[1].abs().max() > 0.1  # a real, non-identity field
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=TOLERANCE_VOXELS, rtol=1e-4)
    for (name, a), b in zip(model.state_dict().items(), loaded.eager().state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)  # what `train --init` fine-tunes from


def test_model_files_stay_small(tmp_path, model_and_input):
    # a 128^3 x 3 identity grid alone would be 25 MB; torch.export's example inputs 16 MB
    assert model_io.save_torchscript(model_and_input[0], tmp_path / "m.pt").stat().st_size < 5e6
    assert model_io.save_exported(model_and_input[0], tmp_path / "m.pt2").stat().st_size < 5e6


def test_foreign_and_wrong_version_files_are_refused(tmp_path, model_and_input):
    with pytest.raises(InputError, match="not found"):
        model_io.load_model(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a torch model archive"):
        model_io.load_model(text)
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(InputError, match="no DeepNav model record"):
        model_io.load_model(other)
    future = tmp_path / "future.pt"
    model_io.save_torchscript(model_and_input[0], future)
    with zipfile.ZipFile(future) as z:
        names = [n for n in z.namelist() if n.endswith(model_files.METADATA_NAME)]
        record = json.loads(z.read(names[0]))
    record["version"] = 99
    torch.jit.save(torch.jit.load(str(future)), str(future), _extra_files={model_files.METADATA_NAME: json.dumps(record)})
    with pytest.raises(InputError, match="version 99"):
        model_io.load_model(future)
    record["format"] = "deepnav.liver.unet"
    torch.jit.save(torch.jit.load(str(future)), str(future), _extra_files={model_files.METADATA_NAME: json.dumps(record)})
    with pytest.raises(InputError, match="not a MR-US fusion cascade model"):
        model_io.load_model(future)
