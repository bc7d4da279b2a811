"""LPIPS-VGG16 as a frozen loss term, for the components that train with it (the
Sphere Encoder's perceptual losses, the RAE decoder)."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from spheregen.weights import require_hub_file

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def check_vgg16_weights(needed_for: str, alternative: str) -> None:
    """Make sure torchvision's VGG16 ImageNet weights are in the hub cache (fetched there
    when online), or raise the WeightsError: ``lpips`` would otherwise download them itself,
    bypassing the offline switch (or run on random features)."""
    require_hub_file(VGG16_FILE, VGG16_URL, needed_for, alternative)


class Perceptual:
    """LPIPS-VGG16 (the ``lpips`` package, ImageNet VGG backbone + its shipped linear
    heads) on images in [-1, 1] (grayscale replicated to RGB), batch mean. Frozen and always in eval mode.

    Deliberately not an ``nn.Module``: its weights stay out of the owner's parameters,
    checkpoints, EMA and ``train()``; it follows the inputs' device on each call.
    ``needed_for`` / ``alternative`` word the error when the VGG file is missing."""

    def __init__(self, needed_for: str, alternative: str) -> None:
        check_vgg16_weights(needed_for, alternative)
        import lpips

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated vgg16(pretrained=True), which loads the file
            # resolved above from the hub cache: nothing is downloaded here
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.net: nn.Module = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=False, verbose=False)
        self.net.eval().requires_grad_(False)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        ref = next(self.net.parameters())
        if ref.device != pred.device:
            self.net.to(pred.device)
        if pred.shape[1] == 1:  # VGG reads RGB
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return self.net(pred.float(), target.float()).mean()
