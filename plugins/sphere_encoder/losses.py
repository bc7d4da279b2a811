"""Loss terms of the Sphere Encoder (SPEC A6)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from spheregen.api import Perceptual


def distance(pred: Tensor, target: Tensor) -> Tensor:
    """The official 'l1': smooth-L1 (Huber, β = 1) on images mapped to [0, 1]; there
    |diff| < 1, so it equals 0.5·MSE. Mean over C, H, W and batch."""
    return F.smooth_l1_loss(pred * 0.5 + 0.5, target * 0.5 + 0.5, beta=1.0)


def latent_consistency(z_pred: Tensor, z_target: Tensor) -> Tensor:
    """mean_b(1 - cos(flat z_pred, flat z_target)), eps 1e-6; the caller detaches the target."""
    return (1 - F.cosine_similarity(z_pred.flatten(1), z_target.flatten(1), dim=1, eps=1e-6)).mean()


def sphere_perceptual() -> Perceptual:
    """The perceptual term (LPIPS-VGG). The official term also adds 0.1× a ConvNeXt-S
    logit MSE, ``(LPIPS + 0.1·ConvNeXt)/1.1``; that part is not implemented."""
    return Perceptual(
        "the Sphere Encoder's perceptual loss (LPIPS-VGG)",
        "set perc_weight = 0 and con_perc_weight = 0 in the method config to train without the perceptual "
        "term (random VGG features are never used)",
    )
