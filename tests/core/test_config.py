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
