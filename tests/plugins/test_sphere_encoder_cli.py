"""The Sphere Encoder through the CLI: train a few steps, then every edit writes a grid."""

import pytest
from PIL import Image

from spheregen.cli import main

EXP = '''name = "se-edit"
[data]
source = "digits"
image_size = 16
[train]
steps = 3
batch_size = 8
checkpoint_every = 0
[eval]
steps = [1, 2]
num_samples = 20
batch_size = 10
[[methods]]
name = "se"
method = { name = "sphere-encoder", size = "tiny", patch_size = 4, mixer_depth = 2, head = "conv", noise_angle = 80.0 }
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("se")
    exp = tmp / "se.toml"
    exp.write_text(EXP)
    dirs = ["--runs-dir", str(tmp / "runs"), "--reports-dir", str(tmp / "reports")]
    assert main(["train", str(exp), *dirs]) == 0
    return tmp, exp, dirs


@pytest.mark.parametrize("op, cols", [("reconstruct", 2), ("interpolate", 5), ("manipulate", 10)])
def test_edit_grids(trained, op, cols):
    tmp, exp, dirs = trained
    assert main(["edit", str(exp), op, "--method", "se", "-n", "3", "--num", "5", *dirs]) == 0
    img = Image.open(tmp / "reports" / "se-edit" / f"edit_se_{op}.png")
    assert img.size == (16 * cols * 2, 16 * 3 * 2)  # doubled: small tiles are upscaled


def test_edit_unsupported_op(trained, capsys):
    tmp, exp, dirs = trained
    assert main(["edit", str(exp), "inpaint", "--method", "se", *dirs]) == 2
    assert "reconstruct" in capsys.readouterr().err
