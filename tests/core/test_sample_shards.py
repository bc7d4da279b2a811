"""Sample sets in shards: each process writes the shard of its block of batches, the main
process an index; reading, exporting and checking work the same on both layouts. The
processes are simulated here (one after another); tests/core/test_distributed_eval.py
launches real ones."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import spheregen

from spheregen import samples
from spheregen.errors import SpheregenError

META = {"method": "toy", "steps": 2, "seed": 7}


class NoiseSampler:
    def sample(self, method, labels, steps, guidance, generator):
        return torch.rand((len(labels), 1, 4, 4), generator=generator) * 2 - 1 + labels.view(-1, 1, 1, 1) * 0.01


def draw(path, processes: int, monkeypatch, labels: torch.Tensor, meta=META) -> None:
    """``samples.generate`` as ``processes`` processes would run it (main last)."""
    shares: dict[int, object] = {}
    for rank in [*range(1, processes), 0]:
        fake = types.SimpleNamespace(
            state=lambda rank=rank: types.SimpleNamespace(num_processes=processes, process_index=rank),
            block=lambda n, rank=rank: range(rank * n // processes, (rank + 1) * n // processes),
            gather=lambda obj, rank=rank: shares.__setitem__(rank, obj) or (
                [shares[r] for r in range(processes)] if rank == 0 else None),
            is_main=lambda rank=rank: rank == 0,
            barrier=lambda: None,
        )
        # samples.generate imports spheregen.distributed when it runs (reading needs no accelerate)
        monkeypatch.setattr(spheregen, "distributed", fake, raising=False)
        samples.generate(NoiseSampler(), None, labels, 2, 1.0, 7, 6, torch.device("cpu"), path, meta)


@pytest.fixture
def labels():
    return torch.arange(40) % 10  # 7 batches of 6 (the last one 4)


def test_shards_read_as_the_single_file(tmp_path, monkeypatch, labels):
    one, three = tmp_path / "one" / "steps-2.npz", tmp_path / "three" / "steps-2.npz"
    draw(one, 1, monkeypatch, labels)
    draw(three, 3, monkeypatch, labels)
    with np.load(one) as z:
        assert set(z.files) == {"images", "labels", "meta"} and z["images"].shape == (40, 1, 4, 4)
        whole = torch.from_numpy(z["images"])
    with np.load(three) as z:
        assert set(z.files) == {"labels", "meta", "shards"} and z["labels"].tolist() == labels.tolist()
    # blocks of the 7 batches: 2, 2, 3 -> 12, 12, 16 images
    assert sorted(p.name for p in samples.shard_dir(three).iterdir()) == [
        f"part-0000{r}-of-00003.npz" for r in range(3)]
    s = samples.open_samples(three, {"steps": 2, "seed": 7})
    assert [n for _, n in s.parts] == [12, 12, 16] and s.meta == META and len(s) == 40
    assert torch.equal(s.images(), whole) and torch.equal(s.labels, labels)
    assert isinstance(s._array(s.parts[0][0]), np.memmap)  # read by rows, not loaded
    assert torch.equal(s.read(10, 30), whole[10:30]) and torch.equal(s.read(35, 99), whole[35:])
    positions = torch.tensor([0, 11, 12, 13, 39])
    assert torch.equal(s.take(positions), whole[positions])
    images, got = s.first_of_classes([3, 0], per_class=2)
    assert got.tolist() == [0, 3, 0, 3] and torch.equal(images, whole[[0, 3, 10, 13]])
    assert samples.read_meta(three) == META
    with pytest.raises(SpheregenError, match="another config"):
        samples.open_samples(three, {"seed": 8})
    # a single process re-draws the set: one file again, the shards are gone
    draw(three, 1, monkeypatch, labels)
    assert not samples.shard_dir(three).exists() and torch.equal(samples.load_samples(three)[0], whole)


def test_a_shard_of_another_draw_or_a_missing_one_is_refused(tmp_path, monkeypatch, labels):
    path, other = tmp_path / "a" / "steps-2.npz", tmp_path / "b" / "steps-2.npz"
    draw(path, 2, monkeypatch, labels)
    draw(other, 2, monkeypatch, labels, {**META, "seed": 8})
    part = samples.shard_dir(path) / "part-00001-of-00002.npz"
    part.write_bytes((samples.shard_dir(other) / part.name).read_bytes())
    with pytest.raises(SpheregenError, match="belongs to another draw.*re-run `spheregen sample`"):
        samples.read_meta(path)
    part.unlink()
    with pytest.raises(SpheregenError, match=f"shard {part} .* is missing"):
        samples.open_samples(path)


def test_exports_and_old_compressed_files(tmp_path, monkeypatch, labels):
    from PIL import Image

    path = tmp_path / "steps-2.npz"
    draw(path, 2, monkeypatch, labels)
    whole = samples.load_samples(path)[0]
    monkeypatch.setattr(samples, "EXPORT_BATCH", 7)  # several batches per shard and across shards
    with np.load(samples.export_samples(path, tmp_path / "adm", "adm")) as z:
        assert np.array_equal(z["arr_0"], whole.permute(0, 2, 3, 1).numpy()) and z["arr_1"].tolist() == labels.tolist()
    native = samples.export_samples(path, tmp_path / "native", "npz")
    with np.load(native) as z:
        assert np.array_equal(z["images"], whole.numpy())
    assert samples.read_meta(native) == META
    png = samples.export_samples(path, tmp_path / "png", "png")
    assert np.array_equal(np.asarray(Image.open(png / "000039.png")), whole[39, 0].numpy())
    assert (png / "labels.txt").read_text().split() == [str(y) for y in labels.tolist()]
    old = tmp_path / "old.npz"  # sample files were compressed before shards
    np.savez_compressed(old, images=whole.numpy(), labels=labels.numpy(), meta=np.array('{"steps": 2}'))
    s = samples.open_samples(old, {"steps": 2})
    assert torch.equal(s.read(5, 9), whole[5:9]) and torch.equal(s.labels, labels)
