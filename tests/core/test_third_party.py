import subprocess
import sys
import json
import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_installed_third_party_plugin_is_registered(tmp_path):
    """pip-install the example plugin into its own folder, put that folder on the path
    of a fresh process, and list the components: the tokenizer is there, with its
    plugin and distribution, found through the entry point alone."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "third_party_plugin")], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop("SPHEREGEN_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "spheregen.cli", "list", "--json"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    tokenizers = {e["name"]: e for e in json.loads(out.stdout)["tokenizer"]}
    assert tokenizers["haar"]["plugin"] == "example_haar"
    assert tokenizers["haar"]["distribution"] == "spheregen-example"


def test_haar_roundtrip():
    sys.path.insert(0, str(ROOT / "examples" / "third_party_plugin"))
    try:
        import torch
        from spheregen_example import HaarConfig, HaarTokenizer

        from spheregen.interfaces import BuildContext, DataSpec

        ctx = BuildContext(data=DataSpec(image_size=8, channels=3, num_classes=0), build=None)
        tok = HaarTokenizer(HaarConfig(), ctx)
        x = torch.randn(2, 3, 8, 8)
        z = tok.encode(x)
        assert z.shape == (2, *tok.latent_shape)
        assert torch.allclose(tok.decode(z), x, atol=1e-6)
    finally:
        sys.path.pop(0)
