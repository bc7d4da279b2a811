"""Loss terms of the Sphere Encoder (SPEC A6)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spheregen.errors import WeightsError

VGG16_FILE = "vgg16-397923af.pth"


def distance(pred: Tensor, target: Tensor) -> Tensor:
    """The official 'l1': smooth-L1 (Huber, β = 1) on images mapped to [0, 1]; there
    |diff| < 1, so it equals 0.5·MSE. Mean over C, H, W and batch."""
    return F.smooth_l1_loss(pred * 0.5 + 0.5, target * 0.5 + 0.5, beta=1.0)


def latent_consistency(z_pred: Tensor, z_target: Tensor) -> Tensor:
    """mean_b(1 - cos(flat z_pred, flat z_target)), eps 1e-6; the caller detaches the target."""
    return (1 - F.cosine_similarity(z_pred.flatten(1), z_target.flatten(1), dim=1, eps=1e-6)).mean()


def vgg16_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class Perceptual:
    """LPIPS-VGG16 (the ``lpips`` package, ImageNet VGG backbone + its shipped linear
    heads) on images in [-1, 1], batch mean. Frozen and always in eval mode.

    Deliberately not an ``nn.Module`` attribute of the method: its weights stay out of
    the method's parameters, checkpoints, EMA and ``train()``; it follows the inputs'
    device on each call. The official perceptual term also adds 0.1× a ConvNeXt-S
    logit MSE, ``(LPIPS + 0.1·ConvNeXt)/1.1``; that part is not implemented."""

    def __init__(self) -> None:
        path = vgg16_weights_path()
        if not path.is_file():
            raise WeightsError(
                f"the perceptual loss (LPIPS-VGG) needs the torchvision VGG16 ImageNet weights "
                f"'{VGG16_FILE}', not found in {path.parent} (TORCH_HOME/hub/checkpoints). Put the file "
                "there, or set perc_weight = 0 and con_perc_weight = 0 in the method config to train "
                "without the perceptual term; random VGG features are never used"
            )
        import warnings

        import lpips

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated vgg16(pretrained=True): same weights.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.net: nn.Module = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=False, verbose=False)
        self.net.eval().requires_grad_(False)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        ref = next(self.net.parameters())
        if ref.device != pred.device:
            self.net.to(pred.device)
        return self.net(pred.float(), target.float()).mean()
