"""The bad-input catalogue: each malformed input fails fast through the CLI with a
message that says what is wrong and how to fix it, exits 2, and leaves every earlier
result untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from spheregen.cli import main

GOOD = '''name = "tiny"
seed = 0
[data]
source = "digits"
image_size = 8
channels = 1
[train]
steps = 2
batch_size = 16
[eval]
steps = [1]
num_samples = 20
batch_size = 20
throughput_batch = 4
[[methods]]
name = "toy"
method = "toy-ae"
'''


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed run whose files every bad input must leave as they are."""
    import toy_plugin

    from spheregen import plugins

    previous = plugins.set_registries(plugins.build_registries(extra=[("toy", toy_plugin)]))
    root = tmp_path_factory.mktemp("bad")
    (root / "good.toml").write_text(GOOD)
    dirs = ["--runs-dir", str(root / "runs"), "--reports-dir", str(root / "reports")]
    assert main(["run", str(root / "good.toml"), *dirs]) == 0
    _make_data(root)
    yield root, dirs
    plugins.set_registries(previous)


def _make_data(root: Path) -> None:
    (root / "empty" / "a").mkdir(parents=True)
    for c in ("a", "b"):
        big = root / "big" / c
        big.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40)).save(big / f"{i}.png")
    import polars as pl

    buf = __import__("io").BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    pl.DataFrame({"pixels": [buf.getvalue()] * 4, "label": [0, 1, 2, 3]}).write_parquet(root / "nocol.parquet")
    pl.DataFrame({"image": [{"bytes": buf.getvalue(), "path": None}] * 20, "label": [0, 1, 2, 7] * 5}) \
        .write_parquet(root / "labels.parquet")


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


CASES = {
    "unknown top-level key": ("epochs = 3\n" + GOOD, ["key 'epochs'", "Allowed keys"]),
    "misspelt data key": (edit("channels = 1", "channel = 1"), ["data.channel", "Did you mean 'channels'"]),
    "misspelt method option": (edit('method = "toy-ae"', 'method = { name = "toy-ae", chanels = 4 }'),
                               ["methods[0].method.chanels", "channels"]),
    "wrong type": (edit("steps = 2", 'steps = "two"'), ["train.steps", "expected int"]),
    "unknown method name": (edit('method = "toy-ae"', 'method = "flow-matchin"'), ["flow-matching", "Registered methods"]),
    "unknown sampler name": (GOOD + 'sampler = "eulr"\n', ["methods[0].sampler.name", "euler"]),
    "unknown metric name": (edit("steps = [1]", 'steps = [1]\nmetrics = ["fdi"]'), ["eval.metrics[0].name", "fid"]),
    "steps zero": (edit("steps = [1]", "steps = [0, 1]"), ["eval", ">= 1"]),
    "negative steps per method": (GOOD + "steps = [-2]\n", ["methods[0]", ">= 1"]),
    "negative cfg scale": (GOOD + "guidance = -1.5\n", ["guidance", "-1.5"]),
    "channels 2": (edit("channels = 1", "channels = 2"), ["data.channels", "[1, 3]"]),
    "batch larger than data": (edit("batch_size = 16", "batch_size = 100000"), ["batch_size", "lower"]),
    "negative lr": (edit("[train]", "[train]\nlr = -0.1"), ["train.lr", "> 0"]),
    "toml syntax": ("name = [\n", ["not valid TOML"]),
    "no methods": (GOOD.split("[[methods]]")[0], ["[[methods]]"]),
    "missing dataset path": (edit('source = "digits"', 'source = { name = "imagefolder", path = "ROOT/nope" }'),
                             ["does not exist", "ROOT/nope"]),
    "hub id that does not exist": (edit('source = "digits"', 'source = { name = "hf", id = "no-such-user/no-such-data" }'),
                                   ["no-such-user/no-such-data"]),
    "empty dataset": (edit('source = "digits"', 'source = { name = "imagefolder", path = "ROOT/empty" }'),
                      ["ROOT/empty", "doesn't contain any data files"]),
    "missing image column": (edit('source = "digits"', 'source = { name = "parquet", path = "ROOT/nocol.parquet" }'),
                             ["no column 'image'", "pixels"]),
    "labels out of range": (edit('source = "digits"',
                                 'source = { name = "parquet", path = "ROOT/labels.parquet", num_classes = 4 }'),
                            ["labels span [0, 7]", "4 classes"]),
    "images larger than pad target": (edit('source = "digits"', 'source = { name = "imagefolder", path = "ROOT/big" }\n'
                                           'fit = "pad"'), ["larger than image_size", "resize-crop"]),
    "image size not divisible by patch": (edit('method = "toy-ae"',
                                               'method = { name = "flow-matching", tokenizer = { name = "patch", '
                                               'patch_size = 3 } }'), ["patch", "8"]),
    "missing inception weights": (edit("steps = [1]", 'steps = [1]\nmetrics = ["fid"]'),
                                  ["inception", "hub/checkpoints", "domain-classifier"]),
    "missing vgg weights": (edit('method = "toy-ae"', 'method = { name = "sphere-encoder", size = "tiny", '
                                 'patch_size = 4, perc_weight = 1.0 }'), ["vgg16-397923af.pth", "perc"]),
    # names become folders: nothing may reach outside runs/ and reports/ or into the cache
    "absolute experiment name": (edit('name = "tiny"', 'name = "ROOT/victim"'), ["experiment name", "lowercase"]),
    "parent experiment name": (edit('name = "tiny"', 'name = "../../etc"'), ["experiment name", "'../../etc'"]),
    "cache experiment name": (edit('name = "tiny"', 'name = ".cache"'), ["experiment name", "'.cache'"]),
    "empty experiment name": (edit('name = "tiny"', 'name = ""'), ["experiment name", "''"]),
    "reserved method name": (edit('name = "toy"', 'name = "samples"'), ["'samples' is reserved"]),
    # non-finite and out-of-range values
    "infinite guidance": (GOOD + "guidance = inf\n", ["methods[0].guidance", "not a finite number"]),
    "nan grad_clip": (edit("[train]", "[train]\ngrad_clip = nan"), ["train.grad_clip", "not a finite number"]),
    "nan lr": (edit("[train]", "[train]\nlr = nan"), ["train.lr", "not a finite number"]),
    "nan weight decay": (edit("[train]", "[train]\nweight_decay = nan"), ["train.weight_decay", "finite"]),
    "negative weight decay": (edit("[train]", "[train]\nweight_decay = -0.1"), ["train.weight_decay", ">= 0"]),
    "nan betas": (edit("[train]", "[train]\nbetas = [nan, 0.9]"), ["train.betas[0]", "finite"]),
    "betas out of range": (edit("[train]", "[train]\nbetas = [0.9, 1.5]"), ["train.betas", "[0, 1)"]),
    "seed beyond 2**32": (edit("seed = 0", "seed = 4294967296"), ["key 'seed'", "2**32"]),
    "negative seed": (edit("seed = 0", "seed = -1"), ["key 'seed'", "2**32"]),
    "eval seed beyond 2**32": (edit("steps = [1]", "steps = [1]\nseed = 99999999999"), ["eval.seed", "2**32"]),
    # sizes checked against the machine before any training
    "sample count beyond memory": (edit("num_samples = 20", "num_samples = 1000000000000"),
                                   ["eval.num_samples", "GiB", "available"]),
    "image size beyond memory": (edit("image_size = 8", "image_size = 100000"), ["data.image_size", "GiB"]),
    "missing dinov2 weights": (edit('method = "toy-ae"', 'method = { name = "sphere-latent", tokenizer = '
                                    '{ name = "rae", encoder = "dinov2" } }'), ["dinov2", "trained"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(finished, case, capsys, monkeypatch, tmp_path):
    root, dirs = finished
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    text, expect = CASES[case]
    bad = root / "bad.toml"
    bad.write_text(text.replace("ROOT", str(root)))
    before = snapshot(root / "runs"), snapshot(root / "reports")
    capsys.readouterr()
    code = main(["run", str(bad), *dirs])
    err = capsys.readouterr().err
    assert code == 2, err
    for e in expect:
        e = e.replace("ROOT", str(root))
        assert e in err, (e, err)
    assert (snapshot(root / "runs"), snapshot(root / "reports")) == before


def test_unknown_method_on_the_command_line(finished, capsys):
    root, dirs = finished
    assert main(["train", str(root / "good.toml"), "--method", "nope", *dirs]) == 2
    assert "no method named 'nope'" in capsys.readouterr().err
