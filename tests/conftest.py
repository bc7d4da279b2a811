import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never touch the network: hub libraries fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def no_weight_downloads():
    """Tests never download weights: torch hub's downloader (behind torchvision, timm's
    URL weights, torch-fidelity and lpips) fails the test instead of reaching out."""

    def refuse(url, *args, **kwargs):
        # pytest.fail, not an Exception: no `except Exception` on the way can turn it into a pass
        pytest.fail(f"a test tried to download {url}: check the local file first and raise WeightsError")

    import timm.models._hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        # timm binds its own reference at import
        mp.setattr(timm.models._hub, "download_url_to_file", refuse)
        yield


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection, urlopen or torch hub download fails the test."""
    import socket
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache (TORCH_HOME = tmp_path); returns its checkpoints folder,
    where every weights lookup (spheregen.weights) looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def toy_registries():
    """The installed plugins plus the in-process toy plugin (tests/toy_plugin.py)."""
    import toy_plugin

    from spheregen import plugins

    regs = plugins.build_registries(extra=[("toy", toy_plugin)])
    previous = plugins.set_registries(regs)
    yield regs
    plugins.set_registries(previous)


@pytest.fixture
def tiny_experiment(tmp_path):
    """A toy experiment on 8×8 sklearn digits, written as a TOML file."""

    def make(extra: str = "", methods: str | None = None) -> Path:
        methods = methods or '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n'
        text = f'''name = "tiny"
seed = 0
[data]
source = "digits"
image_size = 8
channels = 1
[train]
steps = 6
batch_size = 16
lr = 0.01
checkpoint_every = 3
log_every = 1
[eval]
steps = [1, 2]
num_samples = 40
batch_size = 20
throughput_batch = 8
{extra}
{methods}'''
        path = tmp_path / "tiny.toml"
        path.write_text(text)
        return path

    return make


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core CPU a second
    intra-op thread only adds barrier waits (measured 15× slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
