import re

import pytest

from spheregen.errors import ConfigError
from spheregen.experiment import experiment_from_dict, load_experiment


def base(**over):
    raw = {"name": "t", "data": {"source": "digits", "image_size": 8, "channels": 1},
           "methods": [{"name": "a", "method": "toy-ae"}]}
    raw.update(over)
    return raw


def test_valid_experiment_resolves_defaults(toy_registries):
    exp = experiment_from_dict(base(train={"steps": 5}), "x.toml")
    assert exp.methods[0].train.steps == 5 and exp.methods[0].method.config.channels == 8
    assert exp.steps_for(exp.methods[0]) == (1, 2, 4, 8)


def test_method_train_overrides_merge(toy_registries):
    raw = base(train={"steps": 5, "lr": 0.1})
    raw["methods"][0]["train"] = {"lr": 0.5}
    t = experiment_from_dict(raw).methods[0].train
    assert (t.steps, t.lr) == (5, 0.5)


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r["data"].update(imagesize=8), ["data.imagesize", "image_size"]),
    (lambda r: r["data"].update(image_size="8"), ["data.image_size", "expected int"]),
    (lambda r: r["methods"][0].update(method="toy-aee"), ["methods[0].method.name", "toy-ae"]),
    (lambda r: r["methods"][0].update(method={"name": "toy-ae", "chanels": 3}), ["methods[0].method.chanels", "channels"]),
    (lambda r: r.update(eval={"steps": [0, 2]}), ["eval", ">= 1"]),
    (lambda r: r["methods"][0].update(guidance=-1.0), ["guidance"]),
    (lambda r: r["data"].update(channels=2), ["data.channels", "[1, 3]"]),
    (lambda r: r.update(methods=[]), ["[[methods]]"]),
    (lambda r: r["methods"].append({"name": "a", "method": "toy-ae"}), ["unique"]),
    (lambda r: r["data"].update(source="nope"), ["data.source.name", "mnist-5k"]),
    (lambda r: r.update(train={"steps": 1.5}), ["train.steps", "expected int"]),
    (lambda r: r.update(eval={"metrics": ["no-metric"]}), ["eval.metrics[0].name"]),
])
def test_bad_values_name_file_and_key(toy_registries, mutate, expect):
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(raw, "bad.toml")
    msg = str(err.value)
    assert msg.startswith("bad.toml"), msg
    for e in expect:
        assert e in msg, msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(bad)


def test_set_overrides_reach_every_method_and_are_recorded(toy_registries, tiny_experiment):
    from spheregen.experiment import load_experiment

    methods = ('[[methods]]\nname = "a"\nmethod = "toy-ae"\n[methods.train]\nsteps = 50\n'
               '[[methods]]\nname = "b"\nmethod = "toy-ae"\n')
    path = tiny_experiment("", methods)
    exp = load_experiment(path, ["train.steps=5", "eval.num_samples=100", "methods.b.train.lr=0.5",
                                 "eval.steps=[1, 4]", "methods.a.method.channels=4", "name=smoke"])
    assert [m.train.steps for m in exp.methods] == [5, 5]  # the command line beats the method's own steps
    assert exp.eval.num_samples == 100 and exp.eval.steps == (1, 4) and exp.name == "smoke"
    assert [m.train.lr for m in exp.methods] == [0.01, 0.5]
    assert exp.methods[0].method.config.channels == 4
    assert exp.overrides[0] == "train.steps=5"
    from spheregen.config import to_dict

    assert to_dict(exp)["overrides"][1] == "eval.num_samples=100"


@pytest.mark.parametrize("option, message", [
    ("train.steps=five", "key 'train.steps': expected int"),
    ("train.stepz=5", "Did you mean 'steps'"),
    ("methods.nope.train.lr=1", "no method named 'nope'"),
    ("trainsteps", "expected KEY=VALUE"),
    ("seed.x=1", "plain value"),
])
def test_bad_set_overrides_are_config_errors(toy_registries, tiny_experiment, option, message):
    from spheregen.experiment import load_experiment

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment(tiny_experiment(), [option])
