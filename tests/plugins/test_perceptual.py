"""The shared LPIPS-VGG loss: input handling (the VGG weights themselves are a download,
so the network is replaced; the missing-file error is tested by its users)."""

import torch
from torch import nn

from spheregen.api import Perceptual


class _SeesChannels(nn.Module):
    """Stands in for lpips.LPIPS: returns, per image, the channel count it was given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, a, b):
        assert a.shape == b.shape and a.dtype == torch.float32
        return torch.full((a.shape[0],), float(a.shape[1])) + self.w


def test_grayscale_reaches_vgg_as_rgb_and_rgb_unchanged():
    loss = Perceptual.__new__(Perceptual)  # no weights file needed
    loss.net = _SeesChannels()
    gray, rgb = torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    assert loss(gray, gray).item() == 3.0
    assert loss(rgb, rgb).item() == 3.0
