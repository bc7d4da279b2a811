import types

import attrs
import pytest

import spheregen
from spheregen.errors import PluginError, RegistryError
from spheregen.plugins import build_registries, registries
from spheregen.registry import Provider, Registry


@attrs.frozen(kw_only=True)
class Cfg:
    x: int = 1


def test_names_are_kebab_case():
    reg = Registry("tokenizer")
    for bad in ("Patch", "my_tok", "-a", "a--b", "", "1a"):
        with pytest.raises(RegistryError, match="kebab-case"):
            reg.add(bad, lambda c, x: None, Cfg, Provider("p"))


def test_duplicate_names_both_providers():
    reg = Registry("tokenizer")
    reg.add("tok", lambda c, x: None, Cfg, Provider("first", "dist-a", "1.0"))
    with pytest.raises(RegistryError) as err:
        reg.add("tok", lambda c, x: None, Cfg, Provider("second", "dist-b", "2.0"))
    assert "first" in str(err.value) and "second" in str(err.value)


def test_config_must_be_attrs():
    reg = Registry("metric")
    with pytest.raises(RegistryError, match="attrs"):
        reg.add("m", lambda c, x: None, dict, Provider("p"))


def test_unknown_name_suggests_close_match():
    reg = Registry("sampler")
    reg.add("euler", lambda c, x: None, Cfg, Provider("p"))
    with pytest.raises(RegistryError, match="did you mean 'euler'"):
        reg.get("eulr")


def test_builtins_load_through_entry_points():
    regs = registries()
    assert "mnist-5k" in regs.dataset
    assert regs.dataset.get("mnist-5k").provider.distribution == "spheregen"


def _plugin(**hooks):
    mod = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, spheregen.hookimpl(fn))
    return mod


def test_duplicate_from_two_plugins_names_both():
    def reg(register):
        register("mnist-5k", lambda c, x: None, Cfg)

    with pytest.raises(RegistryError) as err:
        build_registries(extra=[("intruder", _plugin(spheregen_register_datasets=reg))])
    assert "intruder" in str(err.value) and "datasets" in str(err.value)


def test_plugin_that_raises_names_plugin_and_hook():
    def reg(register):
        raise RuntimeError("boom")

    with pytest.raises(PluginError) as err:
        build_registries(extra=[("broken", _plugin(spheregen_register_metrics=reg))])
    msg = str(err.value)
    assert "broken" in msg and "spheregen_register_metrics" in msg and "boom" in msg


def test_misspelt_hook_is_an_error():
    def reg(register):
        pass

    with pytest.raises(PluginError, match="spheregen_register_tokenisers"):
        build_registries(extra=[("typo", _plugin(spheregen_register_tokenisers=reg))])


def test_spheregen_plugins_env_restricts(monkeypatch):
    monkeypatch.setenv("SPHEREGEN_PLUGINS", "datasets")
    regs = build_registries()
    assert "digits" in regs.dataset and len(regs.method) == 0
    monkeypatch.setenv("SPHEREGEN_PLUGINS", "no-such-plugin")
    with pytest.raises(PluginError, match="no-such-plugin"):
        build_registries()
